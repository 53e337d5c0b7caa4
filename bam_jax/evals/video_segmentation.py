"""Video object segmentation by label propagation (DAVIS-2017), as the official
`eval_video_segmentation.py` (itself DINO's): no training, the first frame's annotation is carried
through the video by nearest-neighbour affinities between frozen per-location features.

    python -m bam_jax.evals.video_segmentation --workdir=DIR                     # synthetic digits
    python -m bam_jax.evals.video_segmentation --workdir=DIR --random_init       # same net at init
    python -m bam_jax.evals.video_segmentation --workdir=DIR \\
        --config.video.source=folder --config.video.folder=/data/DAVIS           # DAVIS-2017 val

Per target frame: L2-normalised features of the target against those of the first frame and of
the `n_last_frames` previous frames (whose soft predictions are the labels they pass on);
affinities exp(cos / temperature), restricted to a `size_mask_neighborhood` window around each
target location, of which the `topk` largest per target location are kept and normalised; the
labels are upsampled bilinearly by the feature stride, min-max normalised per object, and the
argmax, resized (nearest) to the frame's size, is the prediction. J (region IoU) and F (boundary
F-measure, tolerance 0.8 % of the diagonal) follow the DAVIS-2017 toolkit: per object, averaged
over every frame but the first and the last, then over objects. The masks are written as
indexed PNGs with the DAVIS palette, a per-sequence CSV and a picture strip per sequence; the
means go to DIR/metrics.jsonl as `davis_j_mean`, `davis_f_mean`, `davis_jf_mean` (with `init_`
after `davis_` for --random_init).
"""
from __future__ import annotations

import csv
import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from scipy import ndimage

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import cli, sharding, train
from bam_jax.data import pipeline, video


def video_config() -> ml_collections.ConfigDict:
    """`--config.video.*`: the data and the official script's defaults."""
    return ml_collections.ConfigDict(dict(
        source="synthetic",  # "synthetic" (moving bundled digits) | "folder" | "tfds"
        folder="",  # a DAVIS-2017 root (ImageSets/2017, JPEGImages/480p, Annotations/480p)
        split="val",  # folder: ImageSets/2017/<split>.txt; tfds: e.g. "validation"
        tfds_name="davis/480p",
        data_dir=ml_collections.FieldReference(None, field_type=str),  # tfds data_dir
        sequences="",  # comma-separated names: only these sequences
        # Frames resized to this short side (0: their own), the long side then floored to a
        # multiple of 64 (official read_frame at 480: DAVIS 480p frames of 854 px become 832).
        short_side=0,
        n_last_frames=7,  # official --n_last_frames
        size_mask_neighborhood=12,  # official --size_mask_neighborhood (0: no restriction)
        topk=5,  # official --topk
        temperature=0.1,  # official --t
        use_teacher=True,  # official --use_teacher: the teacher's backbone when the run has one
        batch_size=8,  # frames per feature pass (global, sharded over the devices)
        synthetic_sequences=4, synthetic_frames=12, synthetic_size=64,
    ))


def overrides_config() -> ml_collections.ConfigDict:
    def keep(field_type):
        return ml_collections.FieldReference(None, field_type=field_type)

    return ml_collections.ConfigDict(dict(
        video=video_config(), mesh=dict(num_devices=keep(int), fsdp=keep(int))))


# ---------------------------------------------------------------------------------------------
# Label propagation.


def neighbourhood_mask(h: int, w: int, size: int) -> np.ndarray:
    """[h*w (target), h*w (source)] bool: the source lies within `size` rows and columns of the
    target (the official `restrict_neighborhood`)."""
    rows, cols = np.divmod(np.arange(h * w), w)
    return ((np.abs(rows[:, None] - rows[None, :]) <= size)
            & (np.abs(cols[:, None] - cols[None, :]) <= size))


