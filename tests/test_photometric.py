"""On-device photometric augmentation (bam_jax/photometric.py): every JAX op against the tf.data
op it replaces, the whole stage against the host's on the same uint8 crops, the pipeline's
on-device batches (keys, decisions, resume), the trainer with it on."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf

from bam_jax import config_checks, photometric, train
from bam_jax.data import augment
from bam_jax.data import pipeline as ip
from configs import common

SEED = tf.constant([5, 9], tf.int64)
TOLERANCE = 1e-5


def _crops(n=6, h=20, w=24, c=3, seed=0):
    """uint8-valued float crops in [0, 1], with ties between channels (gray, equal pairs)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    if c == 3:
        pixels[0] = pixels[0, ..., :1]
        pixels[1, ..., 1] = pixels[1, ..., 0]
        pixels[2, ..., 2] = pixels[2, ..., 1]
    return pixels.astype(np.float32) / 255.0


def _close(jax_out, tf_out):
    np.testing.assert_allclose(np.asarray(jax_out), np.asarray(tf_out), rtol=0, atol=TOLERANCE)


@jax.jit
def _jax_ops(x, small, factor, delta, apply, sigma):
    """Every op on crops [N, H, W, C] with one parameter per crop, in one program."""
    mean, std = photometric.mean_std(None, None, x.shape[-1])
    blur = jax.vmap(lambda i, s: photometric.gaussian_blur(i, s, 2.0))
    return dict(
        brightness=jax.vmap(photometric.adjust_brightness)(x, factor),
        contrast=jax.vmap(photometric.adjust_contrast)(x, factor),
        saturation=jax.vmap(photometric.adjust_saturation)(x, factor),
        hue=jax.vmap(photometric.adjust_hue)(x, delta),
        grayscale=jax.vmap(photometric.grayscale)(x, apply),
        blur=blur(x, sigma), small_blur=blur(small, sigma[-3:]),
        solarize=jax.vmap(photometric.solarize)(x, apply),
        normalize=photometric.normalize(x, mean, std))


@pytest.mark.parametrize("channels", [1, 3])
def test_each_op_matches_its_tf_op(channels):
    x = _crops(c=channels)
    # A crop smaller than the widest kernel: the radius is clamped as in TensorFlow.
    small = _crops(3, 4, 5, channels)
    factor = np.random.default_rng(1).uniform(0.6, 1.4, 6).astype(np.float32)
    delta = np.array([-0.5, -0.1, 0.0, 0.03, 0.1, 0.5], np.float32)
    apply = np.array([True, False] * 3)
    sigma = np.array([0.0, 0.1, 0.5, 1.3, 2.0, 1.7], np.float32)
    tx, tf_factor, tf_apply = tf.constant(x), tf.constant(factor), tf.constant(apply)
    mean, std = photometric.mean_std(None, None, channels)
    expected = dict(
        brightness=augment.adjust_brightness(tx, tf_factor),
        contrast=augment.adjust_contrast(tx, tf_factor),
        saturation=augment.adjust_saturation(tx, tf_factor),
        hue=augment.adjust_hue(tx, tf.constant(delta)),
        grayscale=augment.grayscale(tx, tf_apply),
        blur=augment.gaussian_blur(tx, tf.constant(sigma)),
        small_blur=augment.gaussian_blur(tf.constant(small), tf.constant(sigma[-3:])),
        solarize=augment.solarize(tx, tf_apply),
        normalize=augment.normalize(tx, mean, std))
    ours = _jax_ops(x, small, factor, delta, apply, sigma)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=TOLERANCE, err_msg=name)


def _params(n, orders, jitter, hue=0.1):
    crops = [augment.CropPolicy(20, (0.25, 1.0), 0.5, 0.5)] * n
    params = augment.sample_view_params(SEED, 40, 40, crops, augment.PhotometricPolicy())
    rng = np.random.default_rng(2)
    strong = lambda: tf.constant(rng.uniform(0.5, 1.6, n), tf.float32)  # noqa: E731
    return params._replace(
        brightness=strong(), contrast=strong(), saturation=strong(),
        hue=tf.constant(rng.uniform(-hue, hue, n), tf.float32),
        jitter_order=tf.constant(orders, tf.int32), jitter=tf.constant(jitter))


_augment_crops = jax.jit(photometric.augment_crops, static_argnums=2)


