"""Augmentation ops: shapes, ranges, determinism per seed and the rate of every random op."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from bam_jax.data import augment

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
    hue = augment.adjust_hue(imgs, tf.constant([1.0, 0.3, 0.25, 0.0])).numpy()
    np.testing.assert_allclose(hue[0], imgs[0], atol=1e-5)  # a full turn
    np.testing.assert_allclose(hue[2], tf.image.adjust_hue(imgs[2], 0.25), atol=1e-6)
    np.testing.assert_allclose(hue[3], imgs[3], atol=1e-5)
    apply = tf.constant([True, False, True, False])
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
    np.testing.assert_array_equal(augment.adjust_hue(imgs, tf.fill([4], 0.1)), imgs)
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


# ---------------------------------------------------------------------------------------------
# Colour jitter order: NumPy references of torchvision's functional adjustments on float images.
# The luma weights are PIL's (0.299, ...), which the official recipe's PIL images get and this
# module uses; torchvision's tensor path rounds the red weight to 0.2989.

_LUMA = np.array([0.299, 0.587, 0.114])


def _np_brightness(img, factor):
    return np.clip(factor * img, 0, 1)


def _np_contrast(img, factor):
    mean = (img @ _LUMA).mean()
    return np.clip(factor * img + (1 - factor) * mean, 0, 1)


def _np_saturation(img, factor):
    gray = (img @ _LUMA)[..., None]
    return np.clip(factor * img + (1 - factor) * gray, 0, 1)


def _np_rgb_to_hsv(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc, minc = img.max(-1), img.min(-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, 1.0, maxc)
    cr_divisor = np.where(eqc, 1.0, cr)
    rc, gc, bc = [(maxc - c) / cr_divisor for c in (r, g, b)]
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    return np.stack([np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0), s, maxc], -1)


def _np_hsv_to_rgb(hsv):
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p = np.clip(v * (1.0 - s), 0, 1)
    q = np.clip(v * (1.0 - s * f), 0, 1)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0, 1)
    sector = (i.astype(np.int64) % 6)[..., None] == np.arange(6)
    rows = np.stack([np.stack(a, -1) for a in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                (p, p, t, v, v, q))], -2)  # [..., 3, 6]
    return np.einsum("...i,...ji->...j", sector.astype(hsv.dtype), rows)


def _np_hue(img, factor):
    hsv = _np_rgb_to_hsv(img)
    hsv[..., 0] = np.mod(hsv[..., 0] + factor, 1.0)  # torch's `%`: floor modulo
    return _np_hsv_to_rgb(hsv)


_NP_ADJUSTMENTS = (_np_brightness, _np_contrast, _np_saturation, _np_hue)


def _jitter_params(n, factors, orders, jitter):
    """ViewParams for n crops with given (brightness, contrast, saturation, hue) factors."""
    crops = [augment.CropPolicy(16, (0.25, 1.0), 0.0)] * n
    params = augment.sample_view_params(SEED, 16, 16, crops, augment.PhotometricPolicy())
    b, c, s, h = (tf.constant([f[k] for f in factors], tf.float32) for k in range(4))
    return params._replace(brightness=b, contrast=c, saturation=s, hue=h,
                           jitter_order=tf.constant(orders, tf.int32),
                           jitter=tf.constant(jitter))


def test_color_jitter_follows_each_crops_order():
    """Every one of the 24 orders (one per crop) against the NumPy torchvision reference, plus a
    crop without jitter; eagerly and in tf.data."""
    orders = list(itertools.permutations(range(4)))
    img = _float_image(16, 16, 3, seed=5).numpy()
    n = len(orders) + 1
    images = tf.constant(np.stack([img] * n))
    # Strong factors, so that the clipping between adjustments makes the order matter.
    factors = [(1.4, 1.5, 1.6, 0.1)] * n
    params = _jitter_params(n, factors, orders + [(0, 1, 2, 3)], [True] * (n - 1) + [False])
    photo = augment.PhotometricPolicy()
    eager = augment.color_jitter(images, params, photo).numpy()
    ds = tf.data.Dataset.from_tensors(images).map(
        lambda x: augment.color_jitter(x, params, photo))
    np.testing.assert_allclose(next(iter(ds)).numpy(), eager, atol=1e-6)
    for out, order, factor in zip(eager, orders, factors):
        expected = img.astype(np.float64)
        for k in order:
            expected = _NP_ADJUSTMENTS[k](expected, factor[k])
        np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=str(order))
    np.testing.assert_array_equal(eager[-1], img)  # no jitter: untouched
    # The order matters: a fixed order could not pass the comparisons above.
    first, reversed_ = orders.index((0, 1, 2, 3)), orders.index((3, 2, 1, 0))
    assert np.abs(eager[first] - eager[reversed_]).max() > 0.05
    assert len({out.tobytes() for out in eager[:-1]}) > 12


def test_color_jitter_skips_zero_strength_and_one_channel():
    images = _stack(2, c=1)
    params = _jitter_params(2, [(1.3, 0.7, 1.5, 0.1)] * 2, [(3, 2, 1, 0), (0, 3, 1, 2)],
                            [True, True])
    out = augment.color_jitter(images, params, augment.PhotometricPolicy()).numpy()
    # On one channel only brightness and contrast act; a gray RGB image is the reference.
    for crop, img, order in zip(out, images.numpy(), [(1, 0), (0, 1)]):
        expected = img.astype(np.float64)
        for k in order:
            expected = _NP_ADJUSTMENTS[k](np.repeat(expected, 3, -1), (1.3, 0.7)[k])[..., :1]
        np.testing.assert_allclose(crop, expected, atol=1e-5)
    # Zero strength skips the adjustment, whatever its factor (identity factors elsewhere).
    no_brightness_or_hue = augment.PhotometricPolicy(brightness=0.0, hue=0.0)
    rgb = _stack(1)
    params = _jitter_params(1, [(1.3, 1.0, 1.0, 0.1)], [(0, 1, 2, 3)], [True])
    np.testing.assert_array_equal(augment.color_jitter(rgb, params, no_brightness_or_hue), rgb)


def test_jitter_order_is_a_uniform_permutation():
    crops = [augment.CropPolicy(8, (0.25, 1.0), 0.5)] * 100
    photo = augment.PhotometricPolicy()
    ds = tf.data.Dataset.range(240).map(
        lambda i: augment.sample_view_params(tf.stack([i, 2]), 40, 60, crops, photo).jitter_order)
    orders = np.concatenate(list(ds.as_numpy_iterator()))
    assert orders.shape == (24000, 4)
    np.testing.assert_array_equal(np.sort(orders, axis=1), np.broadcast_to(np.arange(4), orders.shape))
    codes = orders @ np.array([64, 16, 4, 1])
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 24
    expected = len(orders) / 24
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, df=23) > 1e-6
    eager = augment.sample_view_params(tf.constant([0, 2], tf.int64), 40, 60, crops, photo)
    np.testing.assert_array_equal(eager.jitter_order, orders[:100])


# ---------------------------------------------------------------------------------------------
# ContrastiveCrop windows.


def _np_contrastive_placement(height, width, size, box, beta):
    """The official ContrastiveCrop.get_params placement of an (h, w) window, given its two
    Beta draws, in Python integer arithmetic."""
    h, w = size
    h0, w0, h1, w1 = (float(v) for v in np.float32(box))
    ch0 = min(max(int(height * h0) - h // 2, 0), height - h)
    ch1 = min(max(int(height * h1) - h // 2, 0), height - h)
    cw0 = min(max(int(width * w0) - w // 2, 0), width - w)
    cw1 = min(max(int(width * w1) - w // 2, 0), width - w)
    return (ch0 + int(np.float32(ch1 - ch0) * np.float32(beta[0])),
            cw0 + int(np.float32(cw1 - cw0) * np.float32(beta[1])))


_BOXES = [(0.5, 0.5, 0.5, 0.5), (0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0),
          (0.1, 0.7, 0.4, 0.95), (0.3, 0.2, 0.9, 0.6)]
_SHAPES = [(40, 60), (375, 500), (500, 375), (1, 100), (100, 1), (1, 1), (7, 3), (224, 224)]


def test_contrastive_windows_inside_image_and_sized_like_random_resized_crop():
    scales = [(0.25, 1.0)] * 2 + [(0.05, 0.25)] * 6
    rng = np.random.default_rng(0)
    boxes = _BOXES + [tuple(np.sort(rng.uniform(0, 1, (2, 2)), axis=0).ravel()) for _ in range(6)]
    for seed_index, (shape, box) in enumerate(itertools.product(_SHAPES, boxes)):
        seed = tf.constant([seed_index, 11], tf.int64)
        win = augment.contrastive_crop_windows(
            seed, *shape, scales, tf.constant(box, tf.float32), 0.6).numpy()
        y, x, h, w = win.T
        assert (h > 0).all() and (w > 0).all() and (y >= 0).all() and (x >= 0).all()
        assert (y + h <= shape[0]).all() and (x + w <= shape[1]).all(), (shape, box, win)
        rrc = augment.random_resized_crop_windows(seed, *shape, scales).numpy()
        np.testing.assert_array_equal(win[:, 2:], rrc[:, 2:])  # the same proposals


def test_contrastive_windows_match_official_placement():
    """Exact placements: the official formula in Python integers, fed with the Beta draws that
    `contrastive_crop_windows` makes (Gamma draws from the derived seed)."""
    scales = [(0.25, 1.0)] * 4 + [(0.05, 0.25)] * 12
    alpha = 0.6
    for seed_index, box in enumerate(_BOXES * 4):
        height, width = (375, 500) if seed_index % 2 else (97, 130)
        seed = tf.constant([seed_index, 5], tf.int64)
        win = augment.contrastive_crop_windows(
            seed, height, width, scales, tf.constant(box, tf.float32), alpha).numpy()
        gammas = tf.random.stateless_gamma(
            [2, len(scales), 2], augment.split_seed(seed, 1)[0], alpha=alpha).numpy()
        betas = gammas[0] / (gammas[0] + gammas[1])
        for (y, x, h, w), beta in zip(win, betas):
            assert (y, x) == _np_contrastive_placement(height, width, (h, w), box, beta)


def test_contrastive_window_fallback_is_the_centre_crop():
    box = tf.constant([0.0, 0.0, 0.1, 0.1])
    win = augment.contrastive_crop_windows(SEED, 1, 100, [(0.9, 1.0)], box, 0.6).numpy()[0]
    np.testing.assert_array_equal(win, [0, 49, 1, 1])


def _normalised_positions(alpha, num_seeds=8, per_seed=1000):
    """Window corners (y, x) of a fixed 500x500 window in a 1000x1000 image with a whole-image box:
    ch0 = 0 and ch1 = 500, so the corner offset is int(500 b) with b ~ Beta(alpha, alpha)."""
    scales = [(0.25, 0.25)] * per_seed
    box = tf.constant([0.0, 0.0, 1.0, 1.0])
    ds = tf.data.Dataset.range(num_seeds).map(lambda i: augment.contrastive_crop_windows(
        tf.stack([i, 3]), 1000, 1000, scales, box, alpha, ratio=(1.0, 1.0)))
    windows = np.concatenate(list(ds.as_numpy_iterator()))
    assert (windows[:, 2:] == 500).all()
    return windows[:, :2]


@pytest.mark.parametrize("alpha", [0.6, 1.0, 3.0])
def test_contrastive_placement_follows_beta(alpha):
    positions = _normalised_positions(alpha)
    n = len(positions)
    length = 500
    # The corner offset k = floor(500 b) has P(k <= j) = F((j + 1) / 500), F the Beta CDF; both
    # CDFs are steps at the integers, so the Kolmogorov-Smirnov distance is their largest gap
    # there. 2.7 / sqrt(n) is the KS bound exceeded by chance with probability ~1e-6.
    grid = np.arange(length + 1)
    cdf = stats.beta.cdf((grid + 1) / length, alpha, alpha)
    uniform_cdf = np.minimum((grid + 1) / length, 1.0)
    for offsets in positions.T:
        empirical = np.searchsorted(np.sort(offsets), grid, side="right") / n
        assert np.abs(empirical - cdf).max() < 2.7 / math.sqrt(n)
        if alpha != 1.0:  # the test can tell Beta(alpha) from uniform
            assert np.abs(empirical - uniform_cdf).max() > 2 * 2.7 / math.sqrt(n)
        normalised = offsets / length
        variance = 1 / (4 * (2 * alpha + 1))
        # Flooring to 1/500 lowers the mean by ~1/1000; 5 standard errors otherwise.
        assert abs(normalised.mean() + 0.5 / length - 0.5) < 5 * math.sqrt(variance / n)
        assert abs(normalised.var() / variance - 1) < 0.06
    assert abs(np.corrcoef(positions.T)[0, 1]) < 5 / math.sqrt(n)  # y and x independent


def test_contrastive_alpha_one_is_uniform():
    positions = _normalised_positions(1.0).ravel()
    assert stats.kstest((positions + 0.5) / 500, "uniform").pvalue > 1e-6
    _, counts = np.unique(positions // 50, return_counts=True)
    assert stats.chisquare(counts).pvalue > 1e-6


def test_multi_crop_with_box_changes_only_the_windows():
    crops = [c for group in _policies() for c in group]
    photo = augment.PhotometricPolicy()
    box = tf.constant([0.2, 0.1, 0.6, 0.5])
    plain = augment.sample_view_params(SEED, 40, 60, crops, photo)
    boxed = augment.sample_view_params(SEED, 40, 60, crops, photo, box, 0.3)
    window_seed = augment.split_seed(SEED, 2)[0]
    np.testing.assert_array_equal(boxed.window, augment.contrastive_crop_windows(
        window_seed, 40, 60, [c.scale for c in crops], box, 0.3))
    assert not np.array_equal(boxed.window, plain.window)
    for field in augment.ViewParams._fields[1:]:
        np.testing.assert_array_equal(getattr(boxed, field), getattr(plain, field))


def test_multi_crop_with_box_in_tf_data():
    img = _image()
    groups = _policies()
    photo = augment.PhotometricPolicy()
    boxes = tf.constant([[0.0, 0.0, 0.0, 0.0], [0.2, 0.1, 0.6, 0.5]])

    def views(index):
        return tuple(augment.multi_crop(img, SEED, groups, photo,
                                        box=tf.gather(boxes, index), ccrop_alpha=0.6))

    ds = tf.data.Dataset.range(2).map(views)
    for index, mapped in enumerate(ds):
        eager = augment.multi_crop(img, SEED, groups, photo, box=boxes[index], ccrop_alpha=0.6)
        for a, b in zip(eager, mapped):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # A box collapsed on the top-left corner pins every window there; the crops differ from
    # RandomResizedCrop's, everything else being equal.
    corner = augment.sample_view_params(SEED, 40, 60, [c for g in groups for c in g], photo,
                                        boxes[0])
    assert (corner.window.numpy()[:, :2] == 0).all()
    plain = augment.multi_crop(img, SEED, groups, photo)
    pinned = augment.multi_crop(img, SEED, groups, photo, box=boxes[0])
    assert not np.allclose(plain[0], pinned[0])
