"""check_pretrain_config: every shipped config passes, each bad value is one line naming its field."""

import importlib

import ml_collections
import pytest

from bam_jax import config_checks

# Numeric fields of configs/common.py that take any value: nothing crashes or misbehaves.
UNCONSTRAINED = {"data.num_parallel_calls", "mesh.fsdp_min_size"}


def shipped_pretrain_configs():
    """Every pretraining config a user runs: the files and the linear probes' `pretrain`."""
    configs = {name: importlib.import_module(f"configs.{name}").get_config()
               for name in ("default", "vit_s", "vit_b")}
    for name in ("linear", "linear_default"):
        configs[f"{name}.pretrain"] = importlib.import_module(f"configs.{name}").get_config().pretrain
    return configs


@pytest.mark.parametrize("name", ["default", "vit_s", "vit_b", "linear.pretrain",
                                  "linear_default.pretrain"])
def test_shipped_configs_pass(name):
    config_checks.check_pretrain_config(shipped_pretrain_configs()[name])


@pytest.mark.parametrize("backbone", ["vit", "convnet", "pixels"])
def test_the_tests_tiny_configs_pass(backbone, tiny_config):
    config = tiny_config(backbone=backbone)
    config.update(knn=dict(enabled=True), ccrop=dict(enabled=True, loc_interval=1))
    config_checks.check_pretrain_config(config)


def with_value(config, path, value):
    """A copy with `path` set; not type-safe, as a config file may build its ConfigDict."""
    config = ml_collections.ConfigDict(config.copy_and_resolve_references().to_dict(),
                                       type_safe=False)
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
    return config


