"""The photometric half of the multi-crop augmentation on the accelerator, in JAX.

With `config.data.augment_on_device` the host pipeline stops after cropping, resizing and
flipping: it ships the crops as uint8 plus every crop's photometric decisions (drawn on the host
from the same stateless seeds as always, so the stream stays a pure function of (seed, step) and
resume stays exact), and the train step applies them here, batched, before the model. A host core
then makes 2.2x the images (README, "Input pipeline"), and a uint8 crop is a quarter of a float32
one to transfer.

Every op mirrors the TensorFlow op of `bam_jax.data.augment` it replaces (colour jitter in a random
order per crop, grayscale, Gaussian blur, solarisation, normalisation): with the same parameters
on the same float crop they agree within 1e-5 (`tests/test_photometric.py`). Where the result
differs from the host path is the uint8 rounding point: the host path runs the photometric ops on
the resized crop in float, this path on that crop rounded to uint8, an input difference of at
most 0.5/255 per pixel.

Branches per crop become selects here: every crop runs every op and keeps the result its
parameters ask for, which costs arithmetic but no control flow. Channel mixes are written as
elementwise sums, not matmuls, so that no backend lowers them to reduced-precision (TF32) dots.
This module imports no TensorFlow: the trainer composes it with the data pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as used by PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)
# PIL's ImageOps.solarize(threshold=128) inverts pixels >= 128 of 255.
SOLARIZE_THRESHOLD = 128.0 / 255.0

# The columns of a crop's parameter row (batch keys "global_crops_photometric" and
# "local_crops_photometric", float32 [b, N, len(PARAM_COLUMNS)]): the host's
# `augment.ViewParams` less the geometry it applied.
PARAM_COLUMNS = ("brightness", "contrast", "saturation", "hue", "jitter", "order_0", "order_1",
                 "order_2", "order_3", "grayscale", "blur_sigma", "solarize")
# The batch key of a crop stack's parameters.
PARAMS_SUFFIX = "_photometric"


def mean_std(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int):
    """The normalisation of `channels`-channel crops: ImageNet's by default, averaged to one
    value for one channel; 1 or `channels` values each."""
    mean = tuple(mean) if mean is not None else IMAGENET_MEAN
    std = tuple(std) if std is not None else IMAGENET_STD
    if channels == 1:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"config.data.mean/std need 1 or {channels} values, got {mean} / {std}")
    return mean, std


def resolve_on_device(setting: str, backend: str | None = None) -> bool:
    """`config.data.augment_on_device` ("auto", "on", "off") for a backend (default: JAX's).

    "auto" is on for accelerators, where the host's cores are the bottleneck, and off on the CPU,
    where both halves share the same cores and the TensorFlow ops cost under a third of this
    stage's CPU time per image (README, "Input pipeline").
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"config.data.augment_on_device={setting!r}; use 'auto', 'on' or 'off'")
    if setting == "auto":
        return (backend or jax.default_backend()) != "cpu"
    return setting == "on"


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the device stage needs from `config.data` besides each crop's parameters."""

    hue: float = 0.1  # 0: hue never runs (torchvision skips zero-strength adjustments)
    blur_sigma_max: float = 2.0  # the widest kernel any crop can ask for
    blur: bool = True  # whether any crop kind can be blurred
    mean: Sequence[float] | None = None  # None: ImageNet's
    std: Sequence[float] | None = None

    @classmethod
    def from_data_config(cls, data) -> "Policy":
        return cls(hue=float(data.hue), blur_sigma_max=float(data.blur_sigma[1]),
                   blur=any(p > 0 for p in data.blur_probs),
                   mean=None if data.mean is None else tuple(data.mean),
                   std=None if data.std is None else tuple(data.std))


# ---------------------------------------------------------------------------------------------
# The ops, on one float crop [H, W, C] in [0, 1] with scalar parameters (vmapped over crops).


