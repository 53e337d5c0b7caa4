"""Augmentation ops: shapes, ranges, determinism per seed and the rate of every random op."""

import math

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


def _draws_rate(decision, n=2000):
    """Fraction of n views for which a ViewParams field is true, drawn inside tf.data."""
    crops = [augment.CropPolicy(8, (0.25, 1.0), 0.5, 0.2)] * 10
    photo = augment.PhotometricPolicy()
    ds = tf.data.Dataset.range(n // 10).map(
        lambda i: decision(augment.sample_view_params(tf.stack([i, 1]), 40, 60, crops, photo)))
    return float(np.mean(np.concatenate(list(ds.as_numpy_iterator()))))


@pytest.mark.parametrize(
    "decision, prob",
    [(lambda p: p.flip, 0.5), (lambda p: p.jitter, 0.8), (lambda p: p.grayscale, 0.2),
     (lambda p: p.blur_sigma > 0, 0.5), (lambda p: p.solarize, 0.2)],
    ids=["flip", "jitter", "grayscale", "blur", "solarize"])
def test_random_decision_rates(decision, prob):
    assert abs(_draws_rate(decision) - prob) < 0.04


def test_view_params_ranges_and_identities():
    crops = [augment.CropPolicy(8, (0.25, 1.0), 0.5)] * 500
    photo = augment.PhotometricPolicy()
    p = augment.sample_view_params(SEED, 40, 60, crops, photo)
    jit = p.jitter.numpy()
    for field, strength in [(p.brightness, 0.4), (p.contrast, 0.4), (p.saturation, 0.4)]:
        f = field.numpy()
        assert (f[~jit] == 1.0).all()
        assert f[jit].min() >= 1 - strength and f[jit].max() <= 1 + strength
        assert f[jit].std() > 0.15  # uniform over [0.6, 1.4]: std 0.23
    hue = p.hue.numpy()
    assert (hue[~jit] == 0).all() and np.abs(hue).max() <= 0.1 and hue[jit].std() > 0.04
    sigma = p.blur_sigma.numpy()
    assert sigma[sigma > 0].min() >= 0.1 and sigma.max() <= 2.0
    again = augment.sample_view_params(SEED, 40, 60, crops, photo)
    other = augment.sample_view_params(SEED + 1, 40, 60, crops, photo)
    for a, b in zip(p, again):
        np.testing.assert_array_equal(a, b)
    for field in ("window", "flip", "brightness", "grayscale", "blur_sigma"):
        assert not np.array_equal(getattr(p, field), getattr(other, field))


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_and_resize_shape_range_and_flip(channels):
    img = _image(c=channels)
    image_t = tf.transpose(img, [1, 0, 2])
    window = tf.constant([3, 5, 30, 41])
    a = augment.crop_and_resize(image_t, window, 24, flip=tf.constant(False))
    assert a.shape == (24, 24, channels) and a.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(a)) and float(tf.reduce_max(a)) <= 1.0
    ref = augment.resize_bicubic(img[3:33, 5:46], 24)
    np.testing.assert_allclose(a, ref, atol=1e-5)
    flipped = augment.crop_and_resize(image_t, window, 24, flip=tf.constant(True))
    np.testing.assert_allclose(flipped, a[:, ::-1], atol=1e-5)  # mirrored float rounding


@pytest.mark.parametrize("shape, size", [((300, 320, 3), 224), ((97, 130, 3), 96),
                                         ((50, 60, 1), 96), ((375, 500, 3), (256, 341))])
def test_resize_bicubic_equals_tf_antialiased(shape, size):
    img = _image(*shape)
    out_size = (size, size) if isinstance(size, int) else size
    ref = tf.image.resize(img, out_size, "bicubic", antialias=True) / 255.0
    np.testing.assert_allclose(augment.resize_bicubic(img, size), tf.clip_by_value(ref, 0, 1),
                               atol=1e-6)


