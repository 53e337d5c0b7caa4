"""DINO/BAM multi-crop augmentation as pure TensorFlow ops.

Everything here runs inside `tf.data.Dataset.map` (no PIL, no Python per image) and draws its
randomness from stateless ops keyed by an explicit `seed` (a shape-[2] integer tensor), so the same
seed always gives the same crops: this is what makes the input stream reproducible and resumable.

The recipe follows the official `DataAugmentationDINO` used by BAM: RandomResizedCrop (bicubic,
antialiased like PIL), horizontal flip, colour jitter (fixed order, see `color_jitter`), random
grayscale, Gaussian blur, solarisation (second global crop only) and mean/std normalisation.
Images are float32 in [0, 1] between ops; the photometric ops accept one or three channels (on
one channel the ops that need colour - saturation, hue, grayscale - are no-ops).

Speed shapes the layout: in tf.data each TensorFlow op costs microseconds of overhead whatever
its size, so all random decisions of an image's views are drawn at once (`sample_view_params`)
and the photometric ops run on a stack of crops [N, H, W, C] (static shape) with one parameter
per crop, where crops that skip a cheap op get identity parameters instead of a branch each; the
two costly ops, hue and blur, branch per crop. The input pipeline runs every TensorFlow op on
one thread (see `input_pipeline`), which is what these choices were measured under.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np
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


def _uniform(seed: tf.Tensor, shape) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed)


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


def _resize_rows(image: tf.Tensor, size) -> tf.Tensor:
    """Antialiased bicubic resize of the first axis of [L, M, C] to `size`.

    The [L, M*C] view makes every output row one weighted sum of whole input rows, which
    TensorFlow's ScaleAndTranslate kernel vectorises well (on [L, M] with 3 channels it does not).
    """
    shape = tf.shape(image)
    length, other, channels = shape[0], shape[1], image.shape[-1]
    scale = tf.stack([tf.cast(size, tf.float32) / tf.cast(length, tf.float32), 1.0])
    rows = tf.raw_ops.ScaleAndTranslate(
        images=tf.reshape(image, [1, length, 1, other * channels]), size=tf.stack([size, 1]),
        scale=scale, translation=[0.0, 0.0], kernel_type="keyscubic", antialias=True)
    return tf.reshape(rows, [size, other, channels])


def _resize_transposed(image_t: tf.Tensor, size, antialias: bool) -> tf.Tensor:
    """`resize_bicubic` of an image given transposed, as [W, H, C]; returns [out_h, out_w, C]."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    scale = 1.0 / 255.0 if image_t.dtype == tf.uint8 else 1.0
    if antialias:
        # The kernel reads float input faster than uint8.
        columns = _resize_rows(tf.cast(image_t, tf.float32), out_w)  # [out_w, H, C]
        out = _resize_rows(tf.transpose(columns, [1, 0, 2]), out_h)  # [out_h, out_w, C]
    else:
        out = tf.image.resize(tf.transpose(image_t, [1, 0, 2]), [out_h, out_w], method="bicubic")
    return tf.clip_by_value(out * scale, 0.0, 1.0)


def resize_bicubic(image: tf.Tensor, size, antialias: bool = True) -> tf.Tensor:
    """Bicubic resize of [H, W, C] to `size` (an int, or (height, width)), float32 in [0, 1].

    Antialiased, this is PIL's BICUBIC. uint8 input is taken as 0..255; the bicubic overshoot is
    clipped, as PIL's uint8 output is. The result equals `tf.image.resize(..., "bicubic",
    antialias=antialias)`; antialiased, it is computed as two 1-D passes (see `_resize_rows`),
    2-3x faster than the 2-D kernel.
    """
    return _resize_transposed(tf.transpose(image, [1, 0, 2]), size, antialias)


def crop_and_resize(
    image_t: tf.Tensor, window: tf.Tensor, size: int, antialias: bool = True, flip=False
) -> tf.Tensor:
    """The (y, x, h, w) `window` of an image given transposed ([W, H, C]), resized to
    [size, size, C] and mirrored left-right where `flip` (a bool tensor) is true.

    The transposed layout makes the crop's columns whole rows: one gather picks them, in
    reversed order for a flip, so the flip costs nothing and needs no branch.
    """
    y, x, h, w = tf.unstack(window)
    steps = tf.range(w)
    columns = x + tf.where(flip, w - 1 - steps, steps)
    return _resize_transposed(tf.gather(image_t, columns)[:, y : y + h], size, antialias)