def _mix(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """pixel @ matrix ([C, C]) for every pixel, as sums of products (see the module docstring)."""
    channels = image.shape[-1]
    out = image[..., 0:1] * matrix[0]
    for k in range(1, channels):
        out = out + image[..., k : k + 1] * matrix[k]
    return out


def _luma_matrix(channels: int) -> jax.Array:
    return jnp.tile(jnp.asarray(LUMA, jnp.float32)[:, None], (1, channels))


def mean_luma(image: jax.Array) -> jax.Array:
    """The crop's mean luma (its mean, for one channel), as `augment.adjust_contrast` takes it."""
    height, width, channels = image.shape
    luma = np.asarray(LUMA if channels == 3 else [1.0], np.float32) / (height * width)
    return jnp.sum(image * luma)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    return jnp.minimum(image * factor, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * mean_luma(image), 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
    channels = image.shape[-1]
    if channels == 1:
        return image
    matrix = factor * jnp.eye(channels) + (1.0 - factor) * _luma_matrix(channels)
    return jnp.clip(_mix(image, matrix), 0.0, 1.0)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
    """TensorFlow's AdjustHue kernel (`tf.image.adjust_hue`) step for step: hue in [0, 6) from
    the sorted channels, rotated by 6 * delta turns, rebuilt from the same max and min.
    `delta` in [-1, 1]; no-op on one channel."""
    if image.shape[-1] == 1:
        return image
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # The kernel's six cases (ties fall as its `<` / `>` comparisons send them).
    r_lt_g = r < g
    cases = [
        (r_lt_g & (b < r), g, r, b, 1),
        (r_lt_g & ~(b < r) & (b > g), b, g, r, 3),
        (r_lt_g & ~(b < r) & ~(b > g), g, b, r, 2),
        (~r_lt_g & (b < g), r, g, b, 0),
        (~r_lt_g & ~(b < g) & (b > r), b, r, g, 4),
    ]
    v_max, v_mid, v_min, category = r, b, g, jnp.full(r.shape, 5, jnp.int32)  # g < b < r
    for where, hi, mid, lo, cat in reversed(cases):
        v_max, v_mid, v_min = (jnp.where(where, hi, v_max), jnp.where(where, mid, v_mid),
                               jnp.where(where, lo, v_min))
        category = jnp.where(where, cat, category)
    flat = v_max == v_min
    ratio = (v_mid - v_min) / jnp.where(flat, 1.0, v_max - v_min)
    increase = (category & 1) == 0
    h = jnp.where(flat, 0.0, category + jnp.where(increase, ratio, 1.0 - ratio))
    h = h + delta * 6.0
    h = jnp.where(h < 0, h + 6.0, h)
    h = jnp.where(h >= 6.0, h - 6.0, h)
    category = h.astype(jnp.int32)
    ratio = h - category
    ratio = jnp.where((category & 1) == 0, ratio, 1.0 - ratio)
    v_mid = v_min + ratio * (v_max - v_min)
    table = {0: (v_max, v_mid, v_min), 1: (v_mid, v_max, v_min), 2: (v_min, v_max, v_mid),
             3: (v_min, v_mid, v_max), 4: (v_mid, v_min, v_max)}
    out_r, out_g, out_b = v_max, v_min, v_mid  # category 5
    for cat, (cr, cg, cb) in table.items():
        where = category == cat
        out_r, out_g, out_b = (jnp.where(where, cr, out_r), jnp.where(where, cg, out_g),
                               jnp.where(where, cb, out_b))
    return jnp.stack([out_r, out_g, out_b], axis=-1)


def _linear_adjustment(image: jax.Array, which, factors) -> jax.Array:
    """Brightness (0), contrast (1) or saturation (2), as one per-crop colour matrix and offset:
    each is clip(pixel @ matrix + offset), so choosing the adjustment is choosing two small
    arrays, not running all three. Equal to the separate ops (exact zeros in the matrices)."""
    channels = image.shape[-1]
    brightness, contrast, saturation = factors
    eye = jnp.eye(channels)
    saturation_matrix = (eye if channels == 1 else
                         saturation * eye + (1.0 - saturation) * _luma_matrix(channels))
    matrix = jnp.select([which == 0, which == 1], [brightness * eye, contrast * eye],
                        saturation_matrix)
    offset = jnp.where(which == 1, (1.0 - contrast) * mean_luma(image), 0.0)
    return jnp.clip(_mix(image, matrix) + offset, 0.0, 1.0)


def color_jitter(image: jax.Array, params: dict[str, jax.Array], hue_enabled: bool) -> jax.Array:
    """`augment.color_jitter` of one crop: the four adjustments in the crop's order, or the crop
    unchanged without jitter. With `hue_enabled` False (strength 0) the hue is skipped."""
    factors = (params["brightness"], params["contrast"], params["saturation"])
    out = image
    for position in range(4):
        which = params[f"order_{position}"].astype(jnp.int32)
        linear = _linear_adjustment(out, which, factors)
        rotated = adjust_hue(out, params["hue"]) if hue_enabled else out
        out = jnp.where(which == 3, rotated, linear)
    return jnp.where(params["jitter"] > 0, out, image)


def grayscale(image: jax.Array, apply) -> jax.Array:
    channels = image.shape[-1]
    if channels == 1:
        return image
    return jnp.where(apply, _mix(image, _luma_matrix(channels)), image)


def _blur_axis(image: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    """One 1-D pass of `kernel` (2R + 1 taps) along `axis`, borders mirrored with the edge
    pixel repeated (`augment._mirror_pad`)."""
    radius = (kernel.shape[0] - 1) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="symmetric")
    size = image.shape[axis]
    out = kernel[0] * jax.lax.slice_in_dim(padded, 0, size, axis=axis)
    for k in range(1, kernel.shape[0]):
        out = out + kernel[k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
    return out


def gaussian_blur(image: jax.Array, sigma, max_sigma: float) -> jax.Array:
    """`augment.gaussian_blur` of one crop with its sigma (0: unchanged).

    The kernel has the static width of `max_sigma` (the config's largest); the taps beyond this
    crop's own radius ceil(3 sigma) weigh 0, so the result is the crop's own truncated Gaussian.
    """
    height, width, _ = image.shape
    limit = min(height, width) - 1
    widest = min(math.ceil(3.0 * max_sigma), limit)
    safe = jnp.where(sigma > 0, sigma, 1.0)
    radius = jnp.minimum(jnp.ceil(3.0 * safe).astype(jnp.int32), limit)
    offsets = jnp.arange(-widest, widest + 1)
    kernel = jnp.where(jnp.abs(offsets) <= radius,
                       jnp.exp(-0.5 * jnp.square(offsets.astype(jnp.float32) / safe)), 0.0)
    kernel = kernel / jnp.sum(kernel)
    blurred = _blur_axis(_blur_axis(image, kernel, 0), kernel, 1)
    return jnp.where(sigma > 0, blurred, image)


def solarize(image: jax.Array, apply) -> jax.Array:
    return jnp.where((image >= SOLARIZE_THRESHOLD) & apply, 1.0 - image, image)


def normalize(image: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(image - mean) * (1 / std), with 1 / std rounded to float32 first as `augment.normalize`."""
    inv_std = 1.0 / np.asarray(std, np.float32)
    return (image - np.asarray(mean, np.float32)) * inv_std


def augment_crop(image: jax.Array, params: dict[str, jax.Array], policy: Policy) -> jax.Array:
    """`augment.augment_views` of one float crop [H, W, C] in [0, 1]: jitter, grayscale, blur,
    solarisation, normalisation."""
    image = color_jitter(image, params, policy.hue > 0)
    image = grayscale(image, params["grayscale"] > 0)
    if policy.blur:
        image = gaussian_blur(image, params["blur_sigma"], policy.blur_sigma_max)
    image = solarize(image, params["solarize"] > 0)
    return normalize(image, *mean_std(policy.mean, policy.std, image.shape[-1]))


def augment_crops(crops: jax.Array, params: jax.Array, policy: Policy) -> jax.Array:
    """uint8 crops [..., H, W, C] and their parameter rows [..., len(PARAM_COLUMNS)] -> the
    augmented, normalised float32 crops. The uint8 -> [0, 1] scaling is x / 255."""
    lead = crops.shape[:-3]
    flat = crops.reshape((-1, *crops.shape[-3:])).astype(jnp.float32) / 255.0
    rows = params.reshape((-1, len(PARAM_COLUMNS)))
    columns = {name: rows[:, i] for i, name in enumerate(PARAM_COLUMNS)}
    out = jax.vmap(lambda image, p: augment_crop(image, p, policy))(flat, columns)
    return out.reshape((*lead, *out.shape[1:]))


def identity_params(lead_shape: tuple[int, ...]) -> np.ndarray:
    """Parameter rows [*lead_shape, len(PARAM_COLUMNS)] that change nothing but normalise (a
    synthetic batch's: the stage costs the same whatever the parameters, as every op runs)."""
    row = np.zeros(len(PARAM_COLUMNS), np.float32)
    row[[PARAM_COLUMNS.index(c) for c in ("brightness", "contrast", "saturation")]] = 1.0
    row[[PARAM_COLUMNS.index(f"order_{i}") for i in range(4)]] = range(4)
    return np.broadcast_to(row, (*lead_shape, len(PARAM_COLUMNS))).copy()


def augment_batch(batch: dict[str, jax.Array], policy: Policy) -> dict[str, jax.Array]:
    """A train batch as the model takes it: every crop stack that came with its parameters
    (key + PARAMS_SUFFIX) augmented, the parameters dropped; a batch the host already augmented
    passes through unchanged."""
    out = {k: v for k, v in batch.items() if not k.endswith(PARAMS_SUFFIX)}
    for key in ("global_crops", "local_crops"):
        if key + PARAMS_SUFFIX in batch:
            out[key] = augment_crops(batch[key], batch[key + PARAMS_SUFFIX], policy)
    return out
