"""Input pipeline (bam_jax/data/pipeline.py): sources, batches, resume, per-process sharding,
device arrays, clear errors. Bad files in a folder, an empty folder and an unprepared tfds dataset
through `bam_jax.main`: test_faults.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bam_jax.data import pipeline as ip
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mnist():
    return common.data_config(source="mnist_bundled", eval_split="test")


def _tiny(config=None, local=2):
    c = config or _mnist()
    c.global_crop_size = 16
    c.local_crop_size = 8
    c.local_crops_number = local
    c.eval_resize = 16
    c.eval_crop_size = 16
    return c


def _take(ds, n):
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train: 3 classes x 4 JPEGs + a non-image file + a truncated JPEG; val: 3 x 2 PNG/JPEGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for c in range(3):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
                encode = tf.io.encode_png if (split == "val" and i == 0) else tf.io.encode_jpeg
                (d / f"{i}.img").write_bytes(encode(pixels).numpy())
    (root / "train" / "class_0" / "notes.jpg").write_bytes(b"this is not an image")
    good = tf.io.encode_jpeg(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).numpy()
    (root / "train" / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return str(root)


def _folder_config(root):
    c = _tiny()
    c.source = "folder"
    c.folder = root
    c.eval_split = "val"
    return c


def test_bundled_mnist_loads_offline():
    data = ip.load_mnist_bundled()
    images, labels = data["train"]
    assert images.shape == (4000, 28, 28, 1) and images.dtype == np.uint8
    assert data["test"][0].shape == (1000, 28, 28, 1)
    assert set(np.unique(labels)) == set(range(10)) and set(np.unique(data["test"][1])) == set(range(10))
    c = _mnist()
    assert ip.num_examples(c, "train") == 4000 and ip.num_examples(c, "test") == 1000
    assert ip.num_channels(c) == 1


def test_pretrain_batches_shapes_and_determinism():
    c = _tiny()
    ds = ip.create_pretrain_dataset(c, global_batch_size=8, seed=1, process_index=0, process_count=2)
    a, b = _take(ds, 2)
    assert a["global_crops"].shape == (4, 2, 16, 16, 1) and a["global_crops"].dtype == np.float32
    assert a["local_crops"].shape == (4, 2, 8, 8, 1)
    assert a["label"].shape == (4,) and a["label"].dtype == np.int32
    again = _take(ip.create_pretrain_dataset(c, global_batch_size=8, seed=1, process_index=0,
                                             process_count=2), 1)[0]
    np.testing.assert_array_equal(a["global_crops"], again["global_crops"])
    other = _take(ip.create_pretrain_dataset(c, global_batch_size=8, seed=2, process_index=0,
                                             process_count=2), 1)[0]
    assert not np.array_equal(a["global_crops"], other["global_crops"])
    host1 = _take(ip.create_pretrain_dataset(c, global_batch_size=8, seed=1, process_index=1,
                                             process_count=2), 1)[0]
    assert not np.array_equal(a["global_crops"], host1["global_crops"])


def test_no_local_crops_key_when_zero():
    c = _tiny(local=0)
    batch = _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0), 1)[0]
    assert set(batch) == {"global_crops", "label"}


def test_start_step_resumes_across_epochs(image_folder):
    # The clean "val" split (6 images) with batch 4: batches straddle epoch boundaries.
    c = _folder_config(image_folder)
    c.train_split = "val"
    full = _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=5), 8)
    resumed = _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=5, start_step=5), 3)
    for a, b in zip(full[5:], resumed):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["global_crops"], b["global_crops"])
        np.testing.assert_allclose(a["local_crops"], b["local_crops"])


def test_start_step_resume_bundled():
    # The trainer's resume: `start_step=k` yields exactly the continuous stream's batches from k.
    c = _tiny(local=2)
    full = _take(ip.create_pretrain_dataset(c, global_batch_size=16, seed=3), 5)
    for start in (2, 3, 4):
        resumed = _take(ip.create_pretrain_dataset(c, global_batch_size=16, seed=3,
                                                   start_step=start), 5 - start)
        assert len(resumed) == 5 - start
        for a, b in zip(resumed, full[start:]):
            assert set(a) == set(b) == {"global_crops", "local_crops", "label"}
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(full[2]["global_crops"], full[3]["global_crops"])


def _run_python(code: str, *args: str, timeout: float = 240, **env):
    """`code` in a fresh interpreter (killed after `timeout` s): (return code, stdout, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **env}
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


