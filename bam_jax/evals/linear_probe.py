"""Linear probe of a frozen pretrained backbone, as the official eval_linear.py.

    python -m bam_jax.evals.linear_probe --config=configs/linear.py \
        --config.pretrained_workdir=DIR --workdir=OUT
    python -m bam_jax.evals.linear_probe --config=configs/linear_default.py \
        --config.pretrained_workdir=workdirs/default --workdir=workdirs/default_linear
    python -m bam_jax.evals.linear_probe --config=configs/linear_default.py \
        --config.random_init=True --workdir=workdirs/random_linear   # the random-init row

The backbone (teacher weights when the run has a teacher, unless --config.use_teacher=False) is
restored from DIR's newest checkpoint and never trained; its features are the normed CLS token
of the last `n_last_blocks` blocks, optionally with the average-pooled patch tokens. On top: a
non-affine BatchNorm (`bn_head`) and a linear layer, trained with SGD (momentum 0.9, no weight
decay, cosine lr from base_lr x batch/256 to 0) on random-resized, flipped crops; evaluated on
centre crops. Sharded like pretraining; OUT holds its own checkpoints (rerun to resume),
config.json and metrics.jsonl.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

if TYPE_CHECKING:
    import tensorflow as tf

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import cli, sharding, train
from bam_jax.data import pipeline
from bam_jax.evals import features


# ---------------------------------------------------------------------------------------------
# Data: the supervised train stream.
# ---------------------------------------------------------------------------------------------
def create_supervised_dataset(data_config: ml_collections.ConfigDict, split: str, *,
                              global_batch_size: int, seed: int, start_step: int = 0,
                              process_index: int | None = None,
                              process_count: int | None = None) -> tf.data.Dataset:
    """Infinite {"image" [b, S, S, C], "label" [b]} batches of `split`: RandomResizedCrop(
    global_crop_size, global_crops_scale) + horizontal flip (flip_prob) + normalisation.

    It is the pretraining stream with a single global crop and every other augmentation off, so
    it inherits its per-host sharding, its (seed, epoch, index) randomness and its exact resume
    at `start_step`.
    """
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.update(train_split=split, global_crops_number=1, local_crops_number=0,
                  color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0),
                  solarize_prob=0.0)
    dataset = pipeline.create_pretrain_dataset(
        config, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)
    return dataset.map(lambda batch: {"image": batch["global_crops"][:, 0],
                                      "label": batch["label"]})


# ---------------------------------------------------------------------------------------------
# The head and its train step.
# ---------------------------------------------------------------------------------------------
class LinearHead(nnx.Module):
    """Non-affine BatchNorm (eps 1e-6, torch momentum) then Linear(std 0.01 init, zero bias)."""

    def __init__(self, in_dim: int, num_classes: int, *, bn_head: bool, rngs: nnx.Rngs):
        self.norm = nnx.BatchNorm(in_dim, use_bias=False, use_scale=False, epsilon=1e-6,
                                  momentum=0.9, rngs=rngs) if bn_head else None
        self.linear = nnx.Linear(in_dim, num_classes, kernel_init=nnx.initializers.normal(0.01),
                                 rngs=rngs)

    def __call__(self, features, *, train: bool):
        if self.norm is not None:
            features = self.norm(features, use_running_average=not train)
        return self.linear(features)


def topk_hits(logits, labels, k: int):
    """Per example: [label is the top-1 class, label is among the top-k classes]."""
    ranked = jax.lax.top_k(logits, k)[1]
    hits = ranked == labels[:, None]
    return hits[:, 0], jnp.any(hits, axis=1)


def make_feature_fn(config: ml_collections.ConfigDict, backbone_graphdef: nnx.GraphDef):
    """Frozen, eval-mode backbone features of a batch of images (the official feature choice)."""

    def features(backbone, images):
        # copy=True: fresh variables at this trace level. Without it a rematerialised backbone
        # (ViT remat, CAFormer remat_every) fails: nnx.remat may not mutate variables that were
        # created at another trace level (the backbone arrays are constants of the step).
        model = nnx.merge(backbone_graphdef, *backbone, copy=True)
        out = model.backbone.features(images, n_last_blocks=config.n_last_blocks,
                                      avgpool=config.avgpool)
        return jax.lax.stop_gradient(out)

    return features


def make_train_step(config, feature_fn, head_graphdef, optimizer, learning_rate, num_classes):
    def train_step(state: train.TrainState, backbone, batch):
        features = feature_fn(backbone, batch["image"])

        def loss_fn(params):
            head = nnx.merge(head_graphdef, params, state.model_state, copy=True)
            logits = head(features, train=True).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, (logits, nnx.state(head, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        lr = learning_rate(state.step)
        opt_state = train.set_hyperparams(state.opt_state, lr, config.optimizer.weight_decay)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        top1, top5 = topk_hits(logits, batch["label"], min(5, num_classes))
        new_state = state.replace(step=state.step + 1,
                                  params=optax.apply_updates(state.params, updates),
                                  model_state=model_state, opt_state=opt_state)
        metrics = dict(loss=loss, learning_rate=lr, train_top1=100.0 * top1.mean(),
                       train_top5=100.0 * top5.mean())
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------
def check_backbone_source(config: ml_collections.ConfigDict) -> None:
    """Refuses, before anything is created, a config naming neither a pretraining workdir nor
    the random-init baseline."""
    if not config.pretrained_workdir and not config.random_init:
        raise ValueError("set --config.pretrained_workdir=DIR (a pretraining workdir) or "
                         "--config.random_init=True for the random-init baseline")


def pretrained_backbone(config: ml_collections.ConfigDict, mesh):
    """(graphdef, (params, model_state)) of the frozen backbone, and a line saying which."""
    check_backbone_source(config)
    if config.pretrained_workdir:
        pre_config = checkpoint_lib.read_run_config(config.pretrained_workdir)
    else:
        pre_config = config.pretrain.copy_and_resolve_references()
    # The official eval_linear.py runs the frozen backbone in float32, whatever the pretraining
    # compute dtype was (the parameters are float32 either way, so the checkpoint still fits).
    pre_config.model.dtype = config.backbone_dtype
    graphdef, state, step = train.restore_run(
        pre_config, config.pretrained_workdir, mesh, fsdp_min_size=config.mesh.fsdp_min_size,
        random_init=config.random_init, random_init_flag="--config.random_init=True")
    source = config.pretrained_workdir or f"config.pretrain ({config.pretrain.model.backbone})"
    if config.random_init:
        which = "random init"
        backbone = (state.params, state.model_state)
    elif config.use_teacher and state.teacher_params is not None:
        which = f"teacher of step {step}"
        backbone = (state.teacher_params, state.teacher_model_state)
    else:
        which = f"student of step {step}"
        backbone = (state.params, state.model_state)
    return graphdef, backbone, f"{which} of {source}"


class _Evaluator:
    """Top-1/top-5 of the probe on the centre-cropped `data.eval_split` (padding masked out)."""

    def __init__(self, config, feature_fn, head_graphdef, mesh, num_classes):
        self._config = config
        self._mesh = mesh

        def logits(params, model_state, images):
            backbone, head_params = params
            head = nnx.merge(head_graphdef, head_params, model_state)
            return head(feature_fn(backbone, images), train=False).astype(jnp.float32)

        self._logits = jax.jit(logits, out_shardings=sharding.batch_sharding(mesh))
        self._hits = jax.jit(lambda x, y: topk_hits(x, y, min(5, num_classes)))

    def evaluate(self, backbone, state: train.TrainState) -> dict[str, float]:
        data = self._config.data
        dataset = pipeline.create_eval_dataset(
            data, data.eval_split, global_batch_size=self._config.eval_batch_size)
        with jax.set_mesh(self._mesh):
            logits, labels, mask = features.extract_features(
                self._logits, (backbone, state.params), state.model_state, dataset, self._mesh)
            top1, top5 = jax.device_get(self._hits(logits, labels))
        mask = np.asarray(jax.device_get(mask)).astype(bool)
        return {"linear_top1": 100.0 * float(top1[mask].mean()),
                "linear_top5": 100.0 * float(top5[mask].mean())}


def train_linear(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the probe in `workdir`, which it owns meanwhile (a lease, as
    pretraining); SIGTERM / Ctrl-C save and stop as there. Returns the final metrics."""
    check_backbone_source(config)
    with train.StopSignals() as signals, train.workdir_lock(workdir) as lock:
        return _train_linear(config, workdir, signals, lock)