def test_resize_bicubic_close_to_pil():
    from PIL import Image

    img = _image(90, 120, 3, seed=1)
    ours = augment.resize_bicubic(img, 48).numpy() * 255
    pil = np.asarray(Image.fromarray(img.numpy()).resize((48, 48), Image.BICUBIC), np.float32)
    # PIL rounds to uint8 and uses fixed-point weights: off by a level or two, never more.
    assert np.abs(ours - pil).max() <= 2.5 and np.abs(ours - pil).mean() < 0.6


def _stack(n=4, h=16, w=16, c=3):
    return tf.stack([_float_image(h, w, c, seed=i) for i in range(n)])


def test_color_ops_match_definitions():
    imgs = _stack()
    gray = augment.to_grayscale(imgs)
    assert gray.shape == (4, 16, 16, 1)
    zeros, ones = tf.zeros([4]), tf.ones([4])
    np.testing.assert_allclose(augment.adjust_saturation(imgs, zeros), tf.repeat(gray, 3, -1),
                               atol=1e-6)
    np.testing.assert_array_equal(augment.adjust_saturation(imgs, ones), imgs)
    np.testing.assert_array_equal(augment.adjust_brightness(imgs, ones), imgs)
    np.testing.assert_allclose(augment.adjust_brightness(imgs, 2 * ones), np.minimum(2 * imgs, 1))
    np.testing.assert_array_equal(augment.adjust_contrast(imgs, ones), imgs)
    means = tf.reduce_mean(gray, axis=[1, 2, 3]).numpy()
    contrast0 = augment.adjust_contrast(imgs, zeros).numpy()
    np.testing.assert_allclose(contrast0, np.broadcast_to(means[:, None, None, None], imgs.shape),
                               atol=1e-6)
    # Per-crop factors: crop 1 darkened, the others untouched.
    mixed = augment.adjust_brightness(imgs, tf.constant([1.0, 0.5, 1.0, 1.0])).numpy()
    np.testing.assert_allclose(mixed[1], imgs[1] * 0.5)
    np.testing.assert_array_equal(mixed[[0, 2, 3]], tf.gather(imgs, [0, 2, 3]))
    apply = tf.constant([True, False, True, False])
    hue = augment.adjust_hue(imgs, tf.constant([1.0, 0.3, 0.25, 0.0]), apply).numpy()
    np.testing.assert_allclose(hue[0], imgs[0], atol=1e-5)  # a full turn
    np.testing.assert_array_equal(hue[1], imgs[1])  # not applied
    np.testing.assert_allclose(hue[2], tf.image.adjust_hue(imgs[2], 0.25), atol=1e-6)
    sol = augment.solarize(imgs, apply).numpy()
    expected = np.where(imgs >= 128 / 255, 1 - imgs, imgs)
    np.testing.assert_allclose(sol[[0, 2]], expected[[0, 2]])
    np.testing.assert_array_equal(sol[[1, 3]], tf.gather(imgs, [1, 3]))


def test_grayscale_applies_per_crop():
    imgs = _stack()
    out = augment.grayscale(imgs, tf.constant([True, False, True, False])).numpy()
    assert out.shape == imgs.shape
    np.testing.assert_allclose(out[0, ..., 0], out[0, ..., 2])
    np.testing.assert_allclose(out[0, ..., :1], augment.to_grayscale(imgs[0]), atol=1e-6)
    np.testing.assert_array_equal(out[1], imgs[1])


def test_color_jitter_range_and_identity():
    imgs = _stack()
    crops = [augment.CropPolicy(16, (0.25, 1.0), 0.0)] * 4
    photo = augment.PhotometricPolicy()
    params = augment.sample_view_params(SEED, 16, 16, crops, photo)
    params = params._replace(jitter=tf.constant([True, True, True, False]))
    params = params._replace(**{k: tf.where(params.jitter, getattr(params, k), v) for k, v in
                                [("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0),
                                 ("hue", 0.0)]})
    out = augment.color_jitter(imgs, params, photo).numpy()
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[3], imgs[3])  # identity factors leave a crop unchanged
    assert not np.allclose(out[:3], imgs[:3])


