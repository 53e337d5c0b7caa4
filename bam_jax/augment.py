"""DINO/BAM multi-crop augmentation as pure TensorFlow ops.

Everything here runs inside `tf.data.Dataset.map` (no PIL, no Python per image) and draws its
randomness from stateless ops keyed by an explicit `seed` (a shape-[2] integer tensor), so the same
seed always gives the same crops: this is what makes the input stream reproducible and resumable.

The recipe follows the official `DataAugmentationDINO` used by BAM: RandomResizedCrop (bicubic,
antialiased like PIL), horizontal flip, colour jitter (fixed order, see `color_jitter`), random
grayscale, Gaussian blur, solarisation (second global crop only) and mean/std normalisation.
Images are float32 in [0, 1] between ops; the photometric ops accept one or three channels (on
one channel the ops that need colour - saturation, hue, grayscale - are no-ops).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as used by PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# PIL's ImageOps.solarize(threshold=128) inverts pixels >= 128 of 255.
_SOLARIZE_THRESHOLD = 128.0 / 255.0


@dataclasses.dataclass(frozen=True)
class CropPolicy:
    """What differs between crop kinds (global 1, global 2, local) in the DINO recipe."""

    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float = 0.0
    antialias: bool = True  # PIL-like; False resizes ~2x faster at the price of aliasing


@dataclasses.dataclass(frozen=True)
class PhotometricPolicy:
    """Ops shared by every crop kind; defaults are DataAugmentationDINO's."""

    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
    """Returns `num` independent seeds (shape [num, 2]) derived from one seed."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


def _uniform(seed: tf.Tensor, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


def _coin(seed: tf.Tensor, prob: float) -> tf.Tensor:
    """A stateless Bernoulli(prob) draw as a scalar bool tensor."""
    return _uniform(seed) < prob


# ---------------------------------------------------------------------------------------------
# Geometry.


def random_resized_crop_windows(
    seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    scales: Sequence[Sequence[float]],
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tf.Tensor:
    """Samples one RandomResizedCrop window per entry of `scales`: int32 [n, 4] of (y, x, h, w).

    Per window, like torchvision: up to `attempts` (area, log-aspect) proposals, the first that
    fits is used, else the centre crop with the aspect ratio clamped to `ratio`. All windows of an
    image are drawn in one vectorised pass, because per-crop small ops dominate tf.data's cost.
    """
    n = len(scales)
    scales = tf.constant(scales, tf.float32)[:, None, :]
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    u = _uniform(seed, [n, attempts + 1, 2])
    target_area = h * w * (scales[..., 0] + u[:, :-1, 0] * (scales[..., 1] - scales[..., 0]))
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_r0 + u[:, :-1, 1] * (log_r1 - log_r0))
    crop_w = tf.round(tf.sqrt(target_area * aspect))
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)[:, None]
    found = tf.reduce_any(fits, axis=1)

    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    ch = tf.where(found, tf.gather(crop_h, first, batch_dims=1)[:, 0], fallback_h)
    cw = tf.where(found, tf.gather(crop_w, first, batch_dims=1)[:, 0], fallback_w)
    pos = u[:, -1]  # the last draw places the window
    y = tf.where(found, tf.floor(pos[:, 0] * (h - ch + 1)), tf.floor((h - ch) / 2))
    x = tf.where(found, tf.floor(pos[:, 1] * (w - cw + 1)), tf.floor((w - cw) / 2))
    return tf.cast(tf.stack([y, x, ch, cw], axis=1), tf.int32)


def resize_bicubic(image: tf.Tensor, size: int, antialias: bool = True) -> tf.Tensor:
    """Bicubic resize to [size, size] (antialiased: PIL's BICUBIC), output float32 in [0, 1].

    uint8 input is taken as 0..255; the bicubic overshoot is clipped, as PIL's uint8 output is.
    """
    scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
    out = tf.image.resize(image, [size, size], method="bicubic", antialias=antialias)
    return tf.clip_by_value(out * scale, 0.0, 1.0)


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tf.Tensor:
    """RandomResizedCrop of an [H, W, C] image (uint8 or float in [0, 1]) to float [size, size, C]."""
    shape = tf.shape(image)
    window = random_resized_crop_windows(seed, shape[0], shape[1], [scale], ratio)[0]
    return crop_and_resize(image, window, size)


def crop_and_resize(
    image: tf.Tensor, window: tf.Tensor, size: int, antialias: bool = True
) -> tf.Tensor:
    """Crops the (y, x, h, w) `window` of an [H, W, C] image and resizes it to [size, size]."""
    y, x, h, w = tf.unstack(window)
    return resize_bicubic(image[y : y + h, x : x + w], size, antialias)


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
    """Horizontal flip with probability `prob`."""
    return tf.cond(_coin(seed, prob), lambda: tf.reverse(image, axis=[1]), lambda: image)


# ---------------------------------------------------------------------------------------------
# Photometric ops on float [H, W, C] images in [0, 1].


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma as [H, W, 1]; a one-channel image is returned as is."""
    if image.shape[-1] == 1:
        return image
    return tf.tensordot(image, tf.constant(_LUMA, image.dtype), axes=[[-1], [0]])[..., None]


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blends with the mean luma of the whole image (torchvision), not TF's per-channel mean."""
    mean = tf.reduce_mean(to_grayscale(image))
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blends with the grayscale image (torchvision), not TF's HSV scaling; no-op on one channel."""
    if image.shape[-1] == 1:
        return image
    return tf.clip_by_value(factor * image + (1.0 - factor) * to_grayscale(image), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """Rotates hue by `delta` turns (torchvision's hue_factor); no-op on one channel."""
    if image.shape[-1] == 1:
        return image
    return tf.image.adjust_hue(image, delta)


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> tf.Tensor:
    """torchvision ColorJitter's four adjustments with uniform factors, in a fixed order.

    torchvision draws a random order per call. Here the order is fixed (brightness, contrast,
    saturation, hue): any data-dependent order needs a switch over the adjustments, and tf.data
    runs lowered control flow at a cost proportional to the ops of all branches, taken or not;
    measured, a random order (4 slots x 4 branches) costs ~0.6 ms per crop, half the throughput.
    """
    u = _uniform(seed, [4])
    if brightness > 0:
        image = adjust_brightness(image, tf.maximum(1.0 - brightness + 2.0 * brightness * u[0], 0.0))
    if contrast > 0:
        image = adjust_contrast(image, tf.maximum(1.0 - contrast + 2.0 * contrast * u[1], 0.0))
    if saturation > 0:
        image = adjust_saturation(image, tf.maximum(1.0 - saturation + 2.0 * saturation * u[2], 0.0))
    if hue > 0:
        image = adjust_hue(image, -hue + 2.0 * hue * u[3])
    return image


def random_color_jitter(image: tf.Tensor, seed: tf.Tensor, prob: float, **strengths) -> tf.Tensor:
    """ColorJitter applied with probability `prob` (torchvision RandomApply)."""
    coin_seed, jitter_seed = tf.unstack(split_seed(seed, 2))
    return tf.cond(
        _coin(coin_seed, prob),
        lambda: color_jitter(image, jitter_seed, **strengths),
        lambda: image,
    )


def random_grayscale(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.2) -> tf.Tensor:
    """Grayscale kept at the input's channel count, with probability `prob`; no-op on one channel."""
    if image.shape[-1] == 1:
        return image
    channels = image.shape[-1]
    return tf.cond(
        _coin(seed, prob),
        lambda: tf.repeat(to_grayscale(image), channels, axis=-1),
        lambda: image,
    )


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Separable Gaussian blur of an [H, W, C] image, standard deviation `sigma` pixels.

    The kernel is truncated at ceil(3 sigma) (so small sigmas cost less) and the borders are
    mirrored, like PIL's edge handling keeps the image brightness at the borders.
    """
    # Mirror padding needs radius < side, which only binds for crops of a few pixels.
    shape = tf.shape(image)
    max_radius = tf.minimum(shape[0], shape[1]) - 1
    radius = tf.minimum(tf.cast(tf.math.ceil(3.0 * sigma), tf.int32), max_radius)
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = image.shape[-1]
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    column = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])
    row = tf.tile(kernel[None, :, None, None], [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, column, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, row, [1, 1, 1, 1], "VALID")
    return tf.ensure_shape(out[0], image.shape)


def random_gaussian_blur(
    image: tf.Tensor, seed: tf.Tensor, prob: float, sigma: Sequence[float] = (0.1, 2.0)
) -> tf.Tensor:
    """Gaussian blur with probability `prob` and sigma ~ U[sigma] (PIL's radius is sigma)."""
    if prob <= 0:
        return image
    coin_seed, sigma_seed = tf.unstack(split_seed(seed, 2))
    s = _uniform(sigma_seed, (), sigma[0], sigma[1])
    return tf.cond(_coin(coin_seed, prob), lambda: gaussian_blur(image, s), lambda: image)


def solarize(image: tf.Tensor) -> tf.Tensor:
    return tf.where(image >= _SOLARIZE_THRESHOLD, 1.0 - image, image)


def random_solarize(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
    """Solarisation (threshold 128/255) with probability `prob`."""
    if prob <= 0:
        return image
    return tf.cond(_coin(seed, prob), lambda: solarize(image), lambda: image)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per channel; one value broadcasts over all channels."""
    mean = tf.constant(mean, tf.float32)
    inv_std = 1.0 / tf.constant(std, tf.float32)
    return (image - mean) * inv_std


# ---------------------------------------------------------------------------------------------
# The recipe.


def augment_crop(
    image: tf.Tensor,
    window: tf.Tensor,
    seed: tf.Tensor,
    crop: CropPolicy,
    photo: PhotometricPolicy,
) -> tf.Tensor:
    """One DINO view of a decoded [H, W, C] image: crop `window` (y, x, h, w), then flip, jitter,
    grayscale, blur, solarize and normalise with randomness from `seed`."""
    seeds = tf.unstack(split_seed(seed, 5))
    view = crop_and_resize(image, window, crop.size, crop.antialias)
    view = random_flip(view, seeds[0], photo.flip_prob)
    view = random_color_jitter(
        view,
        seeds[1],
        photo.color_jitter_prob,
        brightness=photo.brightness,
        contrast=photo.contrast,
        saturation=photo.saturation,
        hue=photo.hue,
    )
    view = random_grayscale(view, seeds[2], photo.grayscale_prob)
    view = random_gaussian_blur(view, seeds[3], crop.blur_prob, photo.blur_sigma)
    view = random_solarize(view, seeds[4], crop.solarize_prob)
    return normalize(view, photo.mean, photo.std)


def multi_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    crops: Sequence[CropPolicy],
    photo: PhotometricPolicy,
) -> list[tf.Tensor]:
    """All views of one image, each from its own sub-seed, in the order of `crops`."""
    window_seed, *seeds = tf.unstack(split_seed(seed, len(crops) + 1))
    shape = tf.shape(image)
    windows = random_resized_crop_windows(
        window_seed, shape[0], shape[1], [c.scale for c in crops], photo.ratio)
    return [augment_crop(image, windows[i], s, c, photo) for i, (s, c) in enumerate(zip(seeds, crops))]


def center_crop_eval(
    image: tf.Tensor,
    resize: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tf.Tensor:
    """Evaluation view: shorter side bicubic-resized to `resize`, centre `crop_size`, normalised."""
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    short = tf.minimum(h, w)
    new_h = tf.cast(tf.floor(h * resize / short), tf.int32)  # torchvision truncates
    new_w = tf.cast(tf.floor(w * resize / short), tf.int32)
    scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bicubic", antialias=True)
    resized = tf.clip_by_value(resized * scale, 0.0, 1.0)
    top = (new_h - crop_size) // 2
    left = (new_w - crop_size) // 2
    view = resized[top : top + crop_size, left : left + crop_size]
    view = tf.ensure_shape(view, [crop_size, crop_size, image.shape[-1]])
    return normalize(view, mean, std)
