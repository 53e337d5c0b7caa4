"""Linear probe of a frozen pretrained backbone, as the official eval_linear.py.

    python -m bam_jax.linear_probe --config=configs/linear.py \
        --config.pretrained_workdir=DIR --workdir=OUT
    python -m bam_jax.linear_probe --config=configs/linear_default.py \
        --config.pretrained_workdir=workdirs/default --workdir=workdirs/default_linear
    python -m bam_jax.linear_probe --config=configs/linear_default.py \
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
import logging
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tensorflow as tf  # noqa: E402
from flax import nnx  # noqa: E402

from bam_jax import cli  # noqa: E402
from bam_jax import checkpoint as checkpoint_lib  # noqa: E402
from bam_jax import evaluate  # noqa: E402
from bam_jax import input_pipeline  # noqa: E402
from bam_jax import train  # noqa: E402


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
    dataset = input_pipeline.create_pretrain_dataset(
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
        model = nnx.merge(backbone_graphdef, *backbone)
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
def _pretraining(config: ml_collections.ConfigDict, mesh):
    """(graphdef, (params, model_state)) of the frozen backbone, and a line saying which."""
    if config.pretrained_workdir:
        pre_config = train.read_run_config(config.pretrained_workdir)
    elif config.random_init:
        pre_config = config.pretrain.copy_and_resolve_references()
    else:
        raise ValueError("set --config.pretrained_workdir=DIR (a pretraining workdir) or "
                         "--config.random_init=True for the random-init baseline")
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

        batch_sharding = jax.NamedSharding(mesh, jax.P(train.BATCH_AXES))
        self._logits = jax.jit(logits, out_shardings=batch_sharding)
        self._hits = jax.jit(lambda x, y: topk_hits(x, y, min(5, num_classes)))

    def evaluate(self, backbone, state: train.TrainState) -> dict[str, float]:
        data = self._config.data
        dataset = input_pipeline.create_eval_dataset(
            data, data.eval_split, global_batch_size=self._config.eval_batch_size)
        with jax.set_mesh(self._mesh):
            logits, labels, mask = evaluate.extract_features(
                self._logits, (backbone, state.params), state.model_state, dataset, self._mesh,
                train.BATCH_AXES)
            top1, top5 = jax.device_get(self._hits(logits, labels))
        mask = np.asarray(jax.device_get(mask)).astype(bool)
        return {"linear_top1": 100.0 * float(top1[mask].mean()),
                "linear_top5": 100.0 * float(top5[mask].mean())}


def train_linear(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the probe in `workdir`, which it owns meanwhile (a lease, as
    pretraining); returns the final metrics."""
    with train.workdir_lock(workdir):
        return _train_linear(config, workdir)


def _train_linear(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    os.makedirs(workdir, exist_ok=True)
    mesh = train.make_mesh(config)
    input_pipeline.check_global_batch(config.batch_size, mesh, train.BATCH_AXES)
    input_pipeline.check_global_batch(config.eval_batch_size, mesh, train.BATCH_AXES)
    data = config.data
    examples = input_pipeline.num_examples(data, data.eval_train_split)
    if examples < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {examples} training "
                         f"examples; lower --config.batch_size")
    epoch_steps = examples // config.batch_size
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(math.ceil(config.num_epochs * epoch_steps)))

    backbone_graphdef, backbone, which = _pretraining(config, mesh)
    backbone_shardings = jax.tree.map(lambda x: x.sharding, backbone)
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
    state, _ = train.restore_or_init(make_state, abstract_state, shardings, checkpointer)
    start_step = int(jax.device_get(state.step))
    train.save_config(config, workdir)
    print(f"linear probe on the {which}: {in_dim} features -> {num_classes} classes, "
          f"{total_steps} steps of {config.batch_size}", flush=True)

    feature_fn = make_feature_fn(config, backbone_graphdef)
    peak_lr = config.optimizer.base_lr * config.batch_size / 256  # the official scaling
    learning_rate = train.cosine_schedule(
        peak_lr, config.optimizer.min_lr, total_steps,
        min(int(round(config.optimizer.warmup_epochs * epoch_steps)), total_steps))
    step_fn = make_train_step(config, feature_fn, head_graphdef, optimizer, learning_rate,
                              num_classes)
    batch_sharding = jax.NamedSharding(mesh, jax.P(train.BATCH_AXES))
    compiled_step = jax.jit(step_fn, donate_argnums=(0,),
                            in_shardings=(shardings, backbone_shardings, batch_sharding),
                            out_shardings=(shardings, None))
    evaluator = _Evaluator(config, feature_fn, head_graphdef, mesh, num_classes)
    logger = train.MetricsLogger(workdir, total_steps, config.batch_size)
    eval_every = max(int(round(config.eval_every_epochs * epoch_steps)), 1)

    final: dict[str, float] = {}
    step = start_step
    if step < total_steps:
        dataset = create_supervised_dataset(data, data.eval_train_split,
                                            global_batch_size=config.batch_size,
                                            seed=config.seed, start_step=start_step)
        batches = input_pipeline.device_iterator(dataset, mesh, train.BATCH_AXES)
    while step < total_steps:
        with jax.set_mesh(mesh):
            state, metrics = compiled_step(state, backbone, next(batches))
        step += 1
        is_last = step == total_steps
        if step % config.log_every_steps == 0 or is_last:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            host["epoch"] = step / epoch_steps
            logger.write(step, host)
            final.update(host)
            print(f"step {step}/{total_steps}  loss {host['loss']:.4f}  lr "
                  f"{host['learning_rate']:.2e}  train top-1 {host['train_top1']:.1f}", flush=True)
        if step % eval_every == 0 or is_last:
            final.update(_log_eval(evaluator.evaluate(backbone, state), step, logger, workdir))
        if step % config.checkpoint_every_steps == 0 or is_last:
            checkpointer.save(step, state, config)
    if start_step >= total_steps:  # resumed a finished probe: report it again
        final.update(_log_eval(evaluator.evaluate(backbone, state), step, logger, workdir))
    checkpointer.close()
    logger.close()
    final["step"] = step
    return final


def _log_eval(results, step, logger, workdir) -> dict[str, float]:
    """Writes one evaluation, with the best top-1 of this probe so far (resumes included)."""
    best = results["linear_top1"]
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            best = max([best] + [row["linear_top1"] for row in map(json.loads, f)
                                 if "linear_top1" in row])
    results = dict(results, linear_best_top1=best)
    logger.write(step, results)
    print(f"linear probe at step {step}: top-1 {results['linear_top1']:.2f}  top-5 "
          f"{results['linear_top5']:.2f}  best top-1 {best:.2f}", flush=True)
    return results


def _main(argv, config_flag, workdir_flag):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        result = train_linear(config_flag.value, workdir_flag.value)
    except (ValueError, OSError) as error:
        print(cli.error_line("bam_jax.linear_probe", error), file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"done: step {result['step']}  top-1 {result['linear_top1']:.2f}  top-5 "
          f"{result['linear_top5']:.2f}  best top-1 {result['linear_best_top1']:.2f}", flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _config = config_flags.DEFINE_config_file(
        "config", None, "A linear-probe config (configs/linear.py, configs/linear_default.py); "
        "override fields with --config.field=value.", lock_config=True)
    _workdir = flags.DEFINE_string("workdir", None, "Where the probe's checkpoints and "
                                   "metrics.jsonl go; an existing probe there is resumed.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda argv: _main(argv, _config, _workdir),
            flags_parser=cli.flags_parser("bam_jax.linear_probe"))
