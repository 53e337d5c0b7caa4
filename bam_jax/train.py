"""BAM pretraining, top to bottom: schedules -> abstract state -> sharded init -> jitted step ->
loop. The mesh and every sharding come from `bam_jax.sharding`.

Read this file from the top: every stage of a run is one function here, called in order by
`train_and_evaluate` (`_setup`, then `run_loop`). The model is flax.nnx used functionally (split
once, merge inside jit); the loss runs inside `jax.shard_map` so each device holds only its rows
of the attention matrix. The linear probe reuses the state, the loop and the logging.

The TensorFlow-based modules (the input pipeline, evaluations, clu's writers) are imported in
the functions that use them: the step itself needs only JAX, so `bam_jax.tools.benchmark` runs on
accelerator images that have JAX but no TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import config_checks, contrastive_crop, sharding
from bam_jax import loss as loss_lib
from bam_jax import models
from bam_jax import photometric

_LOG = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient and the config says stop."""


# ---------------------------------------------------------------------------------------------
# 1. Schedules (per step, as the official cosine_scheduler, written as functions of the step).
# ---------------------------------------------------------------------------------------------
def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup (inclusive linspace, as np.linspace) then half-cosine from base to final."""
    cosine_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
        progress = jnp.clip((step - warmup_steps) / cosine_steps, 0.0, 1.0)
        cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def linear_then_constant(start: float, final: float, ramp_steps: int) -> Callable:
    """The eps schedule: linear from `start` to `final` over `ramp_steps`, then constant."""

    def schedule(step):
        fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(ramp_steps - 1, 1), 0.0, 1.0)
        return start + (final - start) * fraction

    return schedule


@dataclasses.dataclass(frozen=True)
class Schedules:
    learning_rate: Callable
    weight_decay: Callable
    sinkhorn_reg: Callable
    teacher_momentum: Callable


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> Callable:
    """Warmup then cosine to `min_lr`, peaking at the official linear scaling rule,
    base_lr * global_batch / 256 (min_lr is *not* scaled). Pretraining and the linear probe."""
    opt = config.optimizer
    peak = opt.base_lr * config.batch_size / 256
    warmup = int(round(opt.warmup_epochs * steps_per_epoch))
    return cosine_schedule(peak, opt.min_lr, total_steps, min(warmup, total_steps))


def make_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int) -> Schedules:
    opt = config.optimizer
    return Schedules(
        learning_rate=learning_rate_schedule(config, steps_per_epoch, total_steps),
        weight_decay=cosine_schedule(opt.weight_decay, opt.weight_decay_final, total_steps),
        sinkhorn_reg=linear_then_constant(
            config.loss.sinkhorn_reg, config.loss.sinkhorn_reg_final,
            int(round(config.loss.sinkhorn_reg_ramp_epochs * steps_per_epoch))),
        teacher_momentum=cosine_schedule(config.teacher.momentum, config.teacher.momentum_final,
                                         total_steps),
    )


def clip_by_global_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).

    optax.clip_by_global_norm divides by the norm itself; the official step adds torch's 1e-6.
    """
    def clip(updates, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

    return optax.stateless(clip)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW/SGD/LARS with lr and weight decay injected per step.

    As the official `get_params_groups`, weight decay goes on every parameter with at least 2
    dims (the CLS token too) and never on biases or norm scales. The masks are closures of the
    factory, not its arguments: `inject_hyperparams` would take a callable argument for a
    schedule of the step count and silently turn the mask into `False`.
    """
    opt = config.optimizer

    def decayed(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    def adamw(learning_rate, weight_decay):
        # torch.optim.AdamW: decoupled decay p *= 1 - lr * wd, eps added outside the sqrt.
        return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=1e-8,
                           weight_decay=weight_decay, mask=decayed)

    def sgd(learning_rate, weight_decay):
        # torch.optim.SGD: buf = momentum * buf + (g + wd * p); p -= lr * buf.
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decayed),
                           optax.trace(decay=opt.momentum),
                           optax.scale_by_learning_rate(learning_rate))

    def lars(learning_rate, weight_decay):
        # The official utils.LARS: decay and trust ratio (eta 0.001) on >= 2-dim parameters,
        # momentum over the scaled update, and lr applied *after* the momentum (optax.lars
        # applies it before, which differs whenever the lr changes between steps).
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decayed),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), decayed),
            optax.trace(decay=opt.momentum),
            optax.scale_by_learning_rate(learning_rate))

    factories = {"adamw": adamw, "sgd": sgd, "lars": lars}
    if opt.name not in factories:
        raise ValueError(f"config.optimizer.name={opt.name!r} is not one of adamw, sgd, lars")
    base = optax.inject_hyperparams(factories[opt.name])(learning_rate=0.0, weight_decay=0.0)
    if opt.clip_grad > 0:
        return optax.chain(clip_by_global_norm_as_torch(opt.clip_grad), base)
    return optax.chain(base)


def set_hyperparams(opt_state, learning_rate, weight_decay):
    """Write this step's lr and weight decay into the injected-hyperparameter state."""
    inject_state = opt_state[-1]
    hyperparams = dict(inject_state.hyperparams, learning_rate=learning_rate,
                       weight_decay=weight_decay)
    return (*opt_state[:-1], inject_state._replace(hyperparams=hyperparams))


# ---------------------------------------------------------------------------------------------
# 2. The train state and its sharded initialisation.
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # nnx.Param leaves: what the optimizer updates
    model_state: nnx.State  # everything else: batch stats, RNG counters, frozen tensors
    opt_state: Any
    teacher_params: nnx.State | None
    teacher_model_state: nnx.State | None
    nonfinite_steps: jax.Array  # steps skipped for a non-finite loss or gradient


def model_factory(model_config: ml_collections.ConfigDict, *, num_channels: int,
                  image_size: int, seed: int) -> Callable[[], models.BAMModel]:
    """What `state_layout` traces and the sharded init runs: the model, from `seed`."""

    def create():
        return models.build_model(model_config, num_channels=num_channels, image_size=image_size,
                                  rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    return create


def run_model_factory(config: ml_collections.ConfigDict) -> Callable[[], models.BAMModel]:
    """`model_factory` of a pretraining config (its data says the channels)."""
    from bam_jax.data import pipeline  # noqa: PLC0415 (TensorFlow; see the module docstring)

    return model_factory(config.model, num_channels=pipeline.num_channels(config.data),
                         image_size=config.data.global_crop_size, seed=config.seed)


def init_state(create_model: Callable, optimizer: optax.GradientTransformation,
               use_teacher: bool) -> TrainState:
    model = create_model()
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    # The teacher starts as a copy of the student (the official StudentTeacherWrapper).
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=optimizer.init(params),
        teacher_params=jax.tree.map(jnp.copy, params) if use_teacher else None,
        teacher_model_state=_with_own_random_streams(model_state) if use_teacher else None,
        nonfinite_steps=jnp.zeros((), jnp.int32))


def _with_own_random_streams(model_state: nnx.State) -> nnx.State:
    """A copy whose RNG keys (drop path) differ: two torch modules draw independent masks."""
    def copy(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(leaf, 1)
        return jnp.copy(leaf)

    return jax.tree.map(copy, model_state)


class StateLayout(NamedTuple):
    graphdef: nnx.GraphDef
    make_state: Callable[[], TrainState]  # what a jitted, sharded init runs
    abstract_state: TrainState  # shapes and dtypes only, no memory
    shardings: TrainState


def state_layout(create_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                 use_teacher: bool, mesh: jax.sharding.Mesh, fsdp_min_size: int) -> StateLayout:
    """The state's structure and placement, computed without allocating it (`jax.eval_shape`):
    what an init, a restore and a compile all start from."""
    graphdef = nnx.split(nnx.eval_shape(create_model))[0]
    make_state = lambda: init_state(create_model, optimizer, use_teacher)  # noqa: E731
    abstract_state = jax.eval_shape(make_state)
    return StateLayout(graphdef, make_state, abstract_state,
                       sharding.state_shardings(abstract_state, mesh, fsdp_min_size))

# ---------------------------------------------------------------------------------------------
# 3. The train step.
# ---------------------------------------------------------------------------------------------
def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `bam_loss` arguments a run's config fixes; `sinkhorn_reg` follows its schedule.
    The train step, the benchmark and the pictures all call the loss with these."""
    loss = config.loss
    return dict(num_global_crops=config.data.global_crops_number,
                num_target_crops=loss.num_target_crops, temperature=loss.temperature,
                sinkhorn_iters=loss.sinkhorn_iters, top_k=loss.top_k,
                positive_masking=loss.positive_masking)


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, schedules: Schedules,
                    mesh: jax.sharding.Mesh) -> Callable:
    fixed_loss_kwargs = loss_kwargs(config)
    policy = photometric.Policy.from_data_config(config.data)

    def forward(params, model_state, batch):
        # copy=True: fresh variables in the current trace, which BatchNorm may then mutate.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        z = model(batch["global_crops"], batch.get("local_crops"), deterministic=False)
        return z, nnx.state(model, nnx.Not(nnx.Param))

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # uint8 crops with their photometric parameters (data.augment_on_device) are augmented
        # here, once for student and teacher; crops the host augmented pass through.
        batch = photometric.augment_batch(batch, policy)
        step = state.step
        eps = schedules.sinkhorn_reg(step)
        lr = schedules.learning_rate(step)
        wd = schedules.weight_decay(step)

        z_teacher, teacher_params, teacher_model_state = None, None, None
        if state.teacher_params is not None:
            # As the official StudentTeacherWrapper: update the EMA first, then run the teacher
            # (in train mode, on all views) without gradient.
            momentum = schedules.teacher_momentum(step)
            teacher_params = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                                          state.teacher_params, state.params)
            z_teacher, teacher_model_state = forward(teacher_params, state.teacher_model_state,
                                                     batch)
            z_teacher = jax.lax.stop_gradient(z_teacher)

        def loss_fn(params, model_state):
            z, model_state = forward(params, model_state, batch)
            loss, metrics = loss_lib.sharded_bam_loss_and_metrics(
                z, mesh=mesh, batch_axes=sharding.BATCH_AXES, z_teacher=z_teacher,
                sinkhorn_reg=eps, **fixed_loss_kwargs)
            return loss, (metrics, model_state)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state)
        opt_state = set_hyperparams(state.opt_state, lr, wd)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        candidate = state.replace(
            step=step + 1, params=optax.apply_updates(state.params, updates),
            model_state=model_state, opt_state=opt_state, teacher_params=teacher_params,
            teacher_model_state=teacher_model_state)
        # A non-finite step never touches the state: parameters, optimizer moments and the
        # teacher stay as they were, so no NaN can reach a checkpoint.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, state)
        new_state = new_state.replace(
            step=step + 1,
            nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=lr,
                       weight_decay=wd, sinkhorn_reg=eps, finite=finite)
        if state.teacher_params is not None:
            metrics["teacher_momentum"] = momentum
        return new_state, metrics

    return train_step


def compile_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                       optimizer: optax.GradientTransformation, schedules: Schedules,
                       mesh: jax.sharding.Mesh, shardings: TrainState, state: Any,
                       batch: dict[str, Any]):
    """The train step as every run compiles it: the state donated and kept in `shardings`, each
    batch leaf split over the mesh. `state` and `batch` are arrays, or `jax.ShapeDtypeStruct`s
    for a compile that allocates nothing."""
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(config, graphdef, optimizer, schedules, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(step_fn, donate_argnums=(0,),
                       in_shardings=(shardings, jax.tree.map(lambda _: batch_sharding, batch)),
                       out_shardings=(shardings, None)).lower(state, batch).compile()


def abstract_batch(config: ml_collections.ConfigDict, num_channels: int,
                   batch_sharding: jax.sharding.Sharding, augment_on_device: bool = False
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of the pipeline's train batch (crops and labels), without allocating it; with
    `augment_on_device`, uint8 crops and their photometric parameters."""
    data = config.data
    batch = {"label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                           sharding=batch_sharding)}
    for name, number, size in (("global_crops", data.global_crops_number, data.global_crop_size),
                               ("local_crops", data.local_crops_number, data.local_crop_size)):
        if not number:
            continue
        batch[name] = jax.ShapeDtypeStruct(
            (config.batch_size, number, size, size, num_channels),
            jnp.uint8 if augment_on_device else jnp.float32, sharding=batch_sharding)
        if augment_on_device:
            batch[name + photometric.PARAMS_SUFFIX] = jax.ShapeDtypeStruct(
                (config.batch_size, number, len(photometric.PARAM_COLUMNS)), jnp.float32,
                sharding=batch_sharding)
    return batch


class AbstractStep(NamedTuple):
    compiled: Any  # jax.stages.Compiled
    graphdef: nnx.GraphDef
    state: TrainState  # ShapeDtypeStructs with their shardings
    batch: dict[str, jax.ShapeDtypeStruct]


def compile_from_shapes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                        num_channels: int) -> AbstractStep:
    """The train step compiled from shapes alone, no parameter or image allocated: the memory
    and FLOPs of a batch too large to run here, or of devices that are only described (a TPU
    topology). The schedules' lengths do not change the program. `data.augment_on_device`
    "auto" resolves for the mesh's platform (on for a described TPU slice)."""
    optimizer = make_optimizer(config)
    create_model = model_factory(config.model, num_channels=num_channels,
                                 image_size=config.data.global_crop_size, seed=config.seed)
    graphdef, _, abstract_state, shardings = state_layout(
        create_model, optimizer, config.teacher.enabled, mesh, config.mesh.fsdp_min_size)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract_state, shardings)
    on_device = photometric.resolve_on_device(config.data.augment_on_device,
                                              mesh.devices.flat[0].platform)
    batch = abstract_batch(config, num_channels, sharding.batch_sharding(mesh), on_device)
    schedules = make_schedules(config, steps_per_epoch=100, total_steps=1000)
    compiled = compile_train_step(config, graphdef, optimizer, schedules, mesh, shardings, state,
                                  batch)
    return AbstractStep(compiled, graphdef, state, batch)


# ---------------------------------------------------------------------------------------------
# 4. Logging: clu writers (TensorBoard), a console line, and metrics.jsonl.
# ---------------------------------------------------------------------------------------------
def pretraining_line(metrics: dict[str, float]) -> str:
    """The console line's middle part for a BAM step."""
    line = (f"loss {metrics['loss']:.4f}  lr {metrics['learning_rate']:.2e}  "
            f"eps {metrics['sinkhorn_reg']:.3f}")
    if "teacher_momentum" in metrics:
        line += f"  m {metrics['teacher_momentum']:.4f}"
    return line + (f"  H(P) {metrics['target_entropy']:.2f}  H(A) {metrics['source_entropy']:.2f}"
                   f"/{metrics['uniform_entropy']:.2f}  cos {metrics['mean_similarity']:.3f}"
                   f"  bal {metrics['column_balance']:.2f}")


class MetricsLogger:
    """Every metric to TensorBoard (clu) and metrics.jsonl; train steps also to the console,
    as `describe(metrics)` between the step and the measured img/s and ETA."""

    def __init__(self, workdir: str, total_steps: int, global_batch: int,
                 describe: Callable[[dict[str, float]], str] = pretraining_line):
        from clu import metric_writers  # noqa: PLC0415 (TensorFlow; see the module docstring)

        self._is_main = jax.process_index() == 0
        self._writer = metric_writers.create_default_writer(
            str(checkpoint_lib.workdir_path(workdir)), just_logging=not self._is_main, asynchronous=True)
        self._jsonl_path = checkpoint_lib.workdir_path(workdir) / "metrics.jsonl"
        self._total_steps = total_steps
        self._global_batch = global_batch
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self._describe = describe

    def train(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        if self._last_step is not None and step > self._last_step:
            seconds_per_step = (now - self._last_time) / (step - self._last_step)
            metrics["images_per_second"] = self._global_batch / seconds_per_step
            metrics["eta_seconds"] = seconds_per_step * (self._total_steps - step)
        self._last_time, self._last_step = now, step
        self.write(step, metrics)
        if self._is_main:
            line = f"step {step}/{self._total_steps}  {self._describe(metrics)}"
            if "images_per_second" in metrics:
                line += (f"  {metrics['images_per_second']:.1f} img/s"
                         f"  ETA {_format_seconds(metrics['eta_seconds'])}")
            print(line, flush=True)
        return metrics

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._writer.write_scalars(step, metrics)
        if self._is_main:
            append_line(self._jsonl_path, json.dumps({"step": step, **metrics}))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def append_line(path: epath.Path, line: str) -> None:
    """Append to a local file; object stores cannot append, so there the file is rewritten."""
    if "://" in str(path):
        previous = path.read_text() if path.exists() else ""
        path.write_text(previous + line + "\n")
    else:
        with path.open("a") as f:
            f.write(line + "\n")


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# 5. The loop.
# ---------------------------------------------------------------------------------------------
def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """`num_train_steps` when set, else `num_epochs` of `steps_per_epoch`."""
    if config.num_train_steps > 0:
        return config.num_train_steps
    return int(math.ceil(config.num_epochs * steps_per_epoch))


class RunInterrupted(RuntimeError):
    """A second Ctrl-C stopped the run at once (the first one asks for a save and a stop)."""


class StopSignals:
    """SIGTERM (a TPU VM preemption notice) or Ctrl-C asks the loop to checkpoint and stop.

    The handler only records the request, so no exception ever lands inside a save. A second
    Ctrl-C stops at once; the loop's `finally` still completes a save in flight.
    """

    def __init__(self):
        self.requested: str | None = None  # the name of the first signal received
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _agreed_stop(requested: bool, step: int, every: int) -> bool:
    """Whether every process stops after `step`.

    A pod's hosts get their preemption notices at different moments; a host that stopped alone
    would leave the others waiting forever in the next collective. So with several processes
    the request is shared (an all-gather of one flag) every `every` steps, and all stop at the
    same step; a single process stops at once.
    """
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.int32(requested))))


