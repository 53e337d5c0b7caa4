"""Augmentation ops: shapes, ranges, determinism per seed and the rate of every random op."""

import numpy as np
import pytest
import tensorflow as tf

from bam_jax import augment

SEED = tf.constant([3, 7], tf.int64)


def _image(h=40, w=60, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, (h, w, c), dtype=np.uint8))


def _float_image(h=16, w=16, c=3, seed=0):
    return tf.cast(_image(h, w, c, seed), tf.float32) / 255.0


def _rate(op, n=400):
    """Fraction of n seeds for which `op(seed)` changed the image, computed inside tf.data."""
    ds = tf.data.Dataset.range(n).map(lambda i: tf.cast(op(tf.stack([i, 1])), tf.float32))
    return float(np.mean(list(ds.as_numpy_iterator())))


def test_crop_windows_valid_and_scaled():
    scales = [(0.25, 1.0), (0.05, 0.25)] * 200
    win = augment.random_resized_crop_windows(SEED, 40, 60, scales).numpy()
    y, x, h, w = win.T
    assert (h > 0).all() and (w > 0).all() and (y >= 0).all() and (x >= 0).all()
    assert (y + h <= 40).all() and (x + w <= 60).all()
    frac = h * w / 2400.0
    # Rounding of small windows lets the area fraction leave the range a little.
    assert frac[0::2].min() >= 0.2 and frac[1::2].max() <= 0.3
    assert frac[0::2].mean() > frac[1::2].mean()
    aspect = w / h
    assert aspect.min() > 0.6 and aspect.max() < 1.6


def test_crop_window_fallback_on_extreme_aspect():
    # A 1x100 image admits no 3/4..4/3 window of this area: torchvision's centre fallback.
    win = augment.random_resized_crop_windows(SEED, 1, 100, [(0.9, 1.0)]).numpy()[0]
    np.testing.assert_array_equal(win, [0, 49, 1, 1])


@pytest.mark.parametrize("channels", [1, 3])
def test_random_resized_crop_shape_range_determinism(channels):
    img = _image(c=channels)
    a = augment.random_resized_crop(img, SEED, 24, (0.25, 1.0))
    b = augment.random_resized_crop(img, SEED, 24, (0.25, 1.0))
    c = augment.random_resized_crop(img, SEED + 1, 24, (0.25, 1.0))
    assert a.shape == (24, 24, channels) and a.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(a)) and float(tf.reduce_max(a)) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flip_rate_and_effect():
    img = _float_image()
    flipped = augment.random_flip(img, tf.constant([0, 0], tf.int64), 1.0)
    np.testing.assert_array_equal(flipped, img[:, ::-1])
    rate = _rate(lambda s: tf.reduce_any(augment.random_flip(img, s, 0.5) != img))
    assert abs(rate - 0.5) < 0.08


def test_color_ops_match_definitions():
    img = _float_image()
    gray = augment.to_grayscale(img)
    assert gray.shape == (16, 16, 1)
    np.testing.assert_allclose(
        augment.adjust_saturation(img, 0.0), tf.repeat(gray, 3, -1), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_brightness(img, 1.0), img)
    mean = float(tf.reduce_mean(gray))
    np.testing.assert_allclose(augment.adjust_contrast(img, 0.0), np.full(img.shape, mean), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_hue(img, 1.0), img, atol=1e-5)  # a full turn
    sol = augment.solarize(img).numpy()
    np.testing.assert_allclose(sol, np.where(img >= 128 / 255, 1 - img, img))


def test_color_jitter_range_determinism_and_rate():
    img = _float_image()
    a = augment.color_jitter(img, SEED)
    assert a.shape == img.shape and float(tf.reduce_min(a)) >= 0 and float(tf.reduce_max(a)) <= 1
    np.testing.assert_array_equal(a, augment.color_jitter(img, SEED))
    assert not np.array_equal(a, augment.color_jitter(img, SEED + 1))
    rate = _rate(lambda s: tf.reduce_any(augment.random_color_jitter(img, s, 0.8) != img))
    assert abs(rate - 0.8) < 0.07


def test_grayscale_rate_and_channels():
    img = _float_image()
    out = augment.random_grayscale(img, tf.constant([0, 0], tf.int64), 1.0)
    assert out.shape == img.shape
    np.testing.assert_allclose(out[..., 0], out[..., 2])
    rate = _rate(lambda s: tf.reduce_any(augment.random_grayscale(img, s, 0.2) != img))
    assert abs(rate - 0.2) < 0.06


def test_gaussian_blur_preserves_mean_and_smooths():
    img = _float_image(32, 32)
    out = augment.gaussian_blur(img, tf.constant(2.0))
    assert out.shape == img.shape
    np.testing.assert_allclose(float(tf.reduce_mean(out)), float(tf.reduce_mean(img)), atol=0.01)
    assert float(tf.math.reduce_std(out)) < 0.5 * float(tf.math.reduce_std(img))
    flat = tf.fill([8, 8, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, tf.constant(1.0)), flat, atol=1e-6)


@pytest.mark.parametrize("prob", [0.1, 0.5, 1.0])
def test_blur_rate(prob):
    img = _float_image()
    rate = _rate(lambda s: tf.reduce_any(augment.random_gaussian_blur(img, s, prob) != img))
    assert abs(rate - prob) < 0.07


def test_solarize_rate():
    img = _float_image()
    rate = _rate(lambda s: tf.reduce_any(augment.random_solarize(img, s, 0.2) != img))
    assert abs(rate - 0.2) < 0.06


def test_single_channel_colour_ops_are_noops():
    img = _float_image(c=1)
    np.testing.assert_array_equal(augment.adjust_hue(img, 0.1), img)
    np.testing.assert_array_equal(augment.adjust_saturation(img, 0.5), img)
    np.testing.assert_array_equal(augment.random_grayscale(img, SEED, 1.0), img)
    assert augment.color_jitter(img, SEED).shape == img.shape


@pytest.mark.parametrize("channels", [1, 3])
def test_multi_crop_eager_equals_tf_data(channels):
    img = _image(c=channels)
    crops = [augment.CropPolicy(24, (0.25, 1.0), 1.0), augment.CropPolicy(24, (0.25, 1.0), 0.1, 0.2),
             augment.CropPolicy(12, (0.05, 0.25), 0.5)]
    mean, std = ((0.449,), (0.226,)) if channels == 1 else (augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    photo = augment.PhotometricPolicy(mean=mean, std=std)
    eager = augment.multi_crop(img, SEED, crops, photo)
    assert [v.shape for v in eager] == [(24, 24, channels)] * 2 + [(12, 12, channels)]
    ds = tf.data.Dataset.from_tensors(img).map(lambda x: tuple(augment.multi_crop(x, SEED, crops, photo)))
    for a, b in zip(eager, next(iter(ds))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    lo = (0 - np.array(mean)) / np.array(std)
    hi = (1 - np.array(mean)) / np.array(std)
    for v in eager:
        assert (v.numpy() >= lo.min() - 1e-4).all() and (v.numpy() <= hi.max() + 1e-4).all()


def test_center_crop_eval():
    img = _image(40, 60)
    out = augment.center_crop_eval(img, 32, 28, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    assert out.shape == (28, 28, 3) and out.dtype == tf.float32