def _device(x, params, policy):
    """The device stage on float crops (x * 255 is exact: they are uint8 levels)."""
    u8 = np.round(x * 255).astype(np.uint8)
    return _augment_crops(u8, augment.params_table(params).numpy(), policy)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_in_every_order_and_whole_stage_match_tf(channels):
    """All 24 orders (one per crop) with strong factors, a crop without jitter, random
    grayscale / blur / solarisation: the whole stage of `augment.augment_views`."""
    orders = list(itertools.permutations(range(4)))
    n = len(orders) + 1
    x = np.concatenate([_crops(5, c=channels, seed=s) for s in range(5)])[:n]
    params = _params(n, orders + [(0, 1, 2, 3)], [True] * (n - 1) + [False])
    mean, std = photometric.mean_std(None, None, channels)  # as the pipeline passes them
    photo = augment.PhotometricPolicy(mean=mean, std=std)
    crops = [augment.CropPolicy(20, (0.25, 1.0), 0.5, 0.5)] * n
    host = augment.augment_views(tf.constant(x), params, crops, photo)
    _close(_device(x, params, photometric.Policy()), host)
    jittered = augment.color_jitter(tf.constant(x), params, photo)
    table = augment.params_table(params).numpy()
    columns = {name: table[:, i] for i, name in enumerate(photometric.PARAM_COLUMNS)}
    _close(jax.jit(jax.vmap(lambda i, p: photometric.color_jitter(i, p, True)))(x, columns),
           jittered)
    # Zero hue strength: skipped, as torchvision skips it, whatever the factor.
    no_hue = augment.PhotometricPolicy(hue=0.0, mean=mean, std=std)
    _close(_device(x, params, photometric.Policy(hue=0.0)),
           augment.augment_views(tf.constant(x), params, crops, no_hue))


def test_params_table_columns_are_the_view_params():
    params = _params(24, list(itertools.permutations(range(4))), [True, False] * 12)
    table = augment.params_table(params).numpy()
    assert table.shape == (24, len(photometric.PARAM_COLUMNS)) and table.dtype == np.float32
    column = {name: table[:, i] for i, name in enumerate(photometric.PARAM_COLUMNS)}
    for name in ("brightness", "contrast", "saturation", "hue", "jitter", "grayscale",
                 "blur_sigma", "solarize"):
        np.testing.assert_array_equal(column[name], getattr(params, name).numpy())
    orders = np.stack([column[f"order_{i}"] for i in range(4)], 1)
    np.testing.assert_array_equal(orders, params.jitter_order.numpy())


def _tiny_digits():
    c = common.data_config(source="mnist_bundled", eval_split="test")
    c.global_crop_size, c.local_crop_size, c.local_crops_number = 16, 8, 2
    return c


def _take(ds, n):
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def test_stage_equals_host_stage_on_the_same_uint8_crops():
    """An RGB image through `crop_views` -> uint8: the device stage equals the host stage
    applied to the same rounded crops; the host's float path differs by its rounding only."""
    image = tf.constant(np.random.default_rng(3).integers(0, 256, (40, 50, 3), np.uint8))
    photo = augment.PhotometricPolicy()
    groups = [[augment.CropPolicy(16, (0.25, 1.0), 1.0), augment.CropPolicy(16, (0.25, 1.0), 0.1,
                                                                             0.2)],
              [augment.CropPolicy(8, (0.05, 0.25), 0.5)] * 4]
    for seed in range(2):
        key = tf.constant([seed, 1], tf.int64)
        views, params = augment.crop_views(image, key, groups, photo)
        float_path = augment.multi_crop(image, key, groups, photo)
        for v, p, group, exact in zip(views, params, groups, float_path):
            u8 = augment.to_uint8(v)
            assert u8.dtype == tf.uint8
            # The rounding point: at most half a level before the photometric ops.
            assert np.abs(tf.cast(u8, tf.float32).numpy() / 255 - v.numpy()).max() <= 0.5 / 255
            host = augment.augment_views(tf.cast(u8, tf.float32) / 255.0, p, group, photo)
            device = _augment_crops(u8.numpy(), augment.params_table(p).numpy(),
                                    photometric.Policy())
            _close(device, host)
            # Half a level, through jitter gains (up to 1.4 x 1.8 x 1.8) and 1 / std (<= 4.5).
            assert np.abs(np.asarray(device) - exact.numpy()).max() < 0.05


