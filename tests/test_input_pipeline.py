"""Input pipeline: sources, batches, resume, per-process sharding, device arrays, clear errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bam_jax import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(config=None, local=2):
    c = config or ip.default_data_config()
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


def test_default_config_fields():
    c = ip.default_data_config()
    assert c.source == "mnist_bundled" and c.global_crops_number == 2 and c.local_crops_number == 6
    assert tuple(c.blur_probs) == (1.0, 0.1, 0.5) and c.solarize_prob == 0.2


def test_bundled_mnist_loads_offline():
    data = ip.load_mnist_bundled()
    images, labels = data["train"]
    assert images.shape == (4000, 28, 28, 1) and images.dtype == np.uint8
    assert data["test"][0].shape == (1000, 28, 28, 1)
    assert set(np.unique(labels)) == set(range(10)) and set(np.unique(data["test"][1])) == set(range(10))
    c = ip.default_data_config()
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
    c = _tiny(local=0)
    full = _take(ip.create_pretrain_dataset(c, global_batch_size=16, seed=3), 4)
    resumed = _take(ip.create_pretrain_dataset(c, global_batch_size=16, seed=3, start_step=3), 1)
    np.testing.assert_array_equal(full[3]["global_crops"], resumed[0]["global_crops"])


def test_folder_source_skips_and_counts_bad_files(image_folder):
    c = _folder_config(image_folder)
    scanned = ip.scan_image_folder(image_folder, "train")
    assert scanned.skipped == 1  # notes.jpg
    assert scanned.class_names == ("class_0", "class_1", "class_2")
    assert ip.num_examples(c, "train") == 13 and ip.num_channels(c) == 3
    batches = _take(ip.create_pretrain_dataset(c, global_batch_size=4, seed=0), 6)
    assert batches[-1]["global_crops"].shape == (4, 2, 16, 16, 3)
    seen = sum(b["mask"].sum() for b in ip.create_eval_dataset(
        c, "train", global_batch_size=4).as_numpy_iterator())
    assert seen == 12  # the truncated JPEG is dropped at decode time instead of crashing


def test_folder_eval_split_labels(image_folder):
    c = _folder_config(image_folder)
    batches = list(ip.create_eval_dataset(c, "val", global_batch_size=4).as_numpy_iterator())
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


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


def test_device_iterator_shards_over_mesh():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    c = _tiny()
    ds = ip.create_pretrain_dataset(c, global_batch_size=16, seed=0)
    batches = ip.device_iterator(ds, mesh)
    for _ in range(3):
        batch = next(batches)
        assert isinstance(batch["global_crops"], jax.Array)
        assert batch["global_crops"].shape == (16, 2, 16, 16, 1)
        assert batch["local_crops"].shape == (16, 2, 8, 8, 1)
        assert batch["label"].sharding.spec == jax.sharding.PartitionSpec(("data",))
        assert len(batch["global_crops"].addressable_shards) == 8
        assert batch["global_crops"].addressable_shards[0].data.shape == (2, 2, 16, 16, 1)


def test_device_iterator_rejects_indivisible_batch():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    ds = ip.create_eval_dataset(_tiny(), "test", global_batch_size=12)
    with pytest.raises(ValueError, match="multiple of 8"):
        next(ip.device_iterator(ds, mesh))


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="process count 3"):
        ip.create_pretrain_dataset(_tiny(), global_batch_size=8, seed=0, process_index=0,
                                   process_count=3)


def test_empty_folder_is_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    c = _tiny()
    c.source = "folder"
    c.folder = str(tmp_path)
    with pytest.raises(ValueError, match="no images found"):
        ip.num_examples(c, "train")


def test_unprepared_tfds_is_clear_error(tmp_path):
    c = _tiny()
    c.source = "tfds"
    c.tfds_name = "mnist"
    c.data_dir = os.fspath(tmp_path)
    with pytest.raises(ValueError, match="not prepared"):
        ip.num_examples(c, "train")


def test_tf_has_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []


_THREADS = ("import tensorflow as tf; {before}from bam_jax import input_pipeline; "
            "t = tf.config.threading; "
            "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())")


@pytest.mark.parametrize("ops_before_import, expected", [(False, "1 1"), (True, "0 0")])
def test_tensorflow_ops_single_threaded_unless_initialised_first(ops_before_import, expected):
    # Fresh interpreters: the thread pools are fixed once TensorFlow runs its first op.
    before = "tf.constant(1.0) + 1.0; " if ops_before_import else ""
    result = subprocess.run([sys.executable, "-c", _THREADS.format(before=before)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == expected.split()
    assert ("initialised before bam_jax.input_pipeline" in result.stderr) == ops_before_import


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
