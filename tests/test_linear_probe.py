"""Linear probe: the head learns separable features; end to end from a workdir, with resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bam_jax import sharding, train
from bam_jax.evals import linear_probe
from configs import linear, linear_default


def tiny_probe_config(pretrained_workdir, steps=4):
    config = linear_default.get_config()
    config.pretrained_workdir = pretrained_workdir
    config.num_train_steps = steps
    config.batch_size = 32
    config.eval_batch_size = 200
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
    return config


def test_linear_config_follows_the_official_linear_slurm():
    config = linear.get_config()
    assert config.batch_size == 1024 and config.num_epochs == 100
    assert config.optimizer.base_lr == 0.002 and config.optimizer.name == "sgd"
    assert config.optimizer.momentum == 0.9 and config.optimizer.weight_decay == 0.0
    assert (config.n_last_blocks, config.avgpool, config.bn_head, config.use_teacher) == (
        1, True, True, True)
    assert config.pretrain.model.vit_variant == "base"
    assert tuple(config.data.global_crops_scale) == (0.08, 1.0)


def test_head_and_optimizer_learn_linearly_separable_features():
    rng = np.random.default_rng(0)
    num_classes, dim, n = 4, 16, 512
    centres = 3.0 * rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    features = (centres[labels] + rng.normal(size=(n, dim)) + 5.0).astype(np.float32)
    batch = {"image": jnp.asarray(features), "label": jnp.asarray(labels, jnp.int32)}

    config = linear_default.get_config()
    create_head = lambda: linear_probe.LinearHead(dim, num_classes, bn_head=True,  # noqa: E731
                                                  rngs=nnx.Rngs(0))
    graphdef = nnx.split(nnx.eval_shape(create_head))[0]
    optimizer = train.make_optimizer(config)
    state = train.init_state(create_head, optimizer, use_teacher=False)
    step = jax.jit(linear_probe.make_train_step(
        config, lambda backbone, x: x, graphdef, optimizer,
        train.cosine_schedule(0.5, 0.0, 60), num_classes))
    for _ in range(60):
        state, metrics = step(state, None, batch)
    head = nnx.merge(graphdef, state.params, state.model_state)
    top1, _ = linear_probe.topk_hits(head(batch["image"], train=False), batch["label"], 2)
    assert float(metrics["loss"]) < 0.2
    assert float(top1.mean()) > 0.97  # eval mode: the BatchNorm's running statistics


def test_probe_end_to_end_resumes_and_reports(pretrained, tmp_path, capsys, damage_checkpoint):
    workdir = str(tmp_path / "probe")
    result = linear_probe.train_linear(tiny_probe_config(pretrained), workdir)
    assert result["step"] == 4
    assert 0.0 <= result["linear_top1"] <= result["linear_top5"] <= 100.0
    # Accuracies over the 1,000 held-out digits, above chance (10 % / 50 %) after 4 steps.
    for key in ("linear_top1", "linear_top5"):
        assert abs(result[key] * 10 - round(result[key] * 10)) < 1e-6, result
    assert result["linear_top1"] > 12.0 and result["linear_top5"] > 52.0, result
    assert "teacher of step 2" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    again = linear_probe.train_linear(tiny_probe_config(pretrained, steps=6), workdir)
    assert again["step"] == 6
    assert "resumed from the checkpoint of step 4" in capsys.readouterr().out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["linear_best_top1"] == max(r["linear_top1"] for r in rows
                                               if "linear_top1" in r)

    # As pretraining: unreadable checkpoints are never silently replaced by a fresh head.
    for step in ("4", "6"):
        damage_checkpoint(os.path.join(workdir, "checkpoints", step))
    with pytest.raises(ValueError, match=r"none of the checkpoints \[4, 6\]"):
        linear_probe.train_linear(tiny_probe_config(pretrained, steps=8), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]


def test_no_pretrained_workdir_is_one_clear_error(tmp_path):
    # A pretrained workdir without a checkpoint: test_faults.py::test_linear_probe_without_a_checkpoint.
    config = tiny_probe_config("")
    with pytest.raises(ValueError, match="pretrained_workdir=DIR"):
        linear_probe.train_linear(config, str(tmp_path / "probe"))
    assert not (tmp_path / "probe").exists()


def test_backbone_runs_in_float32_whatever_the_pretraining_dtype():
    config = linear_default.get_config()
    config.random_init = True
    config.pretrain.model.update(backbone="vit", vit_variant="custom", width=32, depth=2,
                                 num_heads=2, patch_size=4, dtype="bfloat16")
    config.mesh.num_devices = 1
    graphdef, backbone, _ = linear_probe.pretrained_backbone(config, sharding.make_mesh(config))
    images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    probe = linear_probe.make_feature_fn(config, graphdef)(backbone, images)

    def features(dtype):
        pretrain = config.pretrain.copy_and_resolve_references()
        pretrain.model.dtype = dtype
        model = train.run_model_factory(pretrain)()
        nnx.update(model, backbone[0])
        return model.backbone.features(images, n_last_blocks=config.n_last_blocks,
                                       avgpool=config.avgpool)

    np.testing.assert_array_equal(probe, features("float32"))
    assert np.abs(np.asarray(probe) - np.asarray(features("bfloat16"))).max() > 1e-4
