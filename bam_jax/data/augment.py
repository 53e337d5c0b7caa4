"""DINO/BAM multi-crop augmentation as pure TensorFlow ops.

Everything here runs inside `tf.data.Dataset.map` (no PIL, no Python per image) and draws its
randomness from stateless ops keyed by an explicit `seed` (a shape-[2] integer tensor), so the same
seed always gives the same crops: this is what makes the input stream reproducible and resumable.

The recipe follows the official `DataAugmentationDINO` used by BAM: RandomResizedCrop (bicubic,
antialiased like PIL), horizontal flip, colour jitter (a random order per crop, as torchvision),
random grayscale, Gaussian blur, solarisation (second global crop only) and mean/std normalisation.
Images are float32 in [0, 1] between ops; the photometric ops accept one or three channels (on
one channel the ops that need colour - saturation, hue, grayscale - are no-ops).

Speed shapes the layout: in tf.data each TensorFlow op costs microseconds of overhead whatever
its size, so all random decisions of an image's views are drawn at once (`sample_view_params`)
and the photometric ops run on a stack of crops [N, H, W, C] (static shape) with one parameter
per crop, where crops that skip a cheap op get identity parameters instead of a branch each; the
colour jitter (whose order differs per crop) and the costly blur branch per crop. The input
pipeline runs every TensorFlow op on one thread (see `pipeline`), which is what these
choices were measured under.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from bam_jax.photometric import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported)
from bam_jax.photometric import LUMA as _LUMA
from bam_jax.photometric import SOLARIZE_THRESHOLD as _SOLARIZE_THRESHOLD

# The 24 orders of ColorJitter's four adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue).
_JITTER_ORDERS = tuple(itertools.permutations(range(4)))


@dataclasses.dataclass(frozen=True)
class CropPolicy:
    """What differs between crop kinds (global 1, global 2, local) in the DINO recipe."""

    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float = 0.0
    antialias: bool = True  # PIL-like; False resizes faster at the price of aliasing


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
    u = _uniform(seed, [len(scales), attempts + 1, 2])
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    ch, cw, found = _crop_sizes(u[:, :-1], h, w, scales, ratio)
    pos = u[:, -1]  # the last draw places the window
    y = tf.where(found, tf.floor(pos[:, 0] * (h - ch + 1)), tf.floor((h - ch) / 2))
    x = tf.where(found, tf.floor(pos[:, 1] * (w - cw + 1)), tf.floor((w - cw) / 2))
    return tf.cast(tf.stack([y, x, ch, cw], axis=1), tf.int32)


def _crop_sizes(u: tf.Tensor, h: tf.Tensor, w: tf.Tensor, scales, ratio):
    """RandomResizedCrop's size: float (crop height, crop width, whether a proposal fit) per
    window, from `u`, [n, attempts, 2] uniform (area, log-aspect) draws; the centre crop's size
    where none fit."""
    scales = tf.constant(scales, tf.float32)[:, None, :]
    target_area = h * w * (scales[..., 0] + u[..., 0] * (scales[..., 1] - scales[..., 0]))
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_r0 + u[..., 1] * (log_r1 - log_r0))
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
    return ch, cw, found


def contrastive_crop_windows(
    seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    scales: Sequence[Sequence[float]],
    box: tf.Tensor,
    alpha: float | tf.Tensor,
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tf.Tensor:
    """ContrastiveCrop's windows (official `ContrastiveCrop.get_params`): int32 [n, 4] of
    (y, x, h, w), one per entry of `scales`, like `random_resized_crop_windows`.

    The sizes are RandomResizedCrop's, from the same draws (the same seed gives the same sizes).
    A fitting window is then centred between the corners of `box`, float32 (h_min, w_min, h_max,
    w_max) as fractions of the image, and kept inside the image: per axis, with ch0 and ch1 the
    top-left corners of the windows centred on the box's two edges (clamped to the image),
    y = ch0 + int((ch1 - ch0) * b), b ~ Beta(alpha, alpha), which favours the box's edges for
    alpha < 1 (BAM's default is 0.6). Where no proposal fits: the centre crop, as in
    RandomResizedCrop.
    """
    n = len(scales)
    u = _uniform(seed, [n, attempts + 1, 2])
    extent = tf.stack([height, width])
    h, w = tf.unstack(tf.cast(extent, tf.float32))
    ch, cw, found = _crop_sizes(u[:, :-1], h, w, scales, ratio)
    size = tf.cast(tf.stack([ch, cw], axis=1), tf.int32)  # [n, 2]: (h, w)
    # int(height * h0) on the official code's Python floats: float64, truncated.
    box_corners = tf.reshape(tf.cast(box, tf.float64), [2, 2])  # [(h_min, w_min), (h_max, w_max)]
    box_pixels = tf.cast(tf.cast(extent, tf.float64) * box_corners, tf.int32)
    lowest = tf.minimum(tf.maximum(box_pixels[0] - size // 2, 0), extent - size)
    highest = tf.minimum(tf.maximum(box_pixels[1] - size // 2, 0), extent - size)
    # Beta(a, a) as G1 / (G1 + G2) of Gamma(a) draws, from a seed apart from the sizes' draws;
    # divide_no_nan covers both draws underflowing to 0, possible for a tiny alpha.
    gammas = tf.random.stateless_gamma([2, n, 2], split_seed(seed, 1)[0], alpha=alpha)
    beta = tf.math.divide_no_nan(gammas[0], gammas[0] + gammas[1])
    corner = lowest + tf.cast(tf.cast(highest - lowest, tf.float32) * beta, tf.int32)
    centred = (extent - size) // 2
    return tf.concat([tf.where(found[:, None], corner, centred), size], axis=1)


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
    faster than the 2-D kernel (README, "Input pipeline").
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
    broadcasting of a [H, W, 1] plane over [H, W, 3] is slower."""
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
    # A factor above 1 pushes the pixels below the mean under 0: both ends need clipping.
    return tf.clip_by_value(factor * images + (1.0 - factor) * _per_crop(mean), 0.0, 1.0)


def adjust_saturation(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blends each crop with its grayscale (torchvision), not TF's HSV scaling; no-op on one
    channel. The blend is linear, so it is one colour matrix per crop."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    f = tf.reshape(factor, [-1, 1, 1])
    matrices = f * tf.eye(channels) + (1.0 - f) * _luma_matrix(channels)
    return tf.clip_by_value(_channel_mix(images, matrices), 0.0, 1.0)


def adjust_hue(images: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """Rotates the hue of crop i by delta[i] turns (torchvision's hue_factor); no-op on one
    channel. TensorFlow's hue kernel takes one delta, hence one call per crop."""
    if images.shape[-1] == 1:
        return images
    return _restack([tf.image.adjust_hue(crop, delta[i])
                     for i, crop in enumerate(tf.unstack(images))])


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


def _branch_per_crop(apply: tf.Tensor, op, images: tf.Tensor, *args: tf.Tensor) -> tf.Tensor:
    """op(crop i, *(a[i] for a in args)) where apply[i], crop i unchanged elsewhere: one branch
    per crop, for the costly ops, so that the crops skipping them cost nothing."""
    crops = tf.unstack(images)
    return _restack([
        tf.cond(apply[i], lambda crop=crop, i=i: op(crop, *(a[i] for a in args)),
                lambda crop=crop: crop)
        for i, crop in enumerate(crops)])


def _restack(crops: list[tf.Tensor]) -> tf.Tensor:
    return tf.expand_dims(crops[0], 0) if len(crops) == 1 else tf.stack(crops)


def solarize(images: tf.Tensor, apply) -> tf.Tensor:
    """Inverts the pixels >= 128/255 (PIL's threshold) of the crops where `apply`."""
    inverted = tf.logical_and(images >= _SOLARIZE_THRESHOLD, _per_crop(apply))
    return tf.where(inverted, 1.0 - images, images)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per channel; one value broadcasts over all channels.

    With a static shape the constants are tiled to the image's shape in advance: TensorFlow's CPU
    kernels broadcast a [C] vector over an [H, W, C] image far slower than they add two tensors
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
    jitter_order: tf.Tensor  # int32 [N, 4]: 0 brightness, 1 contrast, 2 saturation, 3 hue
    grayscale: tf.Tensor  # bool
    blur_sigma: tf.Tensor  # float pixels, 0: no blur
    solarize: tf.Tensor  # bool


def sample_view_params(
    seed: tf.Tensor,
    height,
    width,
    crops: Sequence[CropPolicy],
    photo: PhotometricPolicy,
    box: tf.Tensor | None = None,
    ccrop_alpha: float | tf.Tensor = 0.6,
) -> ViewParams:
    """Draws every random decision of `crops` from `seed`: few random ops in all, because in
    tf.data the per-op overhead of many small draws costs more than the pixels' arithmetic.

    The windows are RandomResizedCrop's, or with a `box` ContrastiveCrop's (see
    `contrastive_crop_windows`); the box changes no other decision.
    """
    window_seed, photo_seed = tf.unstack(split_seed(seed, 2))
    scales = [c.scale for c in crops]
    if box is None:
        window = random_resized_crop_windows(window_seed, height, width, scales, photo.ratio)
    else:
        window = contrastive_crop_windows(
            window_seed, height, width, scales, box, ccrop_alpha, photo.ratio)
    # Row 10 (the jitter order) came last: as a Philox stream, rows 0-9 stay as they were.
    draws = tf.unstack(_uniform(photo_seed, [11, len(crops)]))
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
        jitter_order=_random_order(draws[10]),
        grayscale=draws[8] < photo.grayscale_prob,
        blur_sigma=tf.where(blur, sigma, 0.0),
        solarize=draws[9] < tf.constant([c.solarize_prob for c in crops], tf.float32),
    )


def _random_order(draw: tf.Tensor) -> tf.Tensor:
    """One of the 24 orders of the four adjustments per uniform draw, each equally likely, like
    torchvision's randperm(4): one draw per crop instead of four."""
    index = tf.cast(draw * len(_JITTER_ORDERS), tf.int32)
    return tf.gather(tf.constant(_JITTER_ORDERS, tf.int32), index)


def color_jitter(images: tf.Tensor, params: ViewParams, photo: PhotometricPolicy) -> tf.Tensor:
    """torchvision ColorJitter: each crop where `params.jitter` gets the four adjustments in its
    own order, `params.jitter_order` (torchvision draws randperm(4) per call); adjustments of zero
    strength are skipped, as in torchvision, and crops without jitter stay exactly unchanged.

    One branch per crop, and in it a switch per position of the order that runs only the
    adjustment the crop has there: a random order then costs no more arithmetic than a fixed one,
    where stack-wide ops would have to run, at every position, each adjustment some crop has there.
    The positions are a loop: four unrolled switches would trace four times the branches and
    slow the pipeline's start-up.
    """
    strengths = (photo.brightness, photo.contrast, photo.saturation, photo.hue)
    adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    factors = tf.stack([params.brightness, params.contrast, params.saturation, params.hue], 1)

    def jitter_crop(crop, crop_factors, order):
        def adjust_at(position, stack):
            stack = tf.switch_case(order[position], [
                _adjustment_branch(adjust, stack, crop_factors[k : k + 1], strengths[k] > 0)
                for k, adjust in enumerate(adjustments)])
            return position + 1, stack

        # The adjustments take a stack of crops: this one as a stack of one.
        _, stack = tf.while_loop(
            lambda position, _: position < len(adjustments), adjust_at, (0, crop[None]))
        return stack[0]

    return _branch_per_crop(params.jitter, jitter_crop, images, factors, params.jitter_order)


def _adjustment_branch(adjust, stack: tf.Tensor, factor: tf.Tensor, enabled: bool):
    """A switch branch: the adjustment, or (zero strength, as torchvision skips it) nothing."""
    return (lambda: adjust(stack, factor)) if enabled else (lambda: stack)


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
    box: tf.Tensor | None = None,
    ccrop_alpha: float | tf.Tensor = 0.6,
) -> list[tf.Tensor]:
    """All views of one decoded [H, W, C] image: one float [N, S, S, C] stack per group of
    `crop_groups` (e.g. [global crops, local crops]; a group's crops share their size, and are
    augmented together as one stack).

    With `box`, float32 [4] (h_min, w_min, h_max, w_max) as fractions of the image, every window
    is ContrastiveCrop's around that box with Beta(`ccrop_alpha`, `ccrop_alpha`) placement; without
    it, RandomResizedCrop's.
    """
    views, params = crop_views(image, seed, crop_groups, photo, box, ccrop_alpha)
    return [augment_views(v, p, group, photo) for v, p, group in zip(views, params, crop_groups)]


def crop_views(
    image: tf.Tensor,
    seed: tf.Tensor,
    crop_groups: Sequence[Sequence[CropPolicy]],
    photo: PhotometricPolicy,
    box: tf.Tensor | None = None,
    ccrop_alpha: float | tf.Tensor = 0.6,
) -> tuple[list[tf.Tensor], list[ViewParams]]:
    """The geometric half of `multi_crop`: per group, the resized and flipped crops (float
    [N, S, S, C] in [0, 1]) and their decisions, the photometric ones not yet applied. The same
    draws as `multi_crop`'s, which is this plus `augment_views`; with
    `config.data.augment_on_device` the accelerator applies the rest (`bam_jax.photometric`)."""
    crops = [c for group in crop_groups for c in group]
    for group in crop_groups:
        if len({c.size for c in group}) > 1:
            raise ValueError(f"the crops of one group must share a size, got {group}")
    shape = tf.shape(image)
    params = sample_view_params(seed, shape[0], shape[1], crops, photo, box, ccrop_alpha)
    image_t = tf.transpose(image, [1, 0, 2])  # once per image: crop_and_resize reads columns
    views = [
        crop_and_resize(image_t, params.window[i], c.size, c.antialias, params.flip[i])
        for i, c in enumerate(crops)
    ]
    stacks, group_params, start = [], [], 0
    for group in crop_groups:
        stop = start + len(group)
        group_params.append(ViewParams(*(p[start:stop] for p in params)))
        stacks.append(_restack(views[start:stop]))
        start = stop
    return stacks, group_params


def params_table(params: ViewParams) -> tf.Tensor:
    """The photometric decisions of N crops as float32 [N, 12], the columns of
    `bam_jax.photometric.PARAM_COLUMNS`: what the host ships beside the uint8 crops."""
    def column(x):
        return tf.reshape(tf.cast(x, tf.float32), [-1, 1])

    return tf.concat([
        column(params.brightness), column(params.contrast), column(params.saturation),
        column(params.hue), column(params.jitter), tf.cast(params.jitter_order, tf.float32),
        column(params.grayscale), column(params.blur_sigma), column(params.solarize)], axis=1)


def to_uint8(views: tf.Tensor) -> tf.Tensor:
    """Float crops in [0, 1] rounded to uint8 (the rounding point of on-device augmentation)."""
    return tf.cast(tf.round(views * 255.0), tf.uint8)


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
