"""End-to-end fine-tuning of a pretrained backbone with a new linear head: the semi-supervised
(`label_fraction` 0.01 / 0.1) and transfer-learning benchmarks.

    python -m bam_jax.evals.finetune --config=configs/finetune.py \\
        --config.pretrained_workdir=DIR --workdir=OUT                  # ImageNet, all labels
    python -m bam_jax.evals.finetune --config=configs/finetune.py --config.label_fraction=0.01 \\
        --config.pretrained_workdir=DIR --workdir=OUT                  # ImageNet 1 % (SimCLR's)
    python -m bam_jax.evals.finetune --config=configs/finetune_default.py \\
        --config.pretrained_workdir=workdirs/default --workdir=workdirs/default_finetune

The backbone starts from DIR's newest checkpoint (teacher weights when the run has a teacher,
unless --config.use_teacher=False; --config.random_init=True for the from-scratch baseline) and is
trained with the head: the DeiT / BEiT / MAE fine-tuning recipe (AdamW, layer-wise lr decay,
warmup + cosine, drop path, label smoothing, mixup / cutmix, an optional EMA of the weights).
Sharded like pretraining; OUT holds its checkpoints (rerun to resume), config.json and
metrics.jsonl with `finetune_top1`, `finetune_top5` and `finetune_best_top1` at every evaluation.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import cli, sharding, train
from bam_jax.data import pipeline
from bam_jax.evals import features, knn, linear_probe


class Classifier(nnx.Module):
    """A backbone (its pooled / CLS feature) and a linear head (truncated-normal 2e-5, as MAE)."""

    def __init__(self, backbone: nnx.Module, num_classes: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(backbone.embed_dim, num_classes,
                               kernel_init=nnx.initializers.truncated_normal(2e-5), rngs=rngs)

    def __call__(self, images, *, deterministic: bool) -> jax.Array:
        return self.head(self.backbone(images, deterministic=deterministic)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay (BEiT's `param_groups_lrd`).
# ---------------------------------------------------------------------------------------------
_LAYER_LISTS = ("blocks", "convs", "norms", "stages")
_EMBEDDING = ("patch_kernel", "patch_bias", "cls_token", "pos_embed", "stem")


def layer_id(path: tuple, num_layers: int) -> int:
    """0 for the embedding, i + 1 for block (or conv stage) i, `num_layers` for the final norm
    and the head: BEiT's `get_layer_id_for_vit`, with the ConvNet's stages as its blocks."""
    names = [str(p) for p in path]
    if names[0] != "backbone":
        return num_layers
    for i, name in enumerate(names[:-1]):
        if name in _LAYER_LISTS and isinstance(path[i + 1], int):
            return path[i + 1] + 1
    return 0 if any(name in _EMBEDDING for name in names) else num_layers


def layer_scales(params: nnx.State, decay: float) -> nnx.State:
    """Per-parameter lr factors decay ** (num_layers - layer_id): 1 for the head, decay for the
    last block, ..., decay ** num_layers for the embedding."""
    flat = nnx.to_flat_state(params)
    ids = [layer_id(path, 10**9) for path, _ in flat]
    num_layers = max([i for i in ids if i < 10**9], default=0) + 1
    ids = [num_layers if i == 10**9 else i for i in ids]
    return nnx.from_flat_state([(path, var.replace(jnp.asarray(decay ** (num_layers - i),
                                                                 var.get_value().dtype)))
                                for (path, var), i in zip(flat, ids)])


def make_optimizer(config: ml_collections.ConfigDict, abstract_params: nnx.State):
    """The trainer's optimizer (clip, AdamW with injected lr and decay), its update then scaled
    per parameter by the layer-wise lr decay: lr x factor, as BEiT's per-group lr."""
    base = train.make_optimizer(config)
    if config.layer_decay >= 1.0:
        return base
    scales = layer_scales(abstract_params, config.layer_decay)
    scale_leaves = jax.tree.leaves(scales)

    def scale(updates, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        return jax.tree.unflatten(treedef, [u * s for u, s in zip(leaves, scale_leaves)])

    return optax.chain(base, optax.stateless(scale))


def set_hyperparams(config, opt_state, learning_rate, weight_decay):
    if config.layer_decay >= 1.0:
        return train.set_hyperparams(opt_state, learning_rate, weight_decay)
    return (train.set_hyperparams(opt_state[0], learning_rate, weight_decay), *opt_state[1:])


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing (timm's Mixup, mode "batch").
# ---------------------------------------------------------------------------------------------
def smooth_one_hot(labels, num_classes: int, smoothing: float):
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(key, images, labels, *, num_classes: int, smoothing: float, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float):
    """One lambda for the batch, mixed with the batch reversed. CutMix (chosen with
    `switch_prob` when both are on) pastes a box of area fraction 1 - lambda, lambda then being
    corrected to the box's clipped area. Returns images and soft targets."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 5)
    use_cutmix = (cutmix_alpha > 0) & ((mixup_alpha <= 0)
                                       | (jax.random.uniform(k_switch) < switch_prob))
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
    _, h, w, _ = images.shape
    cut = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    flipped = images[::-1]
    cutmixed = jnp.where(box[None, :, :, None], flipped, images)
    lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    mixed = lam_mix * images + (1.0 - lam_mix) * flipped
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
    images = jnp.where(use_cutmix, cutmixed, mixed)
    return images, lam * targets + (1.0 - lam) * targets[::-1]


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------
def labelled_examples(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The class-balanced `label_fraction` of the training split, drawn from the seed (None:
    every example, or a tfds dataset that is itself the subset)."""
    if config.label_fraction >= 1.0 or config.data.source == "tfds":
        return None
    labels = pipeline.labels(config.data, config.data.eval_train_split)
    return np.sort(knn.balanced_subset_indices(labels, config.label_fraction, seed=config.seed))


def _resolve_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """On tfds ImageNet, label fractions 0.01 / 0.1 are SimCLR's subsets (tfds
    `imagenet2012_subset/1pct`, `/10pct`); other tfds datasets cannot be subsampled here."""
    data = config.data.copy_and_resolve_references()
    data.train_split = data.eval_train_split
    if config.label_fraction < 1.0 and data.source == "tfds":
        subsets = {0.01: "1pct", 0.1: "10pct"}
        if data.tfds_name != "imagenet2012" or config.label_fraction not in subsets:
            raise ValueError(f"label_fraction {config.label_fraction} on tfds {data.tfds_name!r}: "
                             f"only imagenet2012 with 0.01 or 0.1 (SimCLR's subsets) can be "
                             f"read; use an image folder or the bundled digits for other "
                             f"fractions")
        data.tfds_name = f"imagenet2012_subset/{subsets[config.label_fraction]}"
    return data


def _load_pretrained(state_part: nnx.State, pretrained: dict) -> tuple[nnx.State, list]:
    """`state_part` with every backbone leaf the pretrained run has (same path and shape)
    replaced by its pretrained value, placed as the leaf was; and the backbone paths it kept."""
    out, kept = [], []
    for path, var in nnx.to_flat_state(state_part):
        value = pretrained.get(path)
        if value is not None and value.shape == var.get_value().shape:
            current = var.get_value()
            var = var.replace(jax.device_put(value.astype(current.dtype), current.sharding))
        elif path[0] == "backbone":
            kept.append("/".join(map(str, path)))
        out.append((path, var))
    return nnx.from_flat_state(out), kept


class _Evaluator:
    """Top-1/top-5 of the classifier on the centre-cropped `data.eval_split`."""

    def __init__(self, config, graphdef, mesh, num_classes: int):
        self._config, self._mesh = config, mesh

        def logits(params, model_state, images):
            return nnx.merge(graphdef, params, model_state)(images, deterministic=True)

        self._logits = jax.jit(logits, out_shardings=sharding.batch_sharding(mesh))
        self._hits = jax.jit(lambda x, y: linear_probe.topk_hits(x, y, min(5, num_classes)))

    def evaluate(self, params, model_state) -> tuple[float, float]:
        data = self._config.data
        dataset = pipeline.create_eval_dataset(data, data.eval_split,
                                               global_batch_size=self._config.eval_batch_size)
        with jax.set_mesh(self._mesh):
            logits, labels, mask = features.extract_features(self._logits, params, model_state,
                                                             dataset, self._mesh)
            top1, top5 = jax.device_get(self._hits(logits, labels))
        mask = np.asarray(jax.device_get(mask)).astype(bool)
        return 100.0 * float(top1[mask].mean()), 100.0 * float(top5[mask].mean())


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Fine-tunes (or resumes) in `workdir`, which it owns meanwhile; SIGTERM / Ctrl-C save and
    stop as in pretraining. Returns the final metrics. `config.protocol="logistic_regression"`
    instead fits a logistic regression on the frozen features."""
    if config.protocol not in ("finetune", "logistic_regression"):
        raise ValueError(f"config.protocol {config.protocol!r}: use 'finetune' or "
                         f"'logistic_regression'")
    # Inputs first: a missing backbone or an unknown or unprepared dataset is refused before
    # the workdir exists.
    linear_probe.check_backbone_source(config)
    data = _resolve_data(config)
    for split in (data.train_split, data.eval_split):
        pipeline.num_examples(data, split)
    with train.StopSignals() as signals, train.workdir_lock(workdir) as lock:
        if config.protocol == "logistic_regression":
            return _logistic_regression(config, data, workdir)
        return _finetune(config, data, workdir, signals, lock)


# ---------------------------------------------------------------------------------------------
# The frozen protocol DINO reports for 1 % / 10 % labels: logistic regression on the features.
# ---------------------------------------------------------------------------------------------
def fit_logistic_regression(features: jax.Array, labels: jax.Array, mask: jax.Array, *,
                            num_classes: int, l2: float, steps: int) -> tuple[jax.Array, jax.Array]:
    """(weights [D, K], bias [K]) minimising the mean softmax cross-entropy of the `mask`ed rows
    plus l2 / 2 * |weights|^2, by `steps` of L-BFGS from zero (the problem is convex, so the
    result does not depend on the start). The rows may be sharded over the mesh."""
    mask = mask.astype(jnp.float32)
    safe_labels = jnp.where(mask > 0, labels, 0)

    def objective(params):
        weights, bias = params
        losses = optax.softmax_cross_entropy_with_integer_labels(features @ weights + bias,
                                                                safe_labels)
        return (jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
                + 0.5 * l2 * jnp.sum(weights ** 2))

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=objective)
        return (optax.apply_updates(params, updates), state), None

    params = (jnp.zeros((features.shape[1], num_classes), jnp.float32),
              jnp.zeros((num_classes,), jnp.float32))
    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
    return params


def _logistic_regression(config, data, workdir) -> dict[str, float]:
    """Frozen backbone features (centre crops, L2-normalised as DINO's) of the labelled
    examples and of the held-out split; a logistic regression fitted on the first, scored on
    the second; `logreg_top1` / `logreg_top5` appended to workdir/metrics.jsonl."""
    checkpoint_lib.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config)
    sharding.check_global_batch(config.eval_batch_size, mesh)
    examples = labelled_examples(config)
    num_classes = config.num_classes or pipeline.num_classes(data)
    graphdef, (params, model_state), which = linear_probe.pretrained_backbone(config, mesh)
    checkpoint_lib.save_config(config, workdir)

    def embed(params, model_state, images):
        x = nnx.merge(graphdef, params, model_state).embed(images).astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    embed = jax.jit(embed, out_shardings=sharding.batch_sharding(mesh))

    def extract(split, subset):
        dataset = pipeline.create_eval_dataset(data, split, examples=subset,
                                               global_batch_size=config.eval_batch_size)
        with jax.set_mesh(mesh):
            return features.extract_features(embed, params, model_state, dataset, mesh)

    train_x, train_y, train_mask = extract(data.train_split, examples)
    print(f"logistic regression on the frozen {which}: {int(train_mask.sum())} labelled "
          f"examples, {train_x.shape[1]} features -> {num_classes} classes", flush=True)
    test_x, test_y, test_mask = extract(data.eval_split, None)
    with jax.set_mesh(mesh):
        weights, bias = jax.jit(functools.partial(
            fit_logistic_regression, num_classes=num_classes, l2=config.logreg.l2,
            steps=config.logreg.steps))(train_x, train_y, train_mask)
        top1, top5 = jax.device_get(jax.jit(
            lambda x, y: linear_probe.topk_hits(x @ weights + bias, y, min(5, num_classes)))(
                test_x, test_y))
    keep = np.asarray(jax.device_get(test_mask)).astype(bool)
    results = {"logreg_top1": 100.0 * float(top1[keep].mean()),
               "logreg_top5": 100.0 * float(top5[keep].mean())}
    logger = train.MetricsLogger(workdir, 0, config.batch_size)
    logger.write(0, results)
    logger.close()
    return dict(results, step=0)


def _finetune(config, data, workdir, signals, lock) -> dict[str, float]:
    checkpoint_lib.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config)
    sharding.check_global_batch(config.batch_size, mesh)
    sharding.check_global_batch(config.eval_batch_size, mesh)
    examples = labelled_examples(config)
    num_train = len(examples) if examples is not None else pipeline.num_examples(
        data, data.train_split)
    if num_train < config.batch_size:
        raise ValueError(f"{num_train} labelled training examples, fewer than the batch size "
                         f"{config.batch_size}; lower --config.batch_size")
    epoch_steps = num_train // config.batch_size
    total_steps = train.total_train_steps(config, epoch_steps)
    num_classes = config.num_classes or pipeline.num_classes(data)

    pre_graphdef, pretrained_state, which = linear_probe.pretrained_backbone(config, mesh)
    pre_config = (checkpoint_lib.read_run_config(config.pretrained_workdir)
                  if config.pretrained_workdir else config.pretrain)
    model_config = pre_config.model.copy_and_resolve_references()
    # Fine-tuning trains every weight (the patch projection too) and regularises with drop path.
    model_config.update(drop_path_rate=config.drop_path_rate, freeze_patch_embed=False,
                        dtype=config.dtype)
    make_bam = train.model_factory(model_config, num_channels=pipeline.num_channels(data),
                                   image_size=data.global_crop_size, seed=config.seed)
    create = lambda: Classifier(make_bam().backbone, num_classes,  # noqa: E731
                                rngs=nnx.Rngs(config.seed))
    abstract_params = nnx.state(nnx.eval_shape(create), nnx.Param)
    optimizer = make_optimizer(config, abstract_params)
    graphdef, make_state, abstract_state, shardings = train.state_layout(
        create, optimizer, config.ema.enabled, mesh, config.mesh.fsdp_min_size)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    state, resumed = checkpoint_lib.restore_or_init(make_state, abstract_state, shardings,
                                                    checkpointer)
    if not resumed:
        pre_params, pre_model_state = pretrained_state
        pretrained = {path: var.get_value() for part in (pre_params, pre_model_state)
                      for path, var in nnx.to_flat_state(part)}
        params, kept_p = _load_pretrained(state.params, pretrained)
        model_state, kept_s = _load_pretrained(state.model_state, pretrained)
        unexpected = [p for p in kept_p + kept_s if not re.search(r"pos_embed|rngs|count|key", p)]
        if unexpected:
            raise ValueError(f"the pretrained backbone lacks {unexpected[:3]} (of "
                             f"{len(unexpected)}): it is another architecture than "
                             f"config.model of the run")
        state = state.replace(params=params, model_state=model_state,
                              teacher_params=params if config.ema.enabled else None,
                              teacher_model_state=model_state if config.ema.enabled else None)
    start_step = int(jax.device_get(state.step))
    checkpoint_lib.save_config(config, workdir)
    source = data.tfds_name if data.source == "tfds" else data.source
    print(f"fine-tuning the {which} on {num_train} labelled examples ({source}), {num_classes} "
          f"classes, {total_steps} steps of {config.batch_size}", flush=True)

    learning_rate = train.learning_rate_schedule(config, epoch_steps, total_steps)
    weight_decay = train.cosine_schedule(config.optimizer.weight_decay,
                                         config.optimizer.weight_decay_final, total_steps)

    def train_step(state: train.TrainState, batch):
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        images, targets = mix_batch(
            key, batch["image"], batch["label"], num_classes=num_classes,
            smoothing=config.label_smoothing, mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha, switch_prob=config.mix_switch_prob)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            logits = model(images, deterministic=False)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        lr, wd = learning_rate(state.step), weight_decay(state.step)
        opt_state = set_hyperparams(config, state.opt_state, lr, wd)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state)
        if config.ema.enabled:
            new = new.replace(
                teacher_params=optax.incremental_update(params, state.teacher_params,
                                                        1.0 - config.ema.decay),
                teacher_model_state=model_state)
        top1, _ = linear_probe.topk_hits(logits, batch["label"], 1)
        return new, dict(loss=loss, learning_rate=lr, train_top1=100.0 * top1.mean())

    compiled_step = jax.jit(train_step, donate_argnums=(0,),
                            in_shardings=(shardings, sharding.batch_sharding(mesh)),
                            out_shardings=(shardings, None))
    evaluator = _Evaluator(config, graphdef, mesh, num_classes)
    logger = train.MetricsLogger(workdir, total_steps, config.batch_size,
                                 describe=linear_probe.supervised_line)
    eval_every = max(int(round(config.eval_every_epochs * epoch_steps)), 1)
    batches = None

    def next_batch():
        nonlocal batches
        if batches is None:  # built at the first step: a finished run reads no data
            stream = pipeline.create_pretrain_dataset(
                _train_view(data), global_batch_size=config.batch_size, seed=config.seed,
                start_step=start_step, examples=examples)
            batches = sharding.device_iterator(stream.map(
                lambda b: {"image": b["global_crops"][:, 0], "label": b["label"]}), mesh)
        return next(batches)

    def evaluate(step, state):
        top1, top5 = evaluator.evaluate(state.params, state.model_state)
        results = {"finetune_top1": top1, "finetune_top5": top5}
        if config.ema.enabled:
            results["finetune_ema_top1"], results["finetune_ema_top5"] = evaluator.evaluate(
                state.teacher_params, state.teacher_model_state)
        return linear_probe.log_evaluation(results, step, logger, workdir, prefix="finetune",
                                           title="fine-tuning")

    def after_step(step, state, is_last):
        return evaluate(step, state) if step % eval_every == 0 or is_last else {}

    if start_step == 0:  # the start, for comparison: the new head makes it about chance
        evaluate(0, state)

    state, step, final = train.run_loop(
        config, state, compiled_step, next_batch, mesh=mesh, total_steps=total_steps,
        epoch_steps=epoch_steps, checkpointer=checkpointer, logger=logger, signals=signals,
        lock=lock, last_saved=start_step if resumed else None, after_step=after_step)
    if start_step >= total_steps:  # resumed a finished run: report it again
        final.update(evaluate(step, state))
    logger.close()
    return dict(final, step=step)


def _train_view(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """One augmented view per example: the first global crop's policy (crop, flip, colour,
    blur), no local crops."""
    view = ml_collections.ConfigDict(data.to_dict())
    view.update(global_crops_number=1, local_crops_number=0)
    return view


def _main(config: ml_collections.ConfigDict, workdir: str) -> None:
    result = cli.run_or_exit("bam_jax.evals.finetune", finetune, config, workdir,
                             errors=(train.RunInterrupted,))
    prefix = "logreg" if "logreg_top1" in result else "finetune"
    best = (f"  best top-1 {result['finetune_best_top1']:.2f}" if prefix == "finetune" else "")
    print(f"done: step {result['step']}  top-1 {result[prefix + '_top1']:.2f}  top-5 "
          f"{result[prefix + '_top5']:.2f}{best}", flush=True)


if __name__ == "__main__":
    cli.run_with_config_and_workdir(
        "bam_jax.evals.finetune", _main, config_help="A fine-tuning config (configs/finetune*.py)",
        workdir_help="Where the run's checkpoints and metrics.jsonl go; an existing run there "
                     "is resumed.")