_FIRST_BATCH = """
import sys
from bam_jax.data import pipeline as ip
from configs import common
c = common.data_config(source="mnist_bundled", eval_split="test")
c.update(source="folder", folder=sys.argv[1], global_crop_size=16, local_crops_number=0)
try:
    next(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0).as_numpy_iterator())
except ValueError as e:
    print(repr(e))
    sys.exit(3)
"""


@pytest.mark.slow
def test_undecodable_folder_is_one_clear_error(tmp_path):
    # Was: an endless tf.data loop at 100 % CPU, logging a warning per file and deaf to SIGTERM.
    rng = np.random.default_rng(0)
    d = tmp_path / "train" / "class_0"
    d.mkdir(parents=True)
    for i in range(4):
        good = tf.io.encode_jpeg(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).numpy()
        (d / f"{i}.jpg").write_bytes(good[: len(good) // 3])
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    (d / "4.png").write_bytes(png[:16] + rng.bytes(100))  # a valid magic number, then garbage
    code, out, err = _run_python(_FIRST_BATCH, str(tmp_path))
    assert code == 3, err[-2000:]
    assert out == (f"ValueError(\"folder source: none of the 5 image files under "
                   f"'{tmp_path / 'train'}' can be decoded (class_0/0.jpg, class_0/1.jpg, "
                   "class_0/2.jpg, ...); they are truncated, corrupt or unreadable: replace them, "
                   "or point config.data.folder at a tree of readable images\")\n")


def test_one_undecodable_image_keeps_exact_resume(image_folder):
    # train: 12 images that decode and the truncated JPEG; batch 5 straddles the epochs.
    c = _folder_config(image_folder)
    full = _take(ip.create_pretrain_dataset(c, global_batch_size=5, seed=2), 8)
    labels = np.concatenate([b["label"] for b in full])
    for epoch in range(3):  # every epoch is the 12 good images once: 4 per class
        assert np.bincount(labels[12 * epoch : 12 * (epoch + 1)]).tolist() == [4, 4, 4]
    for start in (2, 5):
        resumed = _take(ip.create_pretrain_dataset(c, global_batch_size=5, seed=2,
                                                   start_step=start), 8 - start)
        for a, b in zip(full[start:], resumed):
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
            np.testing.assert_array_equal(a["local_crops"], b["local_crops"])


_EPOCHS_THEN_MORE = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from bam_jax.data import pipeline as ip
from configs import common
c = common.data_config(source="mnist_bundled", eval_split="test")
c.update(source="folder", folder=sys.argv[1], global_crop_size=16, local_crops_number=0,
         eval_resize=16, eval_crop_size=16)
batches = ip.create_pretrain_dataset(c, global_batch_size=4, seed=0).as_numpy_iterator()
for _ in range(3):  # one epoch
    next(batches)
print("ONE EPOCH READ", file=sys.stderr, flush=True)
for _ in range(12):  # four more
    next(batches)
for _ in ip.create_eval_dataset(c, "train", global_batch_size=4).as_numpy_iterator():
    pass
for _ in ip.create_box_dataset(c, image_size=8, global_batch_size=4).as_numpy_iterator():
    pass
"""


@pytest.mark.slow
def test_undecodable_image_warnings_do_not_grow_with_epochs(image_folder):
    # tf.data's own warnings are C++ logs: shown only with TF_CPP_MIN_LOG_LEVEL=0, in a child.
    code, _, err = _run_python(_EPOCHS_THEN_MORE, image_folder, TF_CPP_MIN_LOG_LEVEL="0")
    assert code == 0, err[-2000:]
    first, more = err.split("ONE EPOCH READ")
    summary = ("folder source: left out 1 of 13 image files under "
               f"{os.path.join(image_folder, 'train')} that cannot be decoded (truncated, "
               "corrupt or unreadable): class_1/truncated.jpg")
    assert first.count(summary) == 1

    def about_decoding(text):
        return [line for line in text.splitlines()
                if any(w in line for w in ("truncated", "JPEG", "decode", "Error raised"))]

    assert len(about_decoding(first)) <= 2  # the summary and libjpeg's complaint while checking
    assert about_decoding(more) == []


def test_folder_eval_split_labels(image_folder):
    c = _folder_config(image_folder)
    batches = list(ip.create_eval_dataset(c, "val", global_batch_size=4).as_numpy_iterator())
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_a_subset_of_examples_is_all_that_both_streams_read(image_folder):
    """`examples=` (a labelled subset): the eval pass yields exactly those rows, in their order,
    split over processes; the train stream draws every epoch from them alone."""
    c = _folder_config(image_folder)
    c.eval_resize = c.eval_crop_size
    examples = np.array([7, 2, 9, 0, 4])
    full = list(ip.create_eval_dataset(c, "train", global_batch_size=4).as_numpy_iterator())
    images = np.concatenate([b["image"][b["mask"]] for b in full])
    labels = np.concatenate([b["label"][b["mask"]] for b in full])
    parts = [list(ip.create_eval_dataset(c, "train", global_batch_size=4, examples=examples,
                                         process_index=p, process_count=2).as_numpy_iterator())
             for p in range(2)]
    sub = [b for part in parts for b in part]
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in sub]),
                                  images[examples])
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in sub]),
                                  labels[examples])

    c.update(global_crops_number=1, local_crops_number=0, global_crops_scale=(1.0, 1.0))
    stream = ip.create_pretrain_dataset(c, global_batch_size=5, seed=0, examples=examples)
    for batch in stream.take(3).as_numpy_iterator():  # 3 epochs of the 5 examples
        assert sorted(batch["label"].tolist()) == sorted(labels[examples].tolist())
    with pytest.raises(ValueError, match=r"example indices must lie in \[0, 12\)"):
        ip.create_eval_dataset(c, "train", global_batch_size=4, examples=np.array([12]))


def test_eval_sharding_covers_split_once():
    c = _tiny()
    single = list(ip.create_eval_dataset(c, "test", global_batch_size=24, process_index=0,
                                         process_count=1).as_numpy_iterator())
    hosts = [list(ip.create_eval_dataset(c, "test", global_batch_size=48, process_index=p,
                                         process_count=2).as_numpy_iterator()) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == ip.num_eval_batches(1000, 48, 2) == 21
    for batches in [single] + hosts:
        assert all(b["image"].shape == (24, 16, 16, 1) and b["mask"].dtype == bool for b in batches)

    def real(batches):
        return (np.concatenate([b["image"][b["mask"]] for b in batches]),
                np.concatenate([b["label"][b["mask"]] for b in batches]))

    images, labels = real(single)
    split_images = np.concatenate([real(h)[0] for h in hosts])
    split_labels = np.concatenate([real(h)[1] for h in hosts])
    assert len(labels) == len(split_labels) == 1000
    np.testing.assert_array_equal(labels, split_labels)
    np.testing.assert_allclose(images, split_images)
    assert not single[-1]["mask"].all()  # 1000 = 41 * 24 + 16: the last batch is padded


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="the 3 processes"):
        ip.create_pretrain_dataset(_tiny(), global_batch_size=8, seed=0, process_index=0,
                                   process_count=3)


# Records what the pipeline asks of tf.config.set_visible_devices (there is no GPU to hide here:
# the request itself is the effect), then prints the thread pools' sizes.
_THREADS = ("import tensorflow as tf; hidden = []; "
            "tf.config.set_visible_devices = lambda devices, kind: hidden.append((devices, kind)); "
            "{before}from bam_jax.data import pipeline; "
            "t = tf.config.threading; print(hidden); "
            "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())")


@pytest.mark.slow
@pytest.mark.parametrize("ops_before_import, expected", [(False, "1 1"), (True, "0 0")])
def test_tensorflow_ops_single_threaded_unless_initialised_first(ops_before_import, expected):
    # Fresh interpreters: the thread pools are fixed once TensorFlow runs its first op.
    before = "tf.constant(1.0) + 1.0; " if ops_before_import else ""
    result = subprocess.run([sys.executable, "-c", _THREADS.format(before=before)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[-1].split() == expected.split()
    # TensorFlow, the host-side loader only, is told to see no GPU and no TPU.
    assert lines[-2] == "[([], 'GPU'), ([], 'TPU')]", result.stdout
    assert ("initialised before bam_jax.data.pipeline" in result.stderr) == ops_before_import


class TinyDigits(tfds.core.GeneratorBasedBuilder):
    """A 21 + 7 example one-channel tfds dataset prepared locally, to test the tfds source offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(12, 10, 1)),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(21), "test": self._generate_examples(7)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (12, 10, 1), dtype=np.uint8), "label": i % 3}