# Config fields that do not change what a run computes: a resume may change them freely.
_FREE_ON_RESUME = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "async_checkpointing", "skip_nonfinite_steps", "stop_check_every_steps",
                   "allow_changed_fields", "mesh", "knn", "data.data_dir", "data.folder",
                   "data.num_parallel_calls", "data.threadpool_size", "model.remat",
                   "model.caformer.remat_every", "ccrop.batch_size")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
    """Refuses to resume a checkpoint under a config that changes the run's meaning (batch,
    model, data, loss, schedules...), listing the fields; `allow_changed_fields` (a comma-
    separated list of fields or prefixes) admits deliberate changes, e.g. `num_epochs`."""
    allowed = _FREE_ON_RESUME + tuple(
        f.strip() for f in config.allow_changed_fields.split(",") if f.strip())
    before = _flatten(saved)
    now = _flatten(json.loads(config.to_json_best_effort()))
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in sorted(before.keys() & now.keys())
               if before[k] != now[k] and not any(k == a or k.startswith(a + ".")
                                                  for a in allowed)]
    if changed:
        fields = ",".join(c.split()[0] for c in changed)
        raise ValueError(f"the checkpoint of step {step} was trained with another config: "
                         f"{'; '.join(changed)}. Resume with the config it was trained with, "
                         f"use a new --workdir, or allow the change with "
                         f"--config.allow_changed_fields={fields}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain with BAM as configured; resume from `workdir` when it holds a checkpoint.

    Returns the final host metrics (train metrics of the last logged step and the kNN results).
    """
    config_checks.check_pretrain_config(config)  # before the workdir, mesh, model or dataset
    # SIGTERM and Ctrl-C are caught from the start: one during restore or compilation also
    # stops cleanly. The run owns its workdir (a lease) before it opens the checkpoints, whose
    # writer would clean up another run's save in flight.
    with StopSignals() as signals, workdir_lock(workdir) as lock:
        try:
            return _train_and_evaluate(config, workdir, signals, lock)
        except KeyboardInterrupt:  # a second Ctrl-C before the loop (restore, compilation)
            raise RunInterrupted("stopped by a second Ctrl-C before the first step; rerun the "
                                 "same command to resume from the last checkpoint") from None


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Process 0 takes the workdir's lease; every process learns whether it got it, so that a
    refused multi-process run stops everywhere instead of leaving the others at a barrier."""
    lock = checkpoint_lib.WorkdirLock(workdir, process_index=jax.process_index())
    refusal = None
    try:
        lock.acquire()
    except checkpoint_lib.WorkdirInUseError as error:
        refusal = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
        if refused and refusal is None:
            refusal = checkpoint_lib.WorkdirInUseError(
                f"{workdir} is in use by another run (process 0 says why)")
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        lock.release()


class _Pretraining(NamedTuple):
    """Everything a run has once set up, before its first step."""
    mesh: jax.sharding.Mesh
    epoch_steps: int
    total_steps: int
    graphdef: nnx.GraphDef
    shardings: TrainState
    optimizer: optax.GradientTransformation
    schedules: Schedules
    checkpointer: checkpoint_lib.Checkpointer
    state: TrainState
    last_saved: int | None  # the step restored from, or None for a new run
    boxes: np.ndarray | None  # the ContrastiveCrop box table, when enabled


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Pretraining:
    """Mesh, schedules, then the state: the newest checkpoint of `workdir`, or a new one."""
    from bam_jax.data import pipeline  # noqa: PLC0415 (TensorFlow; see the module docstring)

    checkpoint_lib.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config)
    sharding.check_global_batch(config.batch_size, mesh)
    epoch_steps = pipeline.steps_per_epoch(config.data, config.batch_size)
    total_steps = total_train_steps(config, epoch_steps)
    optimizer = make_optimizer(config)
    # Abstract state (no memory), then a jitted init that writes each leaf straight into its
    # sharding: no host ever holds the full unsharded model.
    graphdef, make_state, abstract_state, shardings = state_layout(
        run_model_factory(config), optimizer, config.teacher.enabled, mesh,
        config.mesh.fsdp_min_size)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    state, resumed = checkpoint_lib.restore_or_init(make_state, abstract_state, shardings,
                                                    checkpointer)
    start_step = int(jax.device_get(state.step))
    if resumed:
        check_resume_config(checkpointer.restore_config(start_step), config, start_step)
        if start_step > total_steps:
            raise ValueError(f"the checkpoint is at step {start_step}, past the {total_steps} "
                             f"steps this config trains in all; raise num_epochs or "
                             f"num_train_steps, or use a new --workdir")
    checkpoint_lib.save_config(config, workdir)
    # ContrastiveCrop: the box table is part of each checkpoint.
    boxes = None
    if config.ccrop.enabled:
        num_train = pipeline.num_examples(config.data, config.data.train_split)
        boxes = checkpointer.restore_boxes(start_step, num_train) if resumed else None
        if boxes is None:
            boxes = contrastive_crop.initial_boxes(num_train)
    return _Pretraining(mesh, epoch_steps, total_steps, graphdef, shardings, optimizer,
                        make_schedules(config, epoch_steps, total_steps), checkpointer, state,
                        start_step if resumed else None, boxes)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, signals: StopSignals,
                        lock: checkpoint_lib.WorkdirLock) -> dict[str, Any]:
    from bam_jax.data import pipeline  # noqa: PLC0415 (see the module docstring)
    from bam_jax.evals import features, knn  # noqa: PLC0415

    run = _setup(config, workdir)
    mesh, epoch_steps, state = run.mesh, run.epoch_steps, run.state
    boxes = run.boxes
    box_updater, box_update_steps, ccrop_from_epoch = None, set(), 0
    if config.ccrop.enabled:
        box_updater = features.BoxUpdater(config, run.graphdef, mesh, len(boxes))
        warmup = config.optimizer.warmup_epochs
        box_update_steps = {(e + 1) * epoch_steps for e in contrastive_crop.box_update_epochs(
            num_epochs=math.ceil(run.total_steps / epoch_steps), warmup_epochs=warmup,
            loc_interval=config.ccrop.loc_interval)}
        ccrop_from_epoch = contrastive_crop.first_box_epoch(
            warmup_epochs=warmup, loc_interval=config.ccrop.loc_interval)

    # The train stream is a function of (seed, step, boxes): rebuilt whenever the boxes change.
    augment_on_device = photometric.resolve_on_device(config.data.augment_on_device)

    def train_batches(start: int):
        dataset = pipeline.create_pretrain_dataset(
            config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start,
            boxes=boxes, ccrop_alpha=config.ccrop.alpha, ccrop_from_epoch=ccrop_from_epoch,
            augment_on_device=augment_on_device)
        return sharding.device_iterator(dataset, mesh)

    batches = train_batches(int(jax.device_get(state.step)))
    first_batch = next(batches)
    compiled_step = compile_train_step(config, run.graphdef, run.optimizer, run.schedules, mesh,
                                       run.shardings, state, first_batch)
    _print_memory_analysis(compiled_step)

    logger = MetricsLogger(workdir, run.total_steps, config.batch_size)
    evaluator = knn.KnnEvaluator(config, run.graphdef, mesh) if config.knn.enabled else None
    knn_every = max(int(round(config.knn.every_epochs * epoch_steps)), 1) \
        if config.knn.every_epochs > 0 else 0
    final: dict[str, Any] = {}
    if evaluator is not None and config.knn.eval_at_start and int(state.step) == 0:
        # The same backbone at random init: the baseline that pretraining must beat.
        results = {f"init_{k}": v for k, v in evaluator.evaluate(state).items()}
        logger.write(0, results)
        final.update(results)
        print("kNN at init: " + "  ".join(f"{k} {v:.2f}" for k, v in results.items()), flush=True)

    def next_batch():
        nonlocal first_batch
        if first_batch is None:
            return next(batches)
        batch, first_batch = first_batch, None
        return batch

    def after_step(step: int, state: TrainState, is_last: bool) -> dict[str, Any]:
        nonlocal boxes, batches
        results = {}
        if evaluator is not None and ((knn_every and step % knn_every == 0) or is_last):
            results = evaluator.evaluate(state)
            logger.write(step, results)
            print("kNN: " + "  ".join(f"{k} {v:.2f}" for k, v in results.items()), flush=True)
        if step in box_update_steps and not is_last:
            boxes = _update_boxes(box_updater, state, step, logger)
            batches = train_batches(step)
        return results

    def check_finite(step: int, loss: float, state: TrainState, last_saved: int | None):
        nonfinite = int(jax.device_get(state.nonfinite_steps))
        if nonfinite and not config.skip_nonfinite_steps:
            raise NonFiniteLossError(
                f"non-finite loss or gradient by step {step} (loss {loss}); stopped without "
                f"saving it, the last good checkpoint is step {last_saved}. Lower the learning "
                f"rate, raise config.loss.sinkhorn_reg, or set "
                f"--config.skip_nonfinite_steps=True to skip such steps")

    state, step, loop_final = run_loop(
        config, state, compiled_step, next_batch, mesh=mesh, total_steps=run.total_steps,
        epoch_steps=epoch_steps, checkpointer=run.checkpointer, logger=logger, signals=signals,
        lock=lock, last_saved=run.last_saved, after_step=after_step, check=check_finite,
        saved_with=lambda: {"boxes": boxes})
    logger.close()
    return {**final, **loop_final, "step": step}