# ---------------------------------------------------------------------------------------------
# Photometric ops on a stack of crops, float [N, H, W, C] in [0, 1], with one parameter per crop.


def _per_crop(values: tf.Tensor) -> tf.Tensor:
    return tf.reshape(values, [-1, 1, 1, 1])


def _channel_mix(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
    """Applies a [N, C, C] colour matrix to each crop: one batched matmul, where TensorFlow's
    broadcasting of a [H, W, 1] plane over [H, W, 3] would be several times slower."""
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1, images.shape[-1]])
    return tf.reshape(tf.matmul(flat, matrices), shape)


def _luma_matrix(channels: int) -> tf.Tensor:
    """[C, C] matrix mapping a pixel to its luma in every channel."""
    return tf.tile(tf.constant(_LUMA, tf.float32)[:, None], [1, channels])


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """Luma as [..., 1]; one channel is returned as is."""
    if images.shape[-1] == 1:
        return images
    return tf.tensordot(images, tf.constant(_LUMA, images.dtype), axes=[[-1], [0]])[..., None]


def adjust_brightness(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Scales each crop by its factor (>= 0, so only the top needs clipping)."""
    return tf.minimum(images * _per_crop(factor), 1.0)


def adjust_contrast(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blends each crop with its mean luma (torchvision), not TF's per-channel mean.

    The mean luma is one matrix-vector product of the flattened crops with the luma weights
    tiled over the pixels: twice as fast as TensorFlow's reduce_mean over the pixel axes.
    """
    _, height, width, channels = images.shape
    luma = np.asarray(_LUMA if channels == 3 else [1.0], np.float32) / (height * width)
    mean = tf.linalg.matvec(tf.reshape(images, [-1, height * width * channels]),
                            tf.constant(np.tile(luma, height * width)))
    factor = _per_crop(factor)
    # factor >= 0 and mean in [0, 1]: the blend is >= 0 everywhere, only the top needs clipping.
    return tf.minimum(factor * images + (1.0 - factor) * _per_crop(mean), 1.0)


def adjust_saturation(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blends each crop with its grayscale (torchvision), not TF's HSV scaling; no-op on one
    channel. The blend is linear, so it is one colour matrix per crop."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    f = tf.reshape(factor, [-1, 1, 1])
    matrices = f * tf.eye(channels) + (1.0 - f) * _luma_matrix(channels)
    return tf.clip_by_value(_channel_mix(images, matrices), 0.0, 1.0)


def adjust_hue(images: tf.Tensor, delta: tf.Tensor, apply: tf.Tensor) -> tf.Tensor:
    """Rotates the hue of crop i by delta[i] turns (torchvision's hue_factor) where apply[i];
    no-op on one channel. TensorFlow's hue kernel takes one delta, hence one branch per crop:
    skipping the unchanged crops pays, as this is the costliest colour op."""
    if images.shape[-1] == 1:
        return images
    return _branch_per_crop(apply, tf.image.adjust_hue, images, delta)


def grayscale(images: tf.Tensor, apply: tf.Tensor) -> tf.Tensor:
    """Crops where `apply` become gray, kept at their channel count; no-op on one channel."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    matrices = tf.where(tf.reshape(apply, [-1, 1, 1]), _luma_matrix(channels), tf.eye(channels))
    return _channel_mix(images, matrices)


def _mirror_pad(image: tf.Tensor, radius, axis: int) -> tf.Tensor:
    """Symmetric padding (edge pixel repeated, like `tf.pad(..., "SYMMETRIC")`) of one axis of
    [H, W, C]; as slices and a concat it costs about half of TensorFlow's MirrorPad kernel."""
    head = tf.gather(image, tf.range(radius - 1, -1, -1), axis=axis)
    size = tf.shape(image)[axis]
    tail = tf.gather(image, tf.range(size - 1, size - radius - 1, -1), axis=axis)
    return tf.concat([head, image, tail], axis)


def _blur_one(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Separable Gaussian blur of one [H, W, C] image, sigma > 0 pixels.

    The kernel is truncated at ceil(3 sigma) and borders mirrored, as PIL's edge handling keeps
    the brightness at the borders. Each 1-D pass pads only its own axis.
    """
    height, width, channels = image.shape
    radius = tf.minimum(tf.cast(tf.math.ceil(3.0 * sigma), tf.int32), min(height, width) - 1)
    offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel = tf.tile((kernel / tf.reduce_sum(kernel))[:, None], [1, channels])  # [K, C]
    out = _mirror_pad(image, radius, 0)[None]
    out = tf.nn.depthwise_conv2d(out, kernel[:, None, :, None], [1, 1, 1, 1], "VALID")[0]
    out = _mirror_pad(out, radius, 1)[None]
    out = tf.nn.depthwise_conv2d(out, kernel[None, :, :, None], [1, 1, 1, 1], "VALID")[0]
    return tf.ensure_shape(out, image.shape)


def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Gaussian blur of each crop of [N, H, W, C] with its own standard deviation sigma[i]
    pixels (0: unchanged).

    One branch per crop: the crops that are not blurred (half the local crops) cost nothing,
    and each blurred crop's kernel is only as wide as its own sigma needs.
    """
    return _branch_per_crop(sigma > 0, _blur_one, images, sigma)


def _branch_per_crop(apply: tf.Tensor, op, images: tf.Tensor, args: tf.Tensor) -> tf.Tensor:
    """op(crop i, args[i]) where apply[i], crop i unchanged elsewhere: one branch per crop, for
    the costly ops, so that the crops skipping them cost nothing."""
    crops = tf.unstack(images)
    return _restack([_when(apply[i], op, crop, args[i]) for i, crop in enumerate(crops)])


def _restack(crops: list[tf.Tensor]) -> tf.Tensor:
    return tf.expand_dims(crops[0], 0) if len(crops) == 1 else tf.stack(crops)


def solarize(images: tf.Tensor, apply) -> tf.Tensor:
    """Inverts the pixels >= 128/255 (PIL's threshold) of the crops where `apply`."""
    inverted = tf.logical_and(images >= _SOLARIZE_THRESHOLD, _per_crop(apply))
    return tf.where(inverted, 1.0 - images, images)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per channel; one value broadcasts over all channels.

    With a static shape the constants are tiled to the image's shape in advance: TensorFlow's CPU
    kernels broadcast a [C] vector over an [H, W, C] image ~5x slower than they add two tensors
    of the same shape, and this op touches every pixel of every crop.
    """
    mean = np.asarray(mean, np.float32)
    inv_std = 1.0 / np.asarray(std, np.float32)
    if image.shape.is_fully_defined():
        mean = np.broadcast_to(mean, image.shape)
        inv_std = np.broadcast_to(inv_std, image.shape)
    return (image - tf.constant(mean)) * tf.constant(inv_std)


# ---------------------------------------------------------------------------------------------
# The recipe: every random decision of an image's views drawn at once, then the ops.


class ViewParams(NamedTuple):
    """The random decisions for N views of one image, each with a leading [N] axis.

    Values that are not applied are identities (factor 1, hue 0, sigma 0), so the ops can run on
    all crops at once without a branch per crop.
    """

    window: tf.Tensor  # int32 [N, 4]: (y, x, h, w)
    flip: tf.Tensor  # bool
    brightness: tf.Tensor  # float factors
    contrast: tf.Tensor
    saturation: tf.Tensor
    hue: tf.Tensor  # float turns
    jitter: tf.Tensor  # bool: ColorJitter applied
    grayscale: tf.Tensor  # bool
    blur_sigma: tf.Tensor  # float pixels, 0: no blur
    solarize: tf.Tensor  # bool


def sample_view_params(
    seed: tf.Tensor, height, width, crops: Sequence[CropPolicy], photo: PhotometricPolicy
) -> ViewParams:
    """Draws every random decision of `crops` from `seed`: two random ops in all, because in
    tf.data the per-op overhead of many small draws costs more than the pixels' arithmetic."""
    window_seed, photo_seed = tf.unstack(split_seed(seed, 2))
    window = random_resized_crop_windows(
        window_seed, height, width, [c.scale for c in crops], photo.ratio)
    draws = tf.unstack(_uniform(photo_seed, [10, len(crops)]))
    jitter = draws[1] < photo.color_jitter_prob

    def factor(draw, strength):
        return tf.where(jitter, tf.maximum(1.0 - strength + 2.0 * strength * draw, 0.0), 1.0)

    blur = draws[6] < tf.constant([c.blur_prob for c in crops], tf.float32)
    sigma = photo.blur_sigma[0] + (photo.blur_sigma[1] - photo.blur_sigma[0]) * draws[7]
    return ViewParams(
        window=window,
        flip=draws[0] < photo.flip_prob,
        brightness=factor(draws[2], photo.brightness),
        contrast=factor(draws[3], photo.contrast),
        saturation=factor(draws[4], photo.saturation),
        hue=tf.where(jitter, photo.hue * (2.0 * draws[5] - 1.0), 0.0),
        jitter=jitter,
        grayscale=draws[8] < photo.grayscale_prob,
        blur_sigma=tf.where(blur, sigma, 0.0),
        solarize=draws[9] < tf.constant([c.solarize_prob for c in crops], tf.float32),
    )


def color_jitter(images: tf.Tensor, params: ViewParams, photo: PhotometricPolicy) -> tf.Tensor:
    """torchvision ColorJitter's four adjustments, in a fixed order.

    torchvision draws a random order per call. Here the order is fixed (brightness, contrast,
    saturation, hue): any data-dependent order needs a switch over the adjustments, which in
    tf.data costs like running all of them; measured, a random order halved the throughput.
    Crops without jitter carry identity factors, which leave them exactly unchanged.
    """
    if photo.brightness > 0:
        images = adjust_brightness(images, params.brightness)
    if photo.contrast > 0:
        images = adjust_contrast(images, params.contrast)
    if photo.saturation > 0:
        images = adjust_saturation(images, params.saturation)
    if photo.hue > 0:
        images = adjust_hue(images, params.hue, params.jitter)
    return images


def augment_views(
    views: tf.Tensor, params: ViewParams, crops: Sequence[CropPolicy], photo: PhotometricPolicy
) -> tf.Tensor:
    """Colour jitter, grayscale, blur, solarisation and normalisation of [N, S, S, C] resized,
    flipped crops with policies `crops`; `params` holds their N decisions.

    The policies differ only in probabilities, which `params` already carries per crop, so one
    stack serves crop kinds together (the two global crops): every op runs once on the stack.
    """
    if photo.color_jitter_prob > 0:
        views = color_jitter(views, params, photo)
    # Grayscale and solarisation run only when some crop of the stack takes them: a branch per
    # stack is cheap. The blur, like the hue, costs enough to branch per crop.
    if photo.grayscale_prob > 0:
        views = _when(tf.reduce_any(params.grayscale), grayscale, views, params.grayscale)
    if any(c.blur_prob > 0 for c in crops):
        views = gaussian_blur(views, params.blur_sigma)
    if any(c.solarize_prob > 0 for c in crops):
        views = _when(tf.reduce_any(params.solarize), solarize, views, params.solarize)
    return normalize(views, photo.mean, photo.std)


def _when(condition: tf.Tensor, op, views: tf.Tensor, arg: tf.Tensor) -> tf.Tensor:
    return tf.cond(condition, lambda: op(views, arg), lambda: views)


def multi_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    crop_groups: Sequence[Sequence[CropPolicy]],
    photo: PhotometricPolicy,
) -> list[tf.Tensor]:
    """All views of one decoded [H, W, C] image: one float [N, S, S, C] stack per group of
    `crop_groups` (e.g. [global crops, local crops]; a group's crops share their size, and are
    augmented together as one stack).
    """
    crops = [c for group in crop_groups for c in group]
    for group in crop_groups:
        if len({c.size for c in group}) > 1:
            raise ValueError(f"the crops of one group must share a size, got {group}")
    shape = tf.shape(image)
    params = sample_view_params(seed, shape[0], shape[1], crops, photo)
    image_t = tf.transpose(image, [1, 0, 2])  # once per image: crop_and_resize reads columns
    views = [
        crop_and_resize(image_t, params.window[i], c.size, c.antialias, params.flip[i])
        for i, c in enumerate(crops)
    ]
    out, start = [], 0
    for group in crop_groups:
        stop = start + len(group)
        group_params = ViewParams(*(p[start:stop] for p in params))
        out.append(augment_views(_restack(views[start:stop]), group_params, group, photo))
        start = stop
    return out


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
    resized = resize_bicubic(image, (new_h, new_w))
    top = (new_h - crop_size) // 2
    left = (new_w - crop_size) // 2
    view = resized[top : top + crop_size, left : left + crop_size]
    view = tf.ensure_shape(view, [crop_size, crop_size, image.shape[-1]])
    return normalize(view, mean, std)