def test_gaussian_blur_per_crop_sigma():
    imgs = _stack(3, 32, 32)
    out = augment.gaussian_blur(imgs, tf.constant([2.0, 0.0, 0.5])).numpy()
    assert out.shape == imgs.shape
    np.testing.assert_allclose(out[0].mean(), float(tf.reduce_mean(imgs[0])), atol=0.01)
    assert out[0].std() < 0.5 * float(tf.math.reduce_std(imgs[0]))
    np.testing.assert_allclose(out[1], imgs[1], atol=1e-6)  # sigma 0: unchanged
    alone = augment.gaussian_blur(imgs[2:], tf.constant([0.5])).numpy()
    np.testing.assert_allclose(out[2], alone[0], atol=1e-6)  # independent of the other crops
    assert 0.5 * imgs[2].numpy().std() < out[2].std() < imgs[2].numpy().std()
    flat = tf.fill([1, 8, 8, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, tf.constant([1.0])), flat, atol=1e-6)


def test_gaussian_blur_matches_scipy_reference():
    # scipy's "reflect" mode is TensorFlow's "SYMMETRIC" padding; same truncation radius.
    from scipy import ndimage

    imgs = _stack(2, 20, 24)
    sigmas = [1.7, 0.4]
    out = augment.gaussian_blur(imgs, tf.constant(sigmas)).numpy()
    for img, blurred, sigma in zip(imgs.numpy(), out, sigmas):
        expected = ndimage.gaussian_filter(img, sigma, mode="reflect", axes=(0, 1),
                                           radius=math.ceil(3 * sigma))
        np.testing.assert_allclose(blurred, expected, atol=2e-6)


def test_single_channel_colour_ops_are_noops():
    imgs = _stack(c=1)
    apply = tf.ones([4], tf.bool)
    np.testing.assert_array_equal(augment.adjust_hue(imgs, tf.fill([4], 0.1), apply), imgs)
    np.testing.assert_array_equal(augment.adjust_saturation(imgs, tf.fill([4], 0.5)), imgs)
    np.testing.assert_array_equal(augment.grayscale(imgs, apply), imgs)


def _policies():
    return [[augment.CropPolicy(24, (0.25, 1.0), 1.0), augment.CropPolicy(24, (0.25, 1.0), 0.1, 0.2)],
            [augment.CropPolicy(12, (0.05, 0.25), 0.5)] * 3]


@pytest.mark.parametrize("channels", [1, 3])
def test_multi_crop_eager_equals_tf_data(channels):
    img = _image(c=channels)
    groups = _policies()
    mean, std = ((0.449,), (0.226,)) if channels == 1 else (augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    photo = augment.PhotometricPolicy(mean=mean, std=std)
    eager = augment.multi_crop(img, SEED, groups, photo)
    assert [v.shape for v in eager] == [(2, 24, 24, channels), (3, 12, 12, channels)]
    assert all(v.dtype == tf.float32 for v in eager)
    ds = tf.data.Dataset.from_tensors(img).map(lambda x: tuple(augment.multi_crop(x, SEED, groups, photo)))
    for a, b in zip(eager, next(iter(ds))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    lo = (0 - np.array(mean)) / np.array(std)
    hi = (1 - np.array(mean)) / np.array(std)
    for v in eager:
        assert (v.numpy() >= lo.min() - 1e-4).all() and (v.numpy() <= hi.max() + 1e-4).all()
    again = augment.multi_crop(img, SEED, groups, photo)
    other = augment.multi_crop(img, SEED + 1, groups, photo)
    for a, b, c in zip(eager, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_multi_crop_views_differ_and_group_sizes_checked():
    views = augment.multi_crop(_image(), SEED, _policies(), augment.PhotometricPolicy())
    local = views[1].numpy()
    assert not np.allclose(local[0], local[1])
    with pytest.raises(ValueError, match="share a size"):
        augment.multi_crop(_image(), SEED, [[augment.CropPolicy(24, (0.25, 1.0), 1.0),
                                             augment.CropPolicy(12, (0.05, 0.25), 0.5)]],
                           augment.PhotometricPolicy())


def test_center_crop_eval():
    img = _image(40, 60)
    out = augment.center_crop_eval(img, 32, 28, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    assert out.shape == (28, 28, 3) and out.dtype == tf.float32
