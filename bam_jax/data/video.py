"""Video object segmentation data: DAVIS-2017 (a folder or tfds) and synthetic moving digits.

A sequence is its frames (uint8 [T, H, W, C]) and its annotations (uint8 [T, H, W]: 0 background,
1..K the objects, 255 void). DAVIS-2017 comes either as its own folder layout

    <root>/ImageSets/2017/<split>.txt              one sequence name per line
    <root>/JPEGImages/480p/<sequence>/00000.jpg    frames
    <root>/Annotations/480p/<sequence>/00000.png   indexed PNGs (palette indices = object ids)

or as the tfds `davis/480p` dataset (splits `train` and `validation`). Without DAVIS, the
synthetic set (`synthetic_digit_videos`) moves held-out bundled digits over a static textured
background; they occlude one another, and their ground-truth masks are exact.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
from etils import epath

from bam_jax.data import pipeline

VOID = 255


@dataclasses.dataclass(frozen=True)
class Sequence:
    name: str
    frames: np.ndarray  # uint8 [T, H, W, C]
    masks: np.ndarray  # uint8 [T, H, W]; frames without an annotation are absent from the folder

    @property
    def num_objects(self) -> int:
        ids = np.unique(self.masks[0])
        return int(ids[(ids > 0) & (ids != VOID)].max(initial=0))


def davis_palette() -> np.ndarray:
    """[256, 3] uint8: the PASCAL VOC colour map, which DAVIS annotations use as their palette."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        label, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette[index] = (r, g, b)
    return palette


def write_indexed_png(path: epath.Path, mask: np.ndarray) -> None:
    """An indexed PNG with the DAVIS palette (the format DAVIS annotations and results use)."""
    from PIL import Image  # noqa: PLC0415 (only the output and annotation files need it)

    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    with path.open("wb") as f:
        image.save(f, format="PNG")


def read_indexed_png(path: epath.Path) -> np.ndarray:
    """The palette indices of an indexed PNG (TensorFlow's decoder would return its colours)."""
    from PIL import Image  # noqa: PLC0415

    with path.open("rb") as f:
        image = Image.open(f)
        if image.mode != "P":
            raise ValueError(f"{path} is not an indexed (palette) PNG, as DAVIS annotations are; "
                             f"write object ids as palette indices")
        return np.asarray(image, np.uint8)


def prepare_frames(frames: np.ndarray, size: tuple[int, int], channels: int, mean, std):
    """The frames as the backbone sees them: uint8 [T, H, W, c] -> normalised float32
    [T, h, w, channels], resized bilinearly as the official cv2.resize."""
    x = tf.convert_to_tensor(frames)
    if x.shape[-1] != channels:
        x = tf.image.rgb_to_grayscale(x) if channels == 1 else tf.image.grayscale_to_rgb(x)
    x = tf.image.resize(tf.cast(x, tf.float32) / 255.0, size, method="bilinear")
    return ((x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)).numpy()


def synthetic_digit_videos(*, num_sequences: int = 4, num_frames: int = 12, size: int = 64,
                           seed: int = 0) -> list[Sequence]:
    """Seeded sequences of 2 or 3 held-out bundled digits (the `test` split) moving at constant
    velocity and bouncing off the borders over a static blurred-noise background; later objects
    occlude earlier ones. An object's pixels are those where its digit's ink is at least half
    opaque and no later object covers it."""
    digits, _ = pipeline.load_mnist_bundled()["test"]
    digit = digits.shape[1]
    sequences = []
    for index in range(num_sequences):
        rng = np.random.default_rng([seed, index])
        noise = rng.uniform(0.0, 80.0, (size, size)).astype(np.float32)
        kernel = np.ones(5, np.float32) / 5.0
        background = np.apply_along_axis(lambda row: np.convolve(row, kernel, "same"), 0, noise)
        background = np.apply_along_axis(lambda row: np.convolve(row, kernel, "same"), 1,
                                         background)
        num_objects = 2 + index % 2
        ink = digits[rng.choice(len(digits), num_objects, replace=False), :, :, 0] / 255.0
        position = rng.uniform(0, size - digit, (num_objects, 2))
        velocity = rng.uniform(1.0, 3.0, (num_objects, 2)) * rng.choice([-1.0, 1.0],
                                                                      (num_objects, 2))
        frames = np.empty((num_frames, size, size, 1), np.uint8)
        masks = np.empty((num_frames, size, size), np.uint8)
        for t in range(num_frames):
            frame, mask = background.copy(), np.zeros((size, size), np.uint8)
            for obj in range(num_objects):
                y, x = np.round(position[obj]).astype(int)
                alpha = ink[obj]
                window = frame[y:y + digit, x:x + digit]
                frame[y:y + digit, x:x + digit] = window * (1 - alpha) + 255.0 * alpha
                mask[y:y + digit, x:x + digit][alpha >= 0.5] = obj + 1
            frames[t, :, :, 0] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
            masks[t] = mask
            position += velocity
            for axis in range(2):  # bounce off the borders
                low, high = position[:, axis] < 0, position[:, axis] > size - digit
                velocity[low | high, axis] *= -1
                position[:, axis] = np.clip(position[:, axis], 0, size - digit)
        sequences.append(Sequence(f"digits{index:02d}", frames, masks))
    return sequences