def test_tfds_source_resume_and_eval_sharding(tmp_path):
    TinyDigits(data_dir=os.fspath(tmp_path)).download_and_prepare()
    c = _tiny()
    c.source = "tfds"
    c.tfds_name = "tiny_digits"
    c.data_dir = os.fspath(tmp_path)
    assert ip.num_examples(c, "train") == 21 and ip.num_channels(c) == 1
    kwargs = dict(global_batch_size=4, seed=0, process_index=1, process_count=2)
    full = _take(ip.create_pretrain_dataset(c, **kwargs), 9)  # 10 per host: crosses epochs
    resumed = _take(ip.create_pretrain_dataset(c, start_step=6, **kwargs), 3)
    assert full[0]["global_crops"].shape == (2, 2, 16, 16, 1)
    for a, b in zip(full[6:], resumed):
        np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
    batches = [b for p in range(2) for b in ip.create_eval_dataset(
        c, "test", global_batch_size=4, process_index=p, process_count=2).as_numpy_iterator()]
    assert len(batches) == 4 and sum(b["mask"].sum() for b in batches) == 7


def _plain(config):
    """No photometric op and identity normalisation: a crop's pixels are the image's, in [0, 1]."""
    config.color_jitter_prob = 0.0
    config.grayscale_prob = 0.0
    config.blur_probs = (0.0, 0.0, 0.0)
    config.solarize_prob = 0.0
    channels = ip.num_channels(config)
    config.mean, config.std = (0.0,) * channels, (1.0,) * channels
    return config