def run_loop(config: ml_collections.ConfigDict, state: Any, step_fn: Callable,
             next_batch: Callable[[], Any], *, mesh: jax.sharding.Mesh, total_steps: int,
             epoch_steps: int, checkpointer: checkpoint_lib.Checkpointer, logger: MetricsLogger,
             signals: StopSignals, lock: checkpoint_lib.WorkdirLock, last_saved: int | None,
             after_step: Callable[[int, Any, bool], dict] | None = None,
             check: Callable[[int, float, Any, int | None], None] | None = None,
             saved_with: Callable[[], dict] = dict) -> tuple[Any, int, dict[str, Any]]:
    """Steps from `state.step` to `total_steps`: log every `log_every_steps`, `after_step`
    (evaluations) after each, save every `checkpoint_every_steps` and at the end, and on
    SIGTERM / Ctrl-C save and stop, at the same step on every process. `check` may raise
    before a logged or saved step. Returns (state, step, the last logged metrics and results).

    The checkpointer is closed on the way out, whatever happened: a save in flight completes
    even when the loop raises (a non-finite loss, a second Ctrl-C), so the last good checkpoint
    is never left half-written.
    """
    final: dict[str, Any] = {}
    start_step = step = int(jax.device_get(state.step))
    try:
        while step < total_steps:
            if signals.requested and step == start_step and jax.process_count() == 1:
                print(f"{signals.requested} before the first step: nothing new to save (the "
                      f"last checkpoint is step {last_saved}); rerun the same command to "
                      f"resume", flush=True)
                break
            with jax.set_mesh(mesh):
                state, metrics = step_fn(state, next_batch())
            step += 1
            is_last = step == total_steps
            stop = _agreed_stop(signals.requested is not None, step,
                                config.stop_check_every_steps)
            if step % config.log_every_steps == 0 or is_last or stop:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                host["epoch"] = step / epoch_steps
                if check is not None:
                    check(step, host["loss"], state, last_saved)
                final.update(logger.train(step, host))
            if after_step is not None:
                final.update(after_step(step, state, is_last))
            if step % config.checkpoint_every_steps == 0 or is_last or stop:
                if check is not None:
                    check(step, float(jax.device_get(metrics["loss"])), state, last_saved)
                lock.ensure_held()  # never write over a run that took the workdir over
                checkpointer.save(step, state, config, **saved_with())
                last_saved = step
            if stop:
                why = signals.requested or "a stop request on another process"
                print(f"{why}: saved step {step} and stopped; rerun the same command to resume",
                      flush=True)
                break
    except KeyboardInterrupt:
        raise RunInterrupted(f"stopped by a second Ctrl-C after step {step}; the last "
                             f"checkpoint is step {last_saved}; rerun the same command to "
                             f"resume") from None
    finally:
        checkpointer.close()
    return state, step, final


