"""The pretraining config's values, checked before a run does any work.

Unchecked, a bad value fails late and far from its cause: a zero `log_every_steps` raises
ZeroDivisionError after minutes of compilation, a zero crop size fails inside traced TensorFlow
code with no message, a negative batch is blamed on the process count. `check_pretrain_config`
runs first (in `bam_jax.main` and `train.train_and_evaluate`) and names the first bad field, the
values it accepts and a flag that fixes it. The rules are a table: one row per field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

ConfigDict = ml_collections.ConfigDict


class Check(NamedTuple):
    """What a field accepts: `requirement` completes "must be ..." (formatted with the config as
    `c`, so it can quote another field) and `holds(value, config)` tests it."""
    requirement: str
    holds: Callable[[Any, ConfigDict], bool]


def at_least(low) -> Check:
    return Check(f">= {low}", lambda v, c: v >= low)


def above(low) -> Check:
    return Check(f"> {low}", lambda v, c: v > low)


def within(low, high, *, open_low: bool = False, open_high: bool = False) -> Check:
    def holds(v, c):
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return Check(f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}", holds)


def one_of(*names: str) -> Check:
    return Check("one of " + ", ".join(map(repr, names)), lambda v, c: v in names)


def pair(each: Check) -> Check:
    """A (low, high) range, as the crop scales and the blur sigmas."""
    return Check(f"a pair (low, high) with low <= high, each {each.requirement}",
                 lambda v, c: len(v) == 2 and v[0] <= v[1] and all(each.holds(x, c) for x in v))


def sequence(each: Check, length: int | None = None) -> Check:
    count = str(length) if length else "1 or more"
    return Check(f"{count} values, each {each.requirement}",
                 lambda v, c: (len(v) == length if length else len(v) > 0)
                 and all(each.holds(x, c) for x in v))


PROBABILITY = within(0, 1)
SCALE = within(0, 1, open_low=True)
DTYPES = one_of("float32", "bfloat16", "float16")

# (applies to the config?, [(field, check, a value to suggest, or a function of the config)]).
# Sections that are switched off are not checked: their values are never read.
Rows = list[tuple[str, Check, Any]]
RULES: list[tuple[Callable[[ConfigDict], bool], Rows]] = [
    (lambda c: True, [
        ("seed", at_least(0), 0),  # numpy draws the kNN bank with it
        ("batch_size", at_least(1), 256),
        ("num_epochs", at_least(0), 400),
        ("num_train_steps", Check(">= 1, or -1 to train num_epochs",
                                  lambda v, c: v == -1 or v >= 1), -1),
        ("log_every_steps", at_least(1), 50),
        ("checkpoint_every_steps", at_least(1), 1000),
        ("keep_checkpoints", at_least(1), 3),
        ("stop_check_every_steps", at_least(1), 10),
        ("data.source", one_of("mnist_bundled", "tfds", "folder"), "tfds"),
        ("data.global_crops_number", at_least(1), 2),
        ("data.global_crop_size", at_least(1), 224),
        ("data.global_crops_scale", pair(SCALE), (0.25, 1.0)),
        ("data.local_crops_number", at_least(0), 6),
        ("data.local_crop_size",
         Check("in [1, data.global_crop_size={c.data.global_crop_size}]",
               lambda v, c: 1 <= v <= c.data.global_crop_size),
         lambda c: c.data.global_crop_size * 3 // 7),  # 96 for 224: the official ratio
        ("data.local_crops_scale", pair(SCALE), (0.05, 0.25)),
        ("data.flip_prob", PROBABILITY, 0.5),
        ("data.color_jitter_prob", PROBABILITY, 0.8),
        ("data.brightness", at_least(0), 0.4),
        ("data.contrast", at_least(0), 0.4),
        ("data.saturation", at_least(0), 0.4),
        ("data.hue", within(0, 0.5), 0.1),
        ("data.grayscale_prob", PROBABILITY, 0.2),
        ("data.blur_probs", sequence(PROBABILITY, 3), (1.0, 0.1, 0.5)),
        ("data.blur_sigma", pair(above(0)), (0.1, 2.0)),
        ("data.solarize_prob", PROBABILITY, 0.2),
        ("data.augment_on_device", one_of("auto", "on", "off"), "auto"),
        ("data.eval_crop_size", at_least(1), 224),
        ("data.eval_resize", Check(">= data.eval_crop_size={c.data.eval_crop_size}",
                                   lambda v, c: v >= c.data.eval_crop_size),
         lambda c: c.data.eval_crop_size * 8 // 7),  # 256 for 224
        ("data.std", Check("None (ImageNet's) or positive numbers",
                           lambda v, c: v is None or sequence(above(0)).holds(v, c)),
         (0.229, 0.224, 0.225)),
        ("data.shuffle_buffer", at_least(1), 16_384),
        ("data.threadpool_size", at_least(0), 0),
        ("loss.num_target_crops",
         Check("in [1, data.global_crops_number={c.data.global_crops_number}]",
               lambda v, c: 1 <= v <= c.data.global_crops_number),
         lambda c: c.data.global_crops_number),
        ("loss.sinkhorn_reg", above(0), 0.05),
        ("loss.sinkhorn_reg_final", above(0), 0.05),
        ("loss.sinkhorn_reg_ramp_epochs", at_least(0), 30),
        ("loss.temperature", above(0), 0.1),
        ("loss.sinkhorn_iters", at_least(0), 3),
        ("loss.top_k", Check(">= 0 (0 keeps every column)", lambda v, c: v >= 0), 128),
        ("optimizer.name", one_of("adamw", "sgd", "lars"), "adamw"),
        # NaN passes: it is the documented way to exercise the non-finite-loss guard, which
        # stops the run with its own message (docs/faults.md).
        ("optimizer.base_lr", Check(">= 0", lambda v, c: not v < 0), 3e-4),
        ("optimizer.min_lr", at_least(0), 1e-3),
        ("optimizer.warmup_epochs", at_least(0), 40),
        ("optimizer.weight_decay", at_least(0), 0.04),
        ("optimizer.weight_decay_final", at_least(0), 0.4),
        ("optimizer.clip_grad", Check(">= 0 (0 disables clipping)", lambda v, c: v >= 0), 0.3),
        ("optimizer.b1", within(0, 1, open_high=True), 0.9),
        ("optimizer.b2", within(0, 1, open_high=True), 0.999),
        ("optimizer.momentum", PROBABILITY, 0.9),
        ("mesh.num_devices", Check(">= 0 (0: all devices)", lambda v, c: v >= 0), 0),
        ("mesh.fsdp", at_least(1), 1),
        ("model.backbone", one_of("vit", "caformer", "convnet", "pixels"), "vit"),
        ("model.dtype", DTYPES, "bfloat16"),
        ("model.param_dtype", DTYPES, "float32"),
        ("model.projector.n_layers", at_least(1), 3),
        ("model.projector.hidden_dim", at_least(1), 4096),
        ("model.projector.out_dim", at_least(1), 4096),
        ("model.projector.act", one_of("gelu", "relu"), "gelu"),
    ]),
    (lambda c: c.loss.positive_masking, [
        ("batch_size", Check(">= 2 with loss.positive_masking (an image's own column is masked)",
                             lambda v, c: v >= 2), 256),
    ]),
    (lambda c: c.model.backbone == "vit", [
        ("model.vit_variant", one_of("tiny", "small", "base", "large", "custom"), "small"),
        ("model.patch_size", Check("in [1, data.global_crop_size={c.data.global_crop_size}]",
                                   lambda v, c: 1 <= v <= c.data.global_crop_size), 16),
        ("model.mlp_ratio", above(0), 4.0),
        ("model.drop_path_rate", within(0, 1, open_high=True), 0.0),
    ]),
    (lambda c: c.model.backbone == "vit" and c.data.local_crops_number > 0, [
        ("data.local_crop_size", Check(">= model.patch_size={c.model.patch_size} (a ViT needs "
                                       "one patch)", lambda v, c: v >= c.model.patch_size), 96),
    ]),
    (lambda c: c.model.backbone == "vit" and c.model.vit_variant == "custom", [
        ("model.depth", at_least(1), 12),
        ("model.num_heads", at_least(1), 12),
        ("model.width", Check("a positive multiple of 4 (the sin-cos position table) and of "
                              "model.num_heads={c.model.num_heads}",
                              lambda v, c: v > 0 and v % 4 == 0 and v % c.model.num_heads == 0),
         lambda c: 64 * c.model.num_heads),
    ]),
    (lambda c: c.model.backbone == "caformer", [
        ("model.caformer.variant", one_of("s18", "s36", "m36", "b36", "custom"), "m36"),
        ("model.caformer.act", one_of("gelu", "starrelu"), "gelu"),
        ("model.caformer.remat_every", Check(">= 0 (0: no remat)", lambda v, c: v >= 0), 4),
        ("model.drop_path_rate", within(0, 1, open_high=True), 0.0),
    ]),
    (lambda c: c.model.backbone == "caformer" and c.model.caformer.variant == "custom", [
        ("model.caformer.depths", sequence(at_least(1), 4), (3, 12, 18, 3)),
        ("model.caformer.dims", sequence(at_least(1), 4), (96, 192, 384, 576)),
    ]),
    (lambda c: c.model.backbone == "convnet", [
        ("model.convnet.channels", sequence(at_least(1)), (32, 64, 128, 256)),
        ("model.convnet.strides",
         Check("one value >= 1 per entry of model.convnet.channels={c.model.convnet.channels}",
               lambda v, c: len(v) == len(c.model.convnet.channels) and min(v) >= 1),
         lambda c: (1,) * len(c.model.convnet.channels)),
        ("model.convnet.norm", one_of("batch", "group"), "batch"),
    ]),
    (lambda c: c.teacher.enabled, [
        ("teacher.momentum", PROBABILITY, 0.995),
        ("teacher.momentum_final", PROBABILITY, 1.0),
    ]),
    (lambda c: c.knn.enabled, [
        ("knn.k", at_least(1), 20),
        ("knn.temperature", above(0), 0.07),
        ("knn.train_fraction", SCALE, 0.1),
        ("knn.batch_size", at_least(1), 1024),
        ("knn.every_epochs", Check(">= 0 (0: at the end only)", lambda v, c: v >= 0), 16),
    ]),
    (lambda c: c.ccrop.enabled, [
        ("ccrop.loc_interval", at_least(1), 40),
        ("ccrop.box_thresh", within(0, 1, open_high=True), 0.1),
        ("ccrop.alpha", above(0), 0.6),
        ("ccrop.image_size", Check(">= 0 (0: data.global_crop_size)", lambda v, c: v >= 0), 0),
        ("ccrop.batch_size", at_least(1), 1024),
    ]),
    (lambda c: c.ccrop.enabled and c.model.backbone == "vit", [
        ("ccrop.image_size", Check("0 (data.global_crop_size) or >= model.patch_size="
                                   "{c.model.patch_size}",
                                   lambda v, c: v == 0 or v >= c.model.patch_size), 0),
    ]),
]

_MISSING = object()


def check_pretrain_config(config: ConfigDict) -> None:
    """Raises ValueError naming the first field whose value the run cannot use.

    A field the config lacks is skipped: the code that reads it reports that itself.
    """
    for applies, rows in RULES:
        if not applies(config):
            continue
        for path, check, suggestion in rows:
            value = _lookup(config, path)
            if value is _MISSING or _holds(check, value, config):
                continue
            if callable(suggestion):
                suggestion = suggestion(config)
            raise ValueError(f"config.{path}={value!r}: must be "
                             f"{check.requirement.format(c=config)}; set "
                             f"--config.{path}={_as_flag(suggestion)}")


def _lookup(config: ConfigDict, path: str) -> Any:
    node = config
    for name in path.split("."):
        node = getattr(node, name, _MISSING)
        if node is _MISSING:
            break
    return node


def _holds(check: Check, value: Any, config: ConfigDict) -> bool:
    """A value of the wrong kind (a number where a pair belongs) fails instead of raising."""
    try:
        return bool(check.holds(value, config))
    except (TypeError, ValueError):
        return False


def _as_flag(value: Any) -> str:
    """How the value is written after --config.x= in a shell (a tuple needs quotes)."""
    return f"'{value}'" if isinstance(value, tuple) else str(value)
