"""Pictures of a pretraining workdir: `python -m bam_jax.evals.pictures --workdir=DIR`.

Writes PNG files into DIR (matplotlib, Agg backend):
  curves.png     loss and kNN top-1 against the step, from metrics.jsonl;
  attention.png  the CLS self-attention of the last block, per head, over a few eval images, as
                 DINO shows them (ViT); for a CAFormer the attention each token of the last stage
                 receives in its last block (the teacher's weights when the run has a teacher);
  target.png     for one batch of training crops, the balanced BAM target P (Sinkhorn) beside
                 the source softmax A, over the global views of the batch;
  boxes.png      ContrastiveCrop runs: training images with the boxes of the newest checkpoint.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")

import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import cli, models, sharding, train
from bam_jax import loss as loss_lib
from bam_jax.data import pipeline


def plot_curves(workdir: str) -> str:
    """curves.png: the training loss and every kNN top-1 series of metrics.jsonl."""
    path = checkpoint_lib.workdir_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass a workdir that `python -m bam_jax.main` "
                         f"has trained in")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    series_names = sorted({k for row in rows for k in row if k.endswith("knn_top1")})
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    loss_rows = [row for row in rows if "loss" in row]
    ax_loss.plot([r["step"] for r in loss_rows], [r["loss"] for r in loss_rows], ".-")
    ax_loss.set(title="BAM loss", xlabel="step", ylabel="loss")
    for name in series_names:
        points = [(r["step"], r[name]) for r in rows if name in r]
        ax_knn.plot(*zip(*points), "o-", label=name)
    ax_knn.set(title="kNN top-1", xlabel="step", ylabel="%")
    if series_names:
        ax_knn.legend()
    else:
        ax_knn.text(0.5, 0.5, "no kNN evaluation logged", ha="center", transform=ax_knn.transAxes)
    return _save(fig, workdir, "curves.png")


def _unnormalize(images: np.ndarray, data_config) -> np.ndarray:
    """Model inputs back to [0, 1] pixels for display."""
    mean, std = pipeline.mean_std(data_config, images.shape[-1])
    return np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def _show(ax, image):
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
              cmap="gray" if image.shape[-1] == 1 else None)
    ax.axis("off")


def plot_attention(config, graphdef, weights, workdir: str, num_images: int = 4) -> str | None:
    """attention.png, per head over a few eval images. ViT: the last block's CLS attention to the
    patches (DINO's picture). CAFormer: the attention each token of the last stage receives in
    its last block, averaged over the queries (the official `get_selfattention`), on that
    stage's grid (7 x 7 at 224 px)."""
    model = nnx.merge(graphdef, *weights)
    backbone = model.backbone
    if not isinstance(backbone, (models.VisionTransformer, models.CAFormer)):
        print(f"attention maps: skipped, the {config.model.backbone} backbone has no "
              f"self-attention", flush=True)
        return None
    data = config.data
    batch = next(pipeline.create_eval_dataset(
        data, data.eval_split, global_batch_size=num_images, process_index=0,
        process_count=1).as_numpy_iterator())
    images = batch["image"]
    if isinstance(backbone, models.CAFormer):
        maps = np.asarray(jax.jit(
            lambda w, x: nnx.merge(graphdef, *w).backbone.received_attention(x))(weights, images))
        extent = (0, images.shape[2], images.shape[1], 0)  # the grid covers the whole image
        title = "attention each last-stage token receives in the last block (mean over queries)"
    else:
        attention = jax.jit(
            lambda w, x: nnx.merge(graphdef, *w).backbone.last_self_attention(x))(weights, images)
        patch = backbone.patch_size
        grid_h, grid_w = images.shape[1] // patch, images.shape[2] // patch
        maps = np.asarray(attention)[:, :, 0, 1:].reshape(len(images), -1, grid_h, grid_w)
        extent = (0, grid_w * patch, grid_h * patch, 0)
        title = "CLS self-attention of the last block"
    heads = maps.shape[1]
    pixels = _unnormalize(images, data)
    fig, axes = plt.subplots(len(images), heads + 1, figsize=(2 * (heads + 1), 2 * len(images)),
                             squeeze=False)
    for i in range(len(images)):
        _show(axes[i, 0], pixels[i])
        for h in range(heads):
            _show(axes[i, h + 1], pixels[i])
            axes[i, h + 1].imshow(maps[i, h], cmap="inferno", alpha=0.6, extent=extent,
                                  interpolation="nearest")
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}")
    axes[0, 0].set_title("image")
    fig.suptitle(title)
    return _save(fig, workdir, "attention.png")