class ConstDigits(TinyDigits):
    """21 + 7 examples in 4 + 1 TFRecord files; example i is the constant image 10 * i, so that
    a view's pixels tell which example it came from."""

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((12, 10, 1), 10 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def const_tfds(tmp_path_factory):
    data_dir = os.fspath(tmp_path_factory.mktemp("tfds"))
    ConstDigits(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    c = _tiny(local=0)
    c.source = "tfds"
    c.tfds_name = "const_digits"
    c.data_dir = data_dir
    return _plain(c)


def _stored_values(config, split):
    """Pixel value of each ConstDigits example in stored order, i.e. by index in the split."""
    builder = tfds.builder("const_digits", data_dir=config.data_dir)
    ds = builder.as_dataset(split, shuffle_files=False)
    return np.array([int(ex["image"][0, 0, 0]) for ex in ds])


def _keys(batches):
    """ConstDigits key (value / 10) of the example behind every row of train batches."""
    values = np.concatenate([b["global_crops"][:, 0].mean(axis=(1, 2, 3)) for b in batches])
    return np.round(values * 255 / 10).astype(int)


def test_read_tfrecords_slice_of_permuted_files(const_tfds):
    c = const_tfds
    src = ip._source(c)
    paths, lengths = src.tfds_shards("train")
    assert lengths == [5, 5, 6, 5]
    order = [2, 0, 3, 1]  # positions: file 2 at 0..5, file 0 at 6..10, file 3 at 11..15, ...
    ds = ip._read_tfrecords(paths, lengths, tf.constant(order), 3, 17, files_at_once=1)
    example = src.example_fn("train")
    pairs = [(int(i), int(example(i, r)[0][0, 0, 0])) for i, r in ds]
    stored = np.cumsum([0] + lengths)
    expected = np.concatenate([np.arange(stored[f], stored[f + 1]) for f in order])[3:17]
    assert [i for i, _ in pairs] == expected.tolist()
    values = _stored_values(c, "train")
    assert all(v == values[i] for i, v in pairs)  # the index is the record's place in the split


def test_tfds_epochs_permute_files(const_tfds):
    # A one-record shuffle buffer leaves only the per-epoch file permutation and interleave.
    c = const_tfds.copy_and_resolve_references()
    c.shuffle_buffer = 1
    epochs = _keys(_take(ip.create_pretrain_dataset(c, global_batch_size=3, seed=0), 14))
    first, second = epochs[:21], epochs[21:]
    assert sorted(first) == sorted(second) == list(range(21))
    assert not np.array_equal(first, second)
    hosts = [_keys(_take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0,
                                                    process_index=p, process_count=2), 10))
             for p in range(2)]
    for e in range(2):  # 10 examples per host per epoch, the 21st dropped
        block = [set(h[10 * e : 10 * (e + 1)]) for h in hosts]
        assert len(block[0]) == len(block[1]) == 10 and not block[0] & block[1]
    assert set(hosts[0][:10]) != set(hosts[0][10:])  # the files move between hosts