def supervised_line(metrics: dict[str, float]) -> str:
    """The console line of a supervised train step (the probe, fine-tuning)."""
    return (f"loss {metrics['loss']:.4f}  lr {metrics['learning_rate']:.2e}  train top-1 "
            f"{metrics['train_top1']:.1f}")


def _train_linear(config: ml_collections.ConfigDict, workdir: str, signals, lock
                  ) -> dict[str, float]:
    checkpoint_lib.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config)
    sharding.check_global_batch(config.batch_size, mesh)
    sharding.check_global_batch(config.eval_batch_size, mesh)
    data = config.data
    epoch_steps = pipeline.steps_per_epoch(data, config.batch_size, data.eval_train_split)
    total_steps = train.total_train_steps(config, epoch_steps)

    backbone_graphdef, backbone, which = pretrained_backbone(config, mesh)
    in_dim = nnx.merge(backbone_graphdef, *backbone).backbone.feature_dim(
        config.n_last_blocks, config.avgpool)
    num_classes = config.num_classes

    create_head = lambda: LinearHead(in_dim, num_classes, bn_head=config.bn_head,  # noqa: E731
                                     rngs=nnx.Rngs(config.seed))
    optimizer = train.make_optimizer(config)
    head_graphdef, make_state, abstract_state, shardings = train.state_layout(
        create_head, optimizer, False, mesh, config.mesh.fsdp_min_size)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    state, resumed = checkpoint_lib.restore_or_init(make_state, abstract_state, shardings,
                                                    checkpointer)
    start_step = int(jax.device_get(state.step))
    checkpoint_lib.save_config(config, workdir)
    print(f"linear probe on the {which}: {in_dim} features -> {num_classes} classes, "
          f"{total_steps} steps of {config.batch_size}", flush=True)

    feature_fn = make_feature_fn(config, backbone_graphdef)
    learning_rate = train.learning_rate_schedule(config, epoch_steps, total_steps)
    step_fn = make_train_step(config, feature_fn, head_graphdef, optimizer, learning_rate,
                              num_classes)
    compiled_step = jax.jit(
        lambda state, batch: step_fn(state, backbone, batch), donate_argnums=(0,),
        in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None))
    evaluator = _Evaluator(config, feature_fn, head_graphdef, mesh, num_classes)
    logger = train.MetricsLogger(workdir, total_steps, config.batch_size, describe=supervised_line)
    eval_every = max(int(round(config.eval_every_epochs * epoch_steps)), 1)
    batches = None

    def next_batch():
        nonlocal batches
        if batches is None:  # built at the first step: a finished probe reads no data
            batches = sharding.device_iterator(create_supervised_dataset(
                data, data.eval_train_split, global_batch_size=config.batch_size,
                seed=config.seed, start_step=start_step), mesh)
        return next(batches)

    def after_step(step, state, is_last):
        if step % eval_every == 0 or is_last:
            return log_evaluation(evaluator.evaluate(backbone, state), step, logger, workdir)
        return {}

    state, step, final = train.run_loop(
        config, state, compiled_step, next_batch, mesh=mesh, total_steps=total_steps,
        epoch_steps=epoch_steps, checkpointer=checkpointer, logger=logger, signals=signals,
        lock=lock, last_saved=start_step if resumed else None, after_step=after_step)
    if start_step >= total_steps:  # resumed a finished probe: report it again
        final.update(log_evaluation(evaluator.evaluate(backbone, state), step, logger, workdir))
    logger.close()
    return dict(final, step=step)