def _update_boxes(box_updater, state, step: int, logger: MetricsLogger) -> np.ndarray:
    """A new ContrastiveCrop box table from the current teacher, timed and logged."""
    start = time.perf_counter()
    boxes = box_updater.update(state)
    seconds = time.perf_counter() - start
    area = float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    logger.write(step, {"ccrop_update_seconds": seconds, "ccrop_mean_box_area": area})
    print(f"ContrastiveCrop: {len(boxes)} boxes in {seconds:.1f} s, mean area {area:.3f} of "
          f"the image", flush=True)
    return boxes


def restore_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *,
                fsdp_min_size: int, random_init: bool = False, random_init_flag: str = ""):
    """(graphdef, TrainState, step) of the newest readable checkpoint of a pretraining workdir,
    restored straight onto `mesh` with the trainer's own shardings: for the evaluations (kNN,
    linear probe, pictures). `random_init` builds the same model at its initialisation instead
    (step 0) and needs no checkpoint; `random_init_flag` names the caller's option for that."""
    graphdef, make_state, abstract_state, shardings = state_layout(
        run_model_factory(config), make_optimizer(config), config.teacher.enabled, mesh,
        fsdp_min_size)
    if random_init:
        return graphdef, jax.jit(make_state, out_shardings=shardings)(), 0
    alternative = f" or pass {random_init_flag} for the backbone at init" \
        if random_init_flag else ""
    step, state, _ = checkpoint_lib.read_newest(
        workdir, checkpoint_lib.abstract_with_shardings(abstract_state, shardings), alternative)
    return graphdef, state, step


def _print_memory_analysis(compiled) -> None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return
    mib = 1 / 2**20
    print(f"compiled train step per device: arguments {analysis.argument_size_in_bytes * mib:.1f} "
          f"MiB, outputs {analysis.output_size_in_bytes * mib:.1f} MiB, temporaries "
          f"{analysis.temp_size_in_bytes * mib:.1f} MiB, aliased "
          f"{analysis.alias_size_in_bytes * mib:.1f} MiB", flush=True)