def test_tfds_resume_mid_epoch_with_buffer(const_tfds):
    c = const_tfds.copy_and_resolve_references()
    c.shuffle_buffer = 4
    kwargs = dict(global_batch_size=4, seed=7, process_index=1, process_count=2)
    full = _take(ip.create_pretrain_dataset(c, **kwargs), 9)
    resumed = _take(ip.create_pretrain_dataset(c, start_step=3, **kwargs), 6)
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
    assert sorted(_keys(full[:5])) != sorted(_keys(full[5:]))


def _box_batches(c, image_size, batch, count):
    return [list(ip.create_box_dataset(c, image_size=image_size, global_batch_size=batch,
                                       process_index=p, process_count=count).as_numpy_iterator())
            for p in range(count)]


def test_box_dataset_covers_split_once(const_tfds):
    hosts = _box_batches(const_tfds, 8, 4, 2)
    values = _stored_values(const_tfds, "train")
    assert len(hosts[0]) == len(hosts[1]) == ip.num_eval_batches(21, 4, 2)
    indices = []
    for batches in hosts:
        for b in batches:
            assert set(b) == {"image", "index", "mask"}
            assert b["image"].shape == (2, 8, 8, 1) and b["index"].dtype == np.int32
            assert (b["index"][~b["mask"]] == -1).all()
            real = b["image"][b["mask"]]
            # Each image must be the example its index names in tfds's stored order.
            expected = values[b["index"][b["mask"]]][:, None, None, None] / 255
            np.testing.assert_allclose(real, np.broadcast_to(expected, real.shape), atol=1e-5)
            indices += b["index"][b["mask"]].tolist()
    assert indices == list(range(21))  # each once, host 0's first, in index order
    assert not hosts[1][-1]["mask"].all()


def test_box_dataset_in_memory_covers_split_once():
    hosts = _box_batches(_tiny(), 4, 1000, 2)
    assert len(hosts[0]) == len(hosts[1]) == 4  # 2,000 examples each, 500 a batch
    indices = [i for h in hosts for b in h for i in b["index"][b["mask"]]]
    assert indices == list(range(4000))


def test_box_dataset_resize_is_pil_bilinear():
    from PIL import Image

    c = _tiny()
    images = ip.load_mnist_bundled()["train"][0]
    mean, std = ip.mean_std(c, 1)
    for size in (12, 56):  # shrinking (antialiased) and enlarging
        first = _take(ip.create_box_dataset(c, image_size=size, global_batch_size=8), 1)[0]
        assert first["image"].shape == (8, size, size, 1)
        assert first["index"].tolist() == list(range(8))
        for i in range(3):
            pil = Image.fromarray(images[i, :, :, 0]).resize((size, size), Image.BILINEAR)
            ours = first["image"][i, :, :, 0] * std[0] + mean[0]
            np.testing.assert_allclose(ours, np.asarray(pil) / 255.0, atol=1.01 / 255)  # PIL rounds