def log_evaluation(results: dict[str, float], step: int, logger, workdir: str, *,
                   prefix: str = "linear", title: str = "linear probe") -> dict[str, float]:
    """Writes one evaluation with `{prefix}_best_top1`, the best `{prefix}_top1` of this run so
    far (resumes included, read back from metrics.jsonl), and prints it."""
    key = f"{prefix}_top1"
    best = results[key]
    path = checkpoint_lib.workdir_path(workdir) / "metrics.jsonl"
    if path.exists():
        best = max([best] + [row[key] for row in map(json.loads, path.read_text().splitlines())
                             if key in row])
    results = dict(results, **{f"{prefix}_best_top1": best})
    logger.write(step, results)
    print(f"{title} at step {step}: top-1 {results[key]:.2f}  top-5 "
          f"{results[prefix + '_top5']:.2f}  best top-1 {best:.2f}", flush=True)
    return results


def _main(config: ml_collections.ConfigDict, workdir: str) -> None:
    result = cli.run_or_exit("bam_jax.evals.linear_probe", train_linear, config, workdir,
                             errors=(train.RunInterrupted,))
    print(f"done: step {result['step']}  top-1 {result['linear_top1']:.2f}  top-5 "
          f"{result['linear_top5']:.2f}  best top-1 {result['linear_best_top1']:.2f}", flush=True)


if __name__ == "__main__":
    cli.run_with_config_and_workdir(
        "bam_jax.evals.linear_probe", _main,
        config_help="A linear-probe config (configs/linear.py, configs/linear_default.py)",
        workdir_help="Where the probe's checkpoints and metrics.jsonl go; an existing probe "
                     "there is resumed.")