def write_davis_folder(sequences: list[Sequence], root: str, split: str = "val") -> None:
    """Writes sequences in the DAVIS-2017 folder layout (JPEG frames, indexed PNG annotations)."""
    root = epath.Path(root)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text(
        "".join(f"{s.name}\n" for s in sequences))
    for sequence in sequences:
        frame_dir = root / "JPEGImages" / "480p" / sequence.name
        mask_dir = root / "Annotations" / "480p" / sequence.name
        frame_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for t, (frame, mask) in enumerate(zip(sequence.frames, sequence.masks)):
            (frame_dir / f"{t:05d}.jpg").write_bytes(
                tf.io.encode_jpeg(frame, quality=100).numpy())
            write_indexed_png(mask_dir / f"{t:05d}.png", mask)


def davis_folder_names(root: str, split: str = "val",
                       sequences: tuple[str, ...] = ()) -> list[str]:
    """The sequence names of `<root>/ImageSets/2017/<split>.txt` (only `sequences` if given)."""
    listing = epath.Path(root) / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.exists():
        raise ValueError(f"{listing} not found: --config.video.folder must be a DAVIS-2017 root "
                         f"(ImageSets/2017, JPEGImages/480p, Annotations/480p)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    unknown = sorted(set(sequences) - set(names))
    if unknown:
        raise ValueError(f"sequences {unknown} are not in {listing}; pick from {names[:5]}…")
    return [name for name in names if not sequences or name in sequences]


def read_davis_folder(root: str, split: str = "val",
                      sequences: tuple[str, ...] = ()) -> Iterator[Sequence]:
    """The sequences of `davis_folder_names`, one at a time.

    Every frame needs its annotation (DAVIS-2017 train/val have them all: J and F are computed
    on every frame but the first and the last)."""
    root = epath.Path(root)
    for name in davis_folder_names(str(root), split, sequences):
        frame_paths = sorted((root / "JPEGImages" / "480p" / name).glob("*.jpg"))
        if not frame_paths:
            raise ValueError(f"no frames in {root / 'JPEGImages' / '480p' / name}")
        mask_paths = [root / "Annotations" / "480p" / name / (p.stem + ".png")
                      for p in frame_paths]
        missing = [p.name for p in mask_paths if not p.exists()]
        if missing:
            raise ValueError(f"sequence {name} lacks the annotations {missing[:3]} (of "
                             f"{len(missing)}): J and F need every frame's annotation")
        frames = np.stack([tf.io.decode_jpeg(p.read_bytes(), channels=3).numpy()
                           for p in frame_paths])
        masks = np.stack([read_indexed_png(p) for p in mask_paths])
        yield Sequence(name, frames, masks)


def read_davis_tfds(name: str, split: str, data_dir: str | None,
                    sequences: tuple[str, ...] = ()) -> Iterator[Sequence]:
    """The sequences of a prepared tfds DAVIS dataset (e.g. `davis/480p`, split `validation`)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as error:
        raise ValueError(f"tfds dataset {name!r} split {split!r} is not prepared in "
                         f"{data_dir or 'the tfds default data_dir'} ({error}); prepare it with "
                         f"`tfds build {name}` or use --config.video.source=folder") from None
    for example in dataset.as_numpy_iterator():
        video_name = example["metadata"]["video_name"]
        video_name = video_name.decode() if isinstance(video_name, bytes) else str(video_name)
        if sequences and video_name not in sequences:
            continue
        yield Sequence(video_name, example["video"]["frames"],
                       example["video"]["segmentations"][..., 0])