@functools.partial(jax.jit, static_argnames=("temperature", "topk"))
def propagate(target, sources, source_labels, source_valid, neighbourhood, *, temperature: float,
              topk: int):
    """Labels [h*w, C] of a target frame from its context frames.

    target [h*w, D], sources [n, h*w, D] (unnormalised features), source_labels [n, h*w, C],
    source_valid [n] (padding contexts contribute nothing), neighbourhood [h*w, h*w] bool or
    None. Keeps, per target location, the affinities at least as large as its `topk`-th largest
    (ties kept, as the official `aff[aff < tk_val_min] = 0`).
    """
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    affinity = jnp.exp(jnp.einsum("td,nsd->nts", unit(target), unit(sources),
                                  precision=jax.lax.Precision.HIGHEST) / temperature)
    affinity = affinity * source_valid[:, None, None]
    if neighbourhood is not None:
        affinity = affinity * neighbourhood[None]
    affinity = jnp.moveaxis(affinity, 1, 0).reshape(target.shape[0], -1)  # [target, n * source]
    threshold = jax.lax.top_k(affinity, topk)[0][:, -1:]
    affinity = jnp.where(affinity < threshold, 0.0, affinity)
    affinity = affinity / jnp.sum(affinity, axis=1, keepdims=True)
    return jnp.einsum("ts,sc->tc", affinity, source_labels.reshape(-1, source_labels.shape[-1]),
                      precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("stride",))