# Quadrant values of every image of `quadrant_folder`, as (top, bottom) x (left, right).
_QUADRANTS = np.array([[200, 150], [100, 50]])


@pytest.fixture(scope="module")
def quadrant_folder(tmp_path_factory):
    """train: 2 classes x 3 PNGs of 64 x 64 whose quadrants are constant (`_QUADRANTS`)."""
    root = tmp_path_factory.mktemp("quadrants")
    image = np.repeat(np.repeat(_QUADRANTS, 32, 0), 32, 1).astype(np.uint8)
    for c in range(2):
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(tf.io.encode_png(np.stack([image] * 3, -1)).numpy())
    c = _plain(_folder_config(str(root)))
    c.global_crops_scale = c.local_crops_scale = (0.02, 0.05)  # crops of at most 17 pixels a side
    return c


def _corner_box(top: bool, left: bool):
    """A box a tenth of the image wide, in one corner."""
    h = (0.0, 0.1) if top else (0.9, 1.0)
    w = (0.0, 0.1) if left else (0.9, 1.0)
    return [h[0], w[0], h[1], w[1]]


def _crop_values(batch):
    """The pixels of all crops of each example of a plain batch, as 0..255: [b, pixels]."""
    crops = [batch["global_crops"], batch["local_crops"]]
    return np.concatenate([np.reshape(x, (len(x), -1)) for x in crops], axis=1) * 255


def test_boxes_place_crops_in_their_corner(quadrant_folder):
    c = quadrant_folder
    # Examples 0-2 are class 0, 3-5 class 1: class 0 gets the top-right box, class 1 bottom-left.
    boxes = np.array([_corner_box(True, False)] * 3 + [_corner_box(False, True)] * 3, np.float32)
    for batch in _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0, boxes=boxes), 3):
        expected = np.where(batch["label"] == 0, _QUADRANTS[0, 1], _QUADRANTS[1, 0])
        values = _crop_values(batch)
        np.testing.assert_allclose(values, np.broadcast_to(expected[:, None], values.shape),
                                   atol=1e-3)
    plain = _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0), 3)
    assert len(np.unique(np.round(np.concatenate([_crop_values(b) for b in plain])))) > 2


def test_boxes_apply_from_their_epoch(quadrant_folder):
    # 6 examples, batch 4: batch 0 is epoch 0, batch 1 half epoch 0 and half epoch 1, then epoch 1.
    c = quadrant_folder
    kwargs = dict(global_batch_size=4, seed=3)
    plain = _take(ip.create_pretrain_dataset(c, **kwargs), 3)
    corner = _take(ip.create_pretrain_dataset(
        c, boxes=np.array([_corner_box(True, True)] * 6), ccrop_from_epoch=1, **kwargs), 3)
    whole = _take(ip.create_pretrain_dataset(
        c, boxes=np.array([[0.0, 0.0, 1.0, 1.0]] * 6), ccrop_from_epoch=1, **kwargs), 3)
    for key in ("global_crops", "local_crops"):
        for boxed in (corner, whole):
            np.testing.assert_array_equal(boxed[0][key], plain[0][key])
            np.testing.assert_array_equal(boxed[1][key][:2], plain[1][key][:2])
    corner_values = np.concatenate([_crop_values(corner[1])[2:], _crop_values(corner[2])])
    whole_values = np.concatenate([_crop_values(whole[1])[2:], _crop_values(whole[2])])
    np.testing.assert_allclose(corner_values, _QUADRANTS[0, 0], atol=1e-3)
    for a, b in zip(corner_values, whole_values):  # every example of epoch 1 is cropped anew
        assert not np.array_equal(a, b)


def test_boxes_resume_exactly(quadrant_folder):
    c = quadrant_folder
    boxes = np.random.default_rng(0).uniform(0.0, 0.5, (6, 4)).astype(np.float32)
    boxes[:, 2:] += 0.5  # (h_min, w_min) < 0.5 <= (h_max, w_max)
    kwargs = dict(global_batch_size=4, seed=1, boxes=boxes, ccrop_from_epoch=1, ccrop_alpha=0.4)
    full = _take(ip.create_pretrain_dataset(c, **kwargs), 6)
    for start in (1, 4):
        resumed = _take(ip.create_pretrain_dataset(c, start_step=start, **kwargs), 6 - start)
        for a, b in zip(full[start:], resumed):
            np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
            np.testing.assert_array_equal(a["local_crops"], b["local_crops"])