def test_pipeline_on_device_batches_decisions_and_resume():
    c = _tiny_digits()
    kwargs = dict(global_batch_size=8, seed=3, augment_on_device=True)
    full = _take(ip.create_pretrain_dataset(c, **kwargs), 3)
    batch = full[0]
    assert set(batch) == {"global_crops", "local_crops", "global_crops_photometric",
                          "local_crops_photometric", "label"}
    assert batch["global_crops"].shape == (8, 2, 16, 16, 1)
    assert batch["global_crops"].dtype == np.uint8 and batch["local_crops"].shape == (8, 2, 8, 8, 1)
    assert batch["global_crops_photometric"].shape == (8, 2, len(photometric.PARAM_COLUMNS))
    host = _take(ip.create_pretrain_dataset(c, global_batch_size=8, seed=3), 1)[0]
    np.testing.assert_array_equal(batch["label"], host["label"])
    device = jax.jit(photometric.augment_batch, static_argnums=1)(
        batch, photometric.Policy.from_data_config(c))
    assert set(device) == {"global_crops", "local_crops", "label"}
    for key in ("global_crops", "local_crops"):
        # The same decisions: only the uint8 rounding differs (see the stage test's bound).
        assert np.abs(np.asarray(device[key]) - host[key]).max() < 0.05
    resumed = _take(ip.create_pretrain_dataset(c, start_step=2, **kwargs), 1)
    for a, b in zip(full[2:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # ContrastiveCrop moves the windows only: the same parameters ship.
    boxes = np.tile(np.float32([0.0, 0.0, 0.5, 0.5]), (ip.num_examples(c, "train"), 1))
    boxed = _take(ip.create_pretrain_dataset(c, boxes=boxes, **kwargs), 1)[0]
    np.testing.assert_array_equal(boxed["local_crops_photometric"],
                                  batch["local_crops_photometric"])
    assert not np.array_equal(boxed["local_crops"], batch["local_crops"])
    # The shipped decisions follow the recipe's rates (jitter 0.8, grayscale 0.2; solarisation
    # 0.2 on the second global crop only; blur 1.0 / 0.1 / 0.5).
    rows = np.concatenate([b["global_crops_photometric"] for b in full])
    local = np.concatenate([b["local_crops_photometric"] for b in full])
    local = local.reshape(-1, rows.shape[-1])
    col = photometric.PARAM_COLUMNS.index
    assert (rows[:, 0, col("blur_sigma")] > 0).all() and (rows[:, 0, col("solarize")] == 0).all()
    assert 0.4 < (local[:, col("jitter")] > 0).mean() <= 1.0
    orders = np.sort(local[:, col("order_0") : col("order_3") + 1], axis=1)
    np.testing.assert_array_equal(orders, np.broadcast_to(np.arange(4), orders.shape))


def test_setting_resolution_abstract_batch_and_config_check():
    assert photometric.resolve_on_device("auto", "gpu") and photometric.resolve_on_device(
        "auto", "tpu")
    assert not photometric.resolve_on_device("auto", "cpu")
    assert photometric.resolve_on_device("on", "cpu") and not photometric.resolve_on_device(
        "off", "gpu")
    config = common.base_config()
    config.batch_size = 4
    shapes = train.abstract_batch(config, 3, None, augment_on_device=True)
    assert shapes["global_crops"].dtype == np.uint8 and shapes["local_crops"].shape == (
        4, 6, 96, 96, 3)
    assert shapes["local_crops_photometric"].shape == (4, 6, len(photometric.PARAM_COLUMNS))
    assert train.abstract_batch(config, 3, None)["global_crops"].dtype == np.float32
    config.data.augment_on_device = "yes"
    with pytest.raises(ValueError, match=r"config.data.augment_on_device='yes': must be one of "
                                         r"'auto', 'on', 'off'"):
        config_checks.check_pretrain_config(config)
    with pytest.raises(ValueError, match="use 'auto', 'on' or 'off'"):
        photometric.resolve_on_device("yes")


def test_tiny_run_with_augment_on_device(tmp_path, tiny_config, read_metrics):
    config = tiny_config(steps=2, num_devices=1)
    config.data.augment_on_device = "on"
    result = train.train_and_evaluate(config, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert result["step"] == 2 and all(np.isfinite(metrics[s]["loss"]) for s in (1, 2))