def labels_to_mask(labels, stride: int):
    """Soft labels [h, w, C] -> object ids [h*stride, w*stride]: bilinear upsampling (half-pixel
    centres, as torch's align_corners=False), each object's map min-max normalised where its
    maximum is positive (official `norm_mask`), argmax."""
    h, w, c = labels.shape
    up = jax.image.resize(labels, (h * stride, w * stride, c), "bilinear")
    low = up.min(axis=(0, 1), keepdims=True)
    span = up.max(axis=(0, 1), keepdims=True) - low
    normed = jnp.where((up.max(axis=(0, 1), keepdims=True) > 0) & (span > 0),
                       (up - low) / jnp.where(span > 0, span, 1.0), up)
    return jnp.argmax(normed, axis=-1).astype(jnp.uint8)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's nearest-neighbour resize (the official output step): source index
    floor((i + 0.5) * in / out)."""
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int),
                      mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int),
                      mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------
# DAVIS metrics (the davis2017-evaluation toolkit's definitions).


def region_similarity(prediction: np.ndarray, truth: np.ndarray,
                      void: np.ndarray | None = None) -> float:
    """J: intersection over union of two boolean masks outside `void`; 1 when both are empty."""
    keep = np.ones_like(truth, bool) if void is None else ~void
    union = np.sum((prediction | truth) & keep)
    if union == 0:
        return 1.0
    return float(np.sum(prediction & truth & keep) / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a boolean mask (the toolkit's `_seg2bmap` at the mask's size)."""
    east, south, south_east = (np.zeros_like(mask) for _ in range(3))
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def boundary_f_measure(prediction: np.ndarray, truth: np.ndarray,
                       void: np.ndarray | None = None, tolerance: float = 0.008) -> float:
    """F: the F-measure of the two masks' boundaries, a boundary pixel matching when the other
    boundary lies within ceil(tolerance * image diagonal) pixels (a disk)."""
    if void is not None:
        prediction, truth = prediction & ~void, truth & ~void
    radius = int(math.ceil(tolerance * math.hypot(*truth.shape)))
    predicted_boundary, true_boundary = _boundary(prediction), _boundary(truth)
    disk = _disk(radius)
    predicted_near = ndimage.binary_dilation(predicted_boundary, structure=disk)
    true_near = ndimage.binary_dilation(true_boundary, structure=disk)
    n_predicted, n_true = predicted_boundary.sum(), true_boundary.sum()
    if n_predicted == 0 and n_true == 0:
        return 1.0
    if n_predicted == 0 or n_true == 0:
        return 0.0
    precision = np.sum(predicted_boundary & true_near) / n_predicted
    recall = np.sum(true_boundary & predicted_near) / n_true
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def sequence_scores(predictions: np.ndarray, truths: np.ndarray,
                    num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-object mean J and F [num_objects] over every frame but the first and the last
    (predictions and truths: uint8 ids [T, H, W]; 255 in the truth is void)."""
    if len(truths) < 3:
        raise ValueError(f"a sequence needs at least 3 frames (J and F skip the first and the "
                         f"last), got {len(truths)}")
    j = np.zeros((num_objects, len(truths) - 2))
    f = np.zeros_like(j)
    for t in range(1, len(truths) - 1):
        void = truths[t] == video.VOID
        for obj in range(num_objects):
            predicted, true = predictions[t] == obj + 1, truths[t] == obj + 1
            j[obj, t - 1] = region_similarity(predicted, true, void)
            f[obj, t - 1] = boundary_f_measure(predicted, true, void)
    return j.mean(axis=1), f.mean(axis=1)


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _frame_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The official read_frame's size: short side `short_side` (0: as it is), the long side
    scaled with it and floored to a multiple of 64 (when it is at least 64)."""
    short = short_side or min(height, width)
    long = short * max(height, width) / min(height, width)
    long = int(long // 64 * 64) if long >= 64 else int(long)
    return (long, short) if height > width else (short, long)


def _sequences(config: ml_collections.ConfigDict):
    """(number of sequences or None where unknown, the sequences one at a time)."""
    cfg = config.video
    names = tuple(n.strip() for n in cfg.sequences.split(",") if n.strip())
    if cfg.source == "synthetic":
        sequences = video.synthetic_digit_videos(
            num_sequences=cfg.synthetic_sequences, num_frames=cfg.synthetic_frames,
            size=cfg.synthetic_size, seed=config.seed)
        sequences = [s for s in sequences if not names or s.name in names]
        return len(sequences), sequences
    if cfg.source == "folder":
        return (len(video.davis_folder_names(cfg.folder, cfg.split, names)),
                video.read_davis_folder(cfg.folder, cfg.split, names))
    if cfg.source == "tfds":
        return (len(names) or None,
                video.read_davis_tfds(cfg.tfds_name, cfg.split, cfg.data_dir, names))
    raise ValueError(f"unknown --config.video.source {cfg.source!r}; use 'synthetic', 'folder' "
                     f"or 'tfds'")


class _Features:
    """Per-location features of frames, sharded over the mesh in fixed-size batches."""

    def __init__(self, graphdef, params, model_state, mesh, batch_size: int):
        self._mesh = mesh
        self._batch = batch_size
        backbone = nnx.merge(graphdef, params, model_state, copy=True).backbone
        if not hasattr(backbone, "patch_features"):
            raise ValueError(f"video segmentation needs per-location features, which the "
                             f"{type(backbone).__name__} backbone has not; use a ViT or ConvNet")
        self.stride = backbone.feature_stride
        self._params, self._model_state = params, model_state

        def patch_features(params, model_state, frames):
            model = nnx.merge(graphdef, params, model_state)
            return model.backbone.patch_features(frames)

        self._fn = jax.jit(patch_features, out_shardings=sharding.batch_sharding(mesh))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """frames float32 [T, H, W, C] -> features float32 [T, h, w, D] (on the host)."""
        out = []
        for start in range(0, len(frames), self._batch):
            chunk = frames[start:start + self._batch]
            padded = np.concatenate([chunk, np.zeros((self._batch - len(chunk),) + chunk.shape[1:],
                                                     chunk.dtype)])
            with jax.set_mesh(self._mesh):
                batch = jax.device_put(padded, sharding.batch_sharding(self._mesh))
                out.append(np.asarray(jax.device_get(
                    self._fn(self._params, self._model_state, batch)))[:len(chunk)])
        return np.concatenate(out)


def segment_sequence(sequence: video.Sequence, features: _Features, config, channels: int,
                     mean, std) -> np.ndarray:
    """Predicted object ids [T, H, W] (frame 0 is the given annotation)."""
    cfg = config.video
    num_frames, height, width = sequence.masks.shape
    size = _frame_size(height, width, cfg.short_side)
    stride = features.stride
    if size[0] % stride or size[1] % stride:
        raise ValueError(f"frames of {size[0]}x{size[1]} px do not divide by the backbone's "
                         f"feature stride {stride}; set --config.video.short_side to a multiple "
                         f"of {stride}")
    h, w = size[0] // stride, size[1] // stride
    feats = features(video.prepare_frames(sequence.frames, size, channels, mean, std))
    feats = feats.reshape(num_frames, h * w, -1)
    num_labels = int(sequence.masks[0][sequence.masks[0] != video.VOID].max(initial=0)) + 1
    first = resize_nearest(sequence.masks[0], h, w).reshape(-1)
    first = np.where(first == video.VOID, 0, first)  # void pixels pass on no object
    first = np.eye(num_labels, dtype=np.float32)[np.minimum(first, num_labels - 1)]
    neighbourhood = (jnp.asarray(neighbourhood_mask(h, w, cfg.size_mask_neighborhood))
                     if cfg.size_mask_neighborhood > 0 else None)
    contexts = 1 + cfg.n_last_frames
    source_feats = np.zeros((contexts, h * w, feats.shape[-1]), np.float32)
    source_labels = np.zeros((contexts, h * w, num_labels), np.float32)
    source_feats[0], source_labels[0] = feats[0], first
    predictions = np.empty(sequence.masks.shape, np.uint8)
    predictions[0] = sequence.masks[0]
    for t in range(1, num_frames):
        recent = min(t - 1, cfg.n_last_frames)
        valid = np.arange(contexts) <= recent
        labels = np.asarray(propagate(feats[t], source_feats, source_labels, valid,
                                      neighbourhood, temperature=cfg.temperature,
                                      topk=cfg.topk))
        # The queue of the n_last_frames previous frames: oldest out, this one in.
        if recent == cfg.n_last_frames and recent > 0:
            source_feats[1:-1], source_labels[1:-1] = source_feats[2:], source_labels[2:]
        if cfg.n_last_frames > 0:
            slot = min(t, cfg.n_last_frames)
            source_feats[slot], source_labels[slot] = feats[t], labels
        ids = np.asarray(labels_to_mask(labels.reshape(h, w, num_labels), stride))
        predictions[t] = resize_nearest(ids, height, width)
    return predictions


def _strip(sequence: video.Sequence, predictions: np.ndarray, columns: int = 6) -> np.ndarray:
    """RGB picture: frames with the ground truth (top row) and the prediction (bottom row)."""
    palette = video.davis_palette()
    picks = np.linspace(0, len(predictions) - 1, min(columns, len(predictions))).astype(int)
    frames = sequence.frames[picks]
    frames = np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames
    rows = []
    for masks in (sequence.masks[picks], predictions[picks]):
        colours = palette[masks].astype(np.float32)
        blend = np.where(((masks > 0) & (masks != video.VOID))[..., None],
                         0.5 * frames + 0.5 * colours, frames)
        rows.append(np.concatenate(list(blend.astype(np.uint8)), axis=1))
    return np.concatenate(rows, axis=0)


def evaluate(workdir: str, overrides: ml_collections.ConfigDict | None = None, *,
             output_dir: str = "", random_init: bool = False) -> dict[str, float]:
    """J, F and J&F means of the backbone of `workdir` (teacher by default); writes the masks,
    `per_sequence.csv` and picture strips to `output_dir` (default DIR/video_segmentation, or
    DIR/video_segmentation_init) and appends the means to DIR/metrics.jsonl."""
    from PIL import Image  # noqa: PLC0415

    config = checkpoint_lib.read_run_config(workdir)
    config.video = video_config()
    if overrides is not None:
        for group, fields in overrides.items():
            for name, value in fields.items():
                if value is not None:
                    config[group][name] = value
    mesh = sharding.make_mesh(config)
    sharding.check_global_batch(config.video.batch_size, mesh)
    graphdef, state, step = train.restore_run(
        config, workdir, mesh, fsdp_min_size=config.mesh.fsdp_min_size,
        random_init=random_init, random_init_flag="--random_init")
    teacher = config.video.use_teacher and state.teacher_params is not None
    params = state.teacher_params if teacher else state.params
    model_state = state.teacher_model_state if teacher else state.model_state
    features = _Features(graphdef, params, model_state, mesh, config.video.batch_size)
    channels = pipeline.num_channels(config.data)
    mean, std = pipeline.mean_std(config.data, channels)

    out = epath.Path(output_dir or checkpoint_lib.workdir_path(workdir) / (
        "video_segmentation_init" if random_init else "video_segmentation"))
    out.mkdir(parents=True, exist_ok=True)
    rows, j_all, f_all = [], [], []
    start = time.time()
    total, sequences = _sequences(config)
    for count, sequence in enumerate(sequences, 1):
        predictions = segment_sequence(sequence, features, config, channels, mean, std)
        (out / sequence.name).mkdir(exist_ok=True)
        for t, mask in enumerate(predictions):
            video.write_indexed_png(out / sequence.name / f"{t:05d}.png", mask)
        with (out / f"{sequence.name}.png").open("wb") as f:
            Image.fromarray(_strip(sequence, predictions)).save(f, format="PNG")
        j, f_measure = sequence_scores(predictions, sequence.masks, sequence.num_objects)
        j_all.extend(j)
        f_all.extend(f_measure)
        rows.extend((sequence.name, obj + 1, j[obj], f_measure[obj]) for obj in range(len(j)))
        elapsed = time.time() - start
        eta = f", ETA {elapsed / count * (total - count):.0f} s" if total else ""
        print(f"[{count}/{total or '?'}] {sequence.name}: {len(predictions)} frames, J "
              f"{j.mean():.3f} F {f_measure.mean():.3f} ({elapsed:.0f} s{eta})", flush=True)
    if not j_all:
        raise ValueError("no sequence with an object to evaluate; check --config.video.sequences "
                         "and the first frames' annotations")
    with (out / "per_sequence.csv").open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["sequence", "object", "j_mean", "f_mean"])
        writer.writerows((name, obj, f"{j:.4f}", f"{fm:.4f}") for name, obj, j, fm in rows)
    prefix = "davis_init_" if random_init else "davis_"
    results = {prefix + "j_mean": float(np.mean(j_all)), prefix + "f_mean": float(np.mean(f_all))}
    results[prefix + "jf_mean"] = (results[prefix + "j_mean"] + results[prefix + "f_mean"]) / 2
    logger = train.MetricsLogger(workdir, total_steps=step, global_batch=config.video.batch_size)
    logger.write(step, results)
    logger.close()
    print(f"video segmentation ({config.video.source}, {len(j_all)} objects) of {workdir} at "
          f"step {step}" + (" (random init)" if random_init else "") + ": "
          + "  ".join(f"{k} {v:.4f}" for k, v in results.items()) + f"; masks in {out}",
          flush=True)
    return dict(results, step=step)


def _main(argv, config_flag, workdir_flag, output_flag, random_init_flag):
    del argv
    cli.run_or_exit("bam_jax.evals.video_segmentation", evaluate, workdir_flag.value,
                    config_flag.value, output_dir=output_flag.value,
                    random_init=random_init_flag.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _config = config_flags.DEFINE_config_dict(
        "config", overrides_config(), "Video options and overrides of the run's config.json, "
        "e.g. --config.video.source=folder --config.video.folder=/data/DAVIS")
    _workdir = flags.DEFINE_string("workdir", None, "A pretraining workdir (python -m "
                                   "bam_jax.main --workdir).", required=True)
    _output = flags.DEFINE_string("output_dir", "", "Where the masks, the CSV and the pictures "
                                  "go (default: DIR/video_segmentation).")
    _random_init = flags.DEFINE_bool("random_init", False, "Evaluate the same backbone at its "
                                     "initialisation instead of the newest checkpoint.")
    app.run(lambda argv: _main(argv, _config, _workdir, _output, _random_init),
            flags_parser=cli.flags_parser("bam_jax.evals.video_segmentation"))