def plot_target(config, graphdef, state, step: int, workdir: str, batch_size: int = 32) -> str:
    """target.png: P and A of one batch of training crops, at the run's eps of `step`."""
    batch = next(pipeline.create_pretrain_dataset(
        config.data, global_batch_size=batch_size, seed=config.seed, process_index=0,
        process_count=1).as_numpy_iterator())

    def project(params, model_state):
        model = nnx.merge(graphdef, params, model_state)
        return model(batch["global_crops"], batch.get("local_crops"), deterministic=True)

    z = jax.jit(project)(state.params, state.model_state)
    z_teacher = None
    if state.teacher_params is not None:
        z_teacher = jax.jit(project)(state.teacher_params, state.teacher_model_state)
    epoch_steps = pipeline.steps_per_epoch(config.data, config.batch_size)
    schedules = train.make_schedules(config, epoch_steps,
                                     train.total_train_steps(config, epoch_steps))
    eps = float(schedules.sinkhorn_reg(step))
    loss_cfg = config.loss
    matrices = loss_lib.attention_matrices(z, z_teacher=z_teacher, sinkhorn_reg=eps,
                                           **train.loss_kwargs(config))
    num_columns = matrices.scores.shape[-1]
    target = matrices.target.reshape(-1, num_columns)  # rows: image x global view
    source = jnp.exp(matrices.log_source[:, :config.data.global_crops_number]).reshape(
        -1, num_columns)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, matrix, title in ((axes[0], target, f"target P (Sinkhorn, eps {eps:.3g})"),
                              (axes[1], source, f"source A (softmax, tau {loss_cfg.temperature})")):
        shown = ax.imshow(np.asarray(matrix), cmap="viridis", interpolation="nearest")
        ax.set(title=title, xlabel=f"column: image x {loss_cfg.num_target_crops} target views",
               ylabel=f"row: image x {config.data.global_crops_number} global views")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(f"{batch_size} training images at step {step}"
                 + (" (teacher targets)" if z_teacher is not None else ""))
    return _save(fig, workdir, "target.png")


def plot_boxes(config, boxes: np.ndarray, step: int, workdir: str, num_images: int = 8) -> str:
    """boxes.png: the first training images as the box pass sees them, with their boxes."""
    size = config.ccrop.image_size or config.data.global_crop_size
    batch = next(pipeline.create_box_dataset(
        config.data, image_size=size, global_batch_size=num_images, process_index=0,
        process_count=1).as_numpy_iterator())
    pixels = _unnormalize(batch["image"], config.data)
    fig, axes = plt.subplots(1, num_images, figsize=(2 * num_images, 2.4), squeeze=False)
    for ax, image, index in zip(axes[0], pixels, batch["index"]):
        _show(ax, image)
        h_min, w_min, h_max, w_max = boxes[index] * size
        ax.add_patch(matplotlib.patches.Rectangle(
            (w_min - 0.5, h_min - 0.5), w_max - w_min + 1, h_max - h_min + 1, fill=False,
            edgecolor="lime", linewidth=2))
        ax.set_title(f"#{index}")
    fig.suptitle(f"ContrastiveCrop boxes at step {step}")
    return _save(fig, workdir, "boxes.png")


def _save(fig, workdir: str, name: str) -> str:
    """Writes `name` into the workdir (local or gs://); returns its path."""
    path = checkpoint_lib.workdir_path(workdir) / name
    fig.tight_layout()
    with path.open("wb") as f:  # epath: a gs:// workdir too
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return str(path)


def make_pictures(workdir: str) -> list[str]:
    """All pictures of a pretraining workdir; returns the paths written."""
    paths = [plot_curves(workdir)]
    config = checkpoint_lib.read_run_config(workdir)
    config.mesh.num_devices = 1  # a few images: one device, no sharding to think about
    mesh = sharding.make_mesh(config)
    graphdef, state, step = train.restore_run(config, workdir, mesh,
                                              fsdp_min_size=config.mesh.fsdp_min_size)
    teacher = state.teacher_params is not None
    weights = ((state.teacher_params, state.teacher_model_state) if teacher
               else (state.params, state.model_state))
    attention = plot_attention(config, graphdef, weights, workdir)
    if attention is not None:
        paths.append(attention)
    paths.append(plot_target(config, graphdef, state, step, workdir))
    if config.get("ccrop") and config.ccrop.enabled:
        boxes = checkpoint_lib.read_boxes(
            workdir, step, pipeline.num_examples(config.data, config.data.train_split))
        if boxes is not None:
            paths.append(plot_boxes(config, boxes, step, workdir))
    return paths


def _main(argv, workdir_flag):
    del argv
    cli.run_or_exit("bam_jax.evals.pictures", make_pictures, workdir_flag.value)


if __name__ == "__main__":
    from absl import app, flags

    _workdir = flags.DEFINE_string("workdir", None, "A pretraining workdir (python -m "
                                   "bam_jax.main --workdir).", required=True)
    app.run(lambda argv: _main(argv, _workdir),
            flags_parser=cli.flags_parser("bam_jax.evals.pictures"))