def test_boxes_of_wrong_shape_are_clear_error(quadrant_folder):
    with pytest.raises(ValueError, match=r"boxes must have shape \(6, 4\).*got shape \(5, 4\)"):
        ip.create_pretrain_dataset(quadrant_folder, global_batch_size=4, seed=0,
                                   boxes=np.zeros((5, 4), np.float32))


def _real_rows(batches, key):
    """(index, `key` value) of the real rows of padded batches, in order."""
    return [(int(i), v) for b in batches for i, v in zip(b["index"][b["mask"]], b[key][b["mask"]])]


def test_eval_and_box_passes_leave_out_the_undecodable_image(image_folder):
    c = _plain(_folder_config(image_folder))
    scanned = ip.scan_image_folder(image_folder, "train")
    for count in (1, 2):
        evals = [list(ip.create_eval_dataset(c, "train", global_batch_size=4 * count,
                                             process_index=p, process_count=count)
                      .as_numpy_iterator()) for p in range(count)]
        assert len({len(h) for h in evals}) == 1
        labels = [label for h in evals for b in h for label in b["label"][b["mask"]]]
        assert labels == list(scanned.labels)  # the 12 good images once each, in index order
        assert all((b["label"][~b["mask"]] == -1).all() for h in evals for b in h)
        rows = [row for h in _box_batches(c, 8, 4 * count, count) for row in _real_rows(h, "image")]
        assert [i for i, _ in rows] == list(range(12))
        for i, image in rows:  # each row is the image its index names
            decoded = tf.io.decode_image(tf.io.read_file(scanned.paths[i]), 3)
            expected = tf.image.resize(decoded, [8, 8], "bilinear", antialias=True) / 255
            np.testing.assert_allclose(image, expected, atol=1e-5)


def _truncate_record(config, split: str, index: int) -> None:
    """Rewrites a prepared tfds split with the image of record `index` cut to half its bytes."""
    paths, lengths = ip._source(config).tfds_shards(split)
    file = int(np.searchsorted(np.cumsum(lengths), index, side="right"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(paths[file])]
    position = index - sum(lengths[:file])
    example = tf.train.Example.FromString(records[position])
    image = example.features.feature["image"].bytes_list.value
    image[0] = image[0][: len(image[0]) // 2]
    records[position] = example.SerializeToString()
    with tf.io.TFRecordWriter(paths[file]) as writer:
        for record in records:
            writer.write(record)


def test_tfds_undecodable_record_keeps_positions(tmp_path):
    data_dir = os.fspath(tmp_path)
    ConstDigits(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    c = _tiny(local=0)
    c.update(source="tfds", tfds_name="const_digits", data_dir=data_dir)
    c = _plain(c)
    values = _stored_values(c, "train")
    bad = 7
    _truncate_record(c, "train", bad)
    kwargs = dict(global_batch_size=3, seed=4)
    full = _take(ip.create_pretrain_dataset(c, **kwargs), 14)  # two epochs of 21 positions
    keys = _keys(full)
    for epoch in (keys[:21], keys[21:]):  # the bad record's position goes to the next example
        assert set(epoch) == set(range(21)) - {values[bad] // 10}
    for start in (5, 9):
        resumed = _take(ip.create_pretrain_dataset(c, start_step=start, **kwargs), 14 - start)
        for a, b in zip(full[start:], resumed):
            np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
    hosts = _box_batches(c, 8, 4, 2)
    assert len(hosts[0]) == len(hosts[1]) == ip.num_eval_batches(21, 4, 2)
    rows = [row for h in hosts for row in _real_rows(h, "image")]
    assert [i for i, _ in rows] == [i for i in range(21) if i != bad]
    for i, image in rows:
        np.testing.assert_allclose(image, np.full_like(image, values[i] / 255), atol=1e-5)