BAD = [
    # (field, value, expected message); the base is configs/vit_s.py (kNN, ccrop, teacher on).
    ("log_every_steps", 0, "config.log_every_steps=0: must be >= 1; set "
                           "--config.log_every_steps=50"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0: must be >= 1"),
    ("data.global_crop_size", 0, "config.data.global_crop_size=0: must be >= 1"),
    ("batch_size", -8, "config.batch_size=-8: must be >= 1; set --config.batch_size=256"),
    ("num_train_steps", 0, "config.num_train_steps=0: must be >= 1, or -1 to train num_epochs"),
    ("seed", -1, "config.seed=-1: must be >= 0"),
    ("data.flip_prob", 1.5, "config.data.flip_prob=1.5: must be in [0, 1]"),
    ("data.blur_probs", (1.0, 1.5, 0.5), "config.data.blur_probs=(1.0, 1.5, 0.5): must be 3 "
                                         "values, each in [0, 1]"),
    ("data.blur_probs", (1.0, 0.5), "config.data.blur_probs=(1.0, 0.5): must be 3 values"),
    ("data.hue", 0.6, "config.data.hue=0.6: must be in [0, 0.5]"),
    ("data.global_crops_scale", (0.5, 0.2), "config.data.global_crops_scale=(0.5, 0.2): must be "
                                            "a pair (low, high) with low <= high, each in (0, 1]"
                                            "; set --config.data.global_crops_scale="
                                            "'(0.25, 1.0)'"),
    ("data.local_crops_scale", (0.0, 0.2), "config.data.local_crops_scale=(0.0, 0.2)"),
    ("data.global_crops_scale", 0.5, "config.data.global_crops_scale=0.5: must be a pair"),
    ("data.blur_sigma", (2.0, 0.1), "config.data.blur_sigma=(2.0, 0.1): must be a pair"),
    ("data.local_crop_size", 300, "config.data.local_crop_size=300: must be in [1, "
                                  "data.global_crop_size=224]; set "
                                  "--config.data.local_crop_size=96"),
    ("data.eval_resize", 200, "config.data.eval_resize=200: must be >= data.eval_crop_size=224"),
    ("data.std", (0.2, 0.0, 0.2), "config.data.std=(0.2, 0.0, 0.2): must be None (ImageNet's) "
                                  "or positive numbers"),
    ("loss.temperature", 0.0, "config.loss.temperature=0.0: must be > 0"),
    ("loss.sinkhorn_reg", 0.0, "config.loss.sinkhorn_reg=0.0: must be > 0"),
    ("loss.sinkhorn_iters", -1, "config.loss.sinkhorn_iters=-1: must be >= 0"),
    ("loss.top_k", -1, "config.loss.top_k=-1: must be >= 0"),
    ("loss.num_target_crops", 3, "config.loss.num_target_crops=3: must be in [1, "
                                 "data.global_crops_number=2]; set "
                                 "--config.loss.num_target_crops=2"),
    ("optimizer.name", "adam", "config.optimizer.name='adam': must be one of 'adamw', 'sgd', "
                               "'lars'; set --config.optimizer.name=adamw"),
    ("optimizer.base_lr", -1.0, "config.optimizer.base_lr=-1.0: must be >= 0"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: must be in [0, 1)"),
    ("optimizer.clip_grad", -0.1, "config.optimizer.clip_grad=-0.1: must be >= 0"),
    ("teacher.momentum", 1.2, "config.teacher.momentum=1.2: must be in [0, 1]"),
    ("mesh.fsdp", 0, "config.mesh.fsdp=0: must be >= 1"),
    ("model.dtype", "fp16", "config.model.dtype='fp16': must be one of 'float32'"),
    ("model.patch_size", 0, "config.model.patch_size=0: must be in [1, data.global_crop_size="),
    ("model.projector.n_layers", 0, "config.model.projector.n_layers=0: must be >= 1"),
    ("knn.k", 0, "config.knn.k=0: must be >= 1"),
    ("knn.temperature", 0.0, "config.knn.temperature=0.0: must be > 0"),
    ("knn.train_fraction", 0.0, "config.knn.train_fraction=0.0: must be in (0, 1]"),
    ("knn.batch_size", 0, "config.knn.batch_size=0: must be >= 1"),
    ("ccrop.loc_interval", 0, "config.ccrop.loc_interval=0: must be >= 1"),
    ("ccrop.box_thresh", 1.0, "config.ccrop.box_thresh=1.0: must be in [0, 1)"),
    ("ccrop.alpha", 0.0, "config.ccrop.alpha=0.0: must be > 0"),
    ("ccrop.image_size", -1, "config.ccrop.image_size=-1: must be >= 0"),
    ("ccrop.batch_size", 0, "config.ccrop.batch_size=0: must be >= 1"),
]


@pytest.mark.parametrize("path,value,expected", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_value_names_the_field_and_the_range(path, value, expected):
    config = with_value(importlib.import_module("configs.vit_s").get_config(), path, value)
    with pytest.raises(ValueError) as error:
        config_checks.check_pretrain_config(config)
    assert str(error.value).startswith(expected), str(error.value)
    assert f"; set --config.{path}=" in str(error.value)


def test_cross_field_rules():
    base = importlib.import_module("configs.vit_s").get_config()
    for overrides, expected in (
            # A custom ViT's width splits into heads and into the 4 sin-cos quarters.
            (dict(vit_variant="custom", width=100, num_heads=12), "config.model.width=100: must "
             "be a positive multiple of 4 (the sin-cos position table) and of "
             "model.num_heads=12; set --config.model.width=768"),
            (dict(patch_size=128), "config.data.local_crop_size=96: must be >= "
                                   "model.patch_size=128"),
            (dict(backbone="convnet", convnet=dict(channels=(8, 16), strides=(1, 2, 2))),
             "config.model.convnet.strides=(1, 2, 2): must be one value >= 1 per entry of "
             "model.convnet.channels=(8, 16)")):
        config = base.copy_and_resolve_references()
        config.model.update(overrides)
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            config_checks.check_pretrain_config(config)
    config = with_value(base, "loss.positive_masking", True)
    with pytest.raises(ValueError, match="config.batch_size=1: must be >= 2 with "
                                         "loss.positive_masking"):
        config_checks.check_pretrain_config(with_value(config, "batch_size", 1))


def test_switched_off_sections_and_nan_lr_are_not_refused():
    config = importlib.import_module("configs.vit_s").get_config()
    config.update(knn=dict(enabled=False, k=0), ccrop=dict(enabled=False, alpha=0.0),
                  teacher=dict(enabled=False, momentum=2.0))
    config.optimizer.base_lr = float("nan")  # docs/faults.md: how a divergence is simulated
    config_checks.check_pretrain_config(config)


def test_every_suggested_value_is_accepted():
    """The `set --config.x=...` hint never proposes a value that is itself refused."""
    for name, config in shipped_pretrain_configs().items():
        for applies, rows in config_checks.RULES:
            if not applies(config):
                continue
            for path, check, suggestion in rows:
                value = suggestion(config) if callable(suggestion) else suggestion
                assert check.holds(value, config), (name, path, value)


def test_every_numeric_field_has_a_rule():
    """A numeric field added to configs/common.py needs a rule (or a place in UNCONSTRAINED)."""
    def leaves(node, kinds=None, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from leaves(value, kinds, f"{prefix}{key}.")
            elif kinds is None or isinstance(value, kinds) and not isinstance(value, bool):
                yield prefix + key

    checked = {path for _, rows in config_checks.RULES for path, _, _ in rows}
    config = importlib.import_module("configs.common").base_config()
    numeric = set(leaves(config, (int, float, tuple)))
    assert numeric - UNCONSTRAINED - checked == set()
    assert checked - set(leaves(config)) == set()  # a misspelt rule would check nothing
