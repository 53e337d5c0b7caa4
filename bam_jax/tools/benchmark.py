"""Train-step benchmark: `python -m bam_jax.tools.benchmark --workload=vit_s16 [--batch_size=8]`.

Workloads: vit_s16, vit_b16, caformer_m36 (the official recipes' model, crops, projector, teacher
and optimizer) and default (the embedded digits recipe). `--compile_only` lowers and compiles the
step from abstract shapes (no parameters or batch allocated) and reports XLA's FLOPs and memory
analysis: the per-device memory of a batch that could not run here (e.g. the official 256 per
GPU). `--remat_every` sets CAFormer remat (0: off), `--remat` ViT remat.

Prints and writes as JSON (`--output`): the median step time after compilation, images/s, the
step's model FLOPs from XLA's cost analysis, achieved FLOP/s and its fraction of a matmul peak
measured in the same run (MFU), the share of the step spent in the loss + Sinkhorn, and memory.
Runs unchanged on CPU, GPU and TPU: fp32 on CPU, bf16 compute on accelerators by default.
Inputs are random tensors of the workload's shapes, so the figure is the step alone, not the
input pipeline (see `bam_jax.tools.benchmark_input` for that).

`--torch_reference` (ViT workloads, torch installed) times the official PyTorch step of the same
shapes (`bam_jax.tools.torch_reference`) in a child process, in turns with this step over
`--rounds` rounds (the order swapping every round, so a machine whose speed drifts affects both
alike), and reports the speed ratio official time / bam_jax time per round (> 1: bam_jax faster),
in wall time and in CPU time (each process's own: steadier on cores shared with other work).
`--override=field=value` (repeatable) edits the workload's config, e.g. to shrink it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from bam_jax import loss as loss_lib
from bam_jax import photometric
from bam_jax import sharding, train
from bam_jax.tools import torch_reference
from configs import caformer_m36, common
from configs import default as default_config

_WORKLOAD = flags.DEFINE_enum("workload", "vit_s16",
                              ["vit_s16", "vit_b16", "caformer_m36", "default"], "Named workload.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0: the workload's default.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype; auto: float32 on CPU, bfloat16 elsewhere.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise every ViT block.")
_REMAT_EVERY = flags.DEFINE_integer(
    "remat_every", -1, "CAFormer: rematerialise each stage's blocks in groups of this many; 0 "
    "off; -1: the workload's (4 for caformer_m36, the official --grad_checkpointing 4).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after compilation.")
_ALTERNATE = flags.DEFINE_list(
    "alternate_with", [], "Other workloads to time in turns with --workload in one process "
    "(e.g. vit_s16,vit_b16): per-round step times and time ratios to --workload.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "With --alternate_with or --torch_reference: timing rounds.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile from abstract shapes and report FLOPs and memory only.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")
_TORCH_REFERENCE = flags.DEFINE_bool(
    "torch_reference", False, "Also time the official PyTorch step of the same shapes (ViT "
    "workloads, torch installed) in a child process, in turns with this one over --rounds.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "field=value edits of the workload's config (e.g. model.depth=2), applied "
    "after --batch_size and --dtype.")


def workload_config(name: str, batch_size: int,
                    dtype: str) -> tuple[ml_collections.ConfigDict, int]:
    """(config, image channels): the official recipe at benchmark size (ViT or CAFormer-M36,
    2x224 + 6x96 crops, 3x4096 projector, EMA teacher, AdamW), or the embedded default
    (one-channel digits)."""
    if name == "default":
        config, num_channels = default_config.get_config(), 1
    elif name == "caformer_m36":
        config, num_channels = caformer_m36.get_config(), 3
        config.batch_size = 8
    else:
        config, num_channels = common.base_config(), 3
        config.model.vit_variant = {"vit_s16": "small", "vit_b16": "base"}[name]
        config.batch_size = 8
    if batch_size:
        config.batch_size = batch_size
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    config.model.dtype = dtype
    config.knn.enabled = False
    return config, num_channels


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """`field.path=value` edits; the value is a Python literal, or else a string."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected field=value")
        *parents, name = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[name] = value  # ConfigDict refuses unknown fields and wrong types


def cpu_description() -> dict:
    """The host CPU's model name and the vector extensions that matter to XLA and PyTorch."""
    model, cpu_flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not cpu_flags:
                    cpu_flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "avx512f": "avx512f" in cpu_flags, "amx": "amx_tile" in cpu_flags}


def random_batch(config, num_channels: int, batch_sharding) -> dict[str, jax.Array]:
    """Random crops of the workload's shapes; where `data.augment_on_device` resolves on, uint8
    crops with parameters, so that the step includes the photometric stage."""
    data = config.data
    key_global, key_local = jax.random.split(jax.random.key(0))
    batch = {"global_crops": jax.random.normal(key_global, (
        config.batch_size, data.global_crops_number, data.global_crop_size,
        data.global_crop_size, num_channels))}
    if data.local_crops_number:
        batch["local_crops"] = jax.random.normal(key_local, (
            config.batch_size, data.local_crops_number, data.local_crop_size,
            data.local_crop_size, num_channels))
    if photometric.resolve_on_device(data.augment_on_device):
        for key in list(batch):
            batch[key + photometric.PARAMS_SUFFIX] = photometric.identity_params(
                batch[key].shape[:2])
            batch[key] = (jnp.abs(batch[key]) * 80).astype(jnp.uint8)
    return jax.device_put(batch, batch_sharding)


def matmul_peak_flops(dtype) -> float:
    """Achieved FLOP/s of a large square matmul on one device: the denominator of MFU."""
    size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def _median_seconds(fn, *args, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_activation_bytes(config: ml_collections.ConfigDict, graphdef, state, batch) -> int:
    """Bytes the student's backward keeps from its forward (all views, projector, loss): JAX's
    residuals of the loss w.r.t. the parameters, less those that are arguments (parameters,
    images). This is what remat trades for recomputation, whatever the backend's scheduler does
    with it (XLA:CPU's temporaries do not shrink with remat; see README)."""
    from flax import nnx  # noqa: PLC0415
    from jax._src.ad_checkpoint import saved_residuals  # noqa: PLC0415 (no public equivalent)

    kwargs = train.loss_kwargs(config)

    def loss(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        batch = photometric.augment_batch(batch, photometric.Policy.from_data_config(config.data))
        z = model(batch["global_crops"], batch.get("local_crops"), deterministic=False)
        return loss_lib.bam_loss(z, sinkhorn_reg=config.loss.sinkhorn_reg, **kwargs)

    strip = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    residuals = saved_residuals(loss, strip(state.params), strip(state.model_state),
                                strip(batch))
    return int(sum(math.prod(r.shape) * r.dtype.itemsize for r, why in residuals
                   if not why.startswith("from the argument")))


def compile_only(config: ml_collections.ConfigDict, *, num_channels: int) -> dict:
    """XLA's FLOPs and per-device memory of the compiled step, from abstract shapes only."""
    start = time.perf_counter()
    compiled, graphdef, state, batch = train.compile_from_shapes(
        config, sharding.make_mesh(config), num_channels=num_channels)
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    memory = compiled.memory_analysis()
    saved = saved_activation_bytes(config, graphdef, state, batch)
    return {
        "saved_activation_bytes": saved,
        "backend": jax.default_backend(), "num_devices": jax.device_count(),
        "dtype": config.model.dtype, "batch_size": config.batch_size,
        "compile_seconds": compile_seconds,
        "step_flops": float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0)),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "output_bytes": getattr(memory, "output_size_in_bytes", None),
        "alias_bytes": getattr(memory, "alias_size_in_bytes", None),
    }


def _prepare(config: ml_collections.ConfigDict, num_channels: int):
    """(one_step, flops, memory analysis, mesh, batch sharding): the compiled step on a random
    batch, its state held between calls."""
    mesh = sharding.make_mesh(config)
    total_steps = 1000
    schedules = train.make_schedules(config, steps_per_epoch=100, total_steps=total_steps)
    optimizer = train.make_optimizer(config)

    create_model = train.model_factory(config.model, num_channels=num_channels,
                                       image_size=config.data.global_crop_size, seed=config.seed)
    graphdef, make_state, _, shardings = train.state_layout(
        create_model, optimizer, config.teacher.enabled, mesh, config.mesh.fsdp_min_size)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = random_batch(config, num_channels, batch_sharding)
    with jax.set_mesh(mesh):
        state = jax.jit(make_state, out_shardings=shardings)()
    compiled = train.compile_train_step(config, graphdef, optimizer, schedules, mesh, shardings,
                                        state, batch)
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    holder = {"state": state}

    def one_step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    return one_step, flops, compiled.memory_analysis(), mesh, batch_sharding


def alternate(names: list[str], *, batch_size: int, dtype: str, rounds: int, steps: int,
              warmup_steps: int, remat_every: int, remat: bool) -> dict:
    """Step times of several workloads compiled in one process and timed in turns (the order
    rotates every round), so that a machine whose speed drifts affects each side alike; the
    ratios to the first workload are taken within each round."""
    prepared = {}
    for name in names:
        config, num_channels = workload_config(name, batch_size, dtype)
        config.model.remat = remat
        if remat_every >= 0:
            config.model.caformer.remat_every = remat_every
        one_step, flops, _, _, _ = _prepare(config, num_channels)
        for _ in range(max(warmup_steps, 1)):
            jax.block_until_ready(one_step())
        prepared[name] = (one_step, flops, config)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(_median_seconds(prepared[name][0], steps=steps))
    first = names[0]
    result = {"backend": jax.default_backend(), "num_devices": jax.device_count(),
              "batch_size": batch_size, "rounds": rounds, "steps_per_round": steps,
              "workloads": {}}
    for name in names:
        config = prepared[name][2]
        ratios = [t / f for t, f in zip(times[name], times[first])]
        result["workloads"][name] = {
            "dtype": config.model.dtype, "remat": config.model.remat,
            "remat_every": config.model.caformer.remat_every
            if config.model.backbone == "caformer" else None,
            "step_flops": prepared[name][1], "step_seconds_per_round": times[name],
            "median_step_seconds": statistics.median(times[name]),
            f"time_ratio_to_{first}_per_round": ratios,
            f"median_time_ratio_to_{first}": statistics.median(ratios)}
    return result


def compare_with_torch(config: ml_collections.ConfigDict, *, num_channels: int, rounds: int,
                       steps: int, warmup_steps: int) -> dict:
    """This step and the official PyTorch step (a child process) timed in alternating rounds:
    each round takes the median of `steps` steps of each side, jax first in even rounds."""
    spec = torch_reference.spec_from_config(config, num_channels)
    one_step, flops, _, _, _ = _prepare(config, num_channels)
    for _ in range(max(warmup_steps, 1)):
        jax.block_until_ready(one_step())
    wall, cpu = {"bam_jax": [], "official": []}, {"bam_jax": [], "official": []}
    with torch_reference.TorchReference(spec, max(warmup_steps, 1)) as reference:
        for r in range(rounds):
            for side in (("bam_jax", "official") if r % 2 == 0 else ("official", "bam_jax")):
                if side == "bam_jax":
                    times = [torch_reference.timed(lambda: jax.block_until_ready(one_step()))
                             for _ in range(steps)]
                else:
                    times = reference.step_seconds(steps)
                wall[side].append(statistics.median(t[0] for t in times))
                cpu[side].append(statistics.median(t[1] for t in times))
    ratios = [o / b for o, b in zip(wall["official"], wall["bam_jax"])]
    cpu_ratios = [o / b for o, b in zip(cpu["official"], cpu["bam_jax"])]
    return {
        "workload": _WORKLOAD.value if flags.FLAGS.is_parsed() else None,
        "backend": jax.default_backend(), "cpu": cpu_description(), "jax": jax.__version__,
        "torch": reference.info["torch"], "torch_threads": reference.info["threads"],
        "dtype": config.model.dtype, "batch_size": config.batch_size, "step_flops": flops,
        "rounds": rounds, "steps_per_round": steps,
        "bam_jax_step_seconds_per_round": wall["bam_jax"],
        "official_step_seconds_per_round": wall["official"],
        "speed_ratio_per_round": ratios,
        "median_speed_ratio": statistics.median(ratios),
        "bam_jax_step_cpu_seconds_per_round": cpu["bam_jax"],
        "official_step_cpu_seconds_per_round": cpu["official"],
        "cpu_time_ratio_per_round": cpu_ratios,
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "official_warmup_losses": reference.info["warmup_losses"],
    }


def run(config: ml_collections.ConfigDict, *, num_channels: int, steps: int,
        warmup_steps: int = 1) -> dict:
    one_step, flops, memory, mesh, batch_sharding = _prepare(config, num_channels)
    with jax.set_mesh(mesh):
        for _ in range(max(warmup_steps, 1)):  # warm-up (the first execution allocates)
            jax.block_until_ready(one_step())
        step_seconds = _median_seconds(one_step, steps=steps)

        # The loss + Sinkhorn alone, on projector outputs of the step's shape.
        num_views = config.data.global_crops_number + config.data.local_crops_number
        z = jax.device_put(jax.random.normal(jax.random.key(1), (
            config.batch_size, num_views, config.model.projector.out_dim)), batch_sharding)

        def loss_and_grad(z, z_teacher):
            return jax.value_and_grad(lambda x: loss_lib.sharded_bam_loss_and_metrics(
                x, mesh=mesh, batch_axes=sharding.BATCH_AXES, z_teacher=z_teacher,
                sinkhorn_reg=config.loss.sinkhorn_reg, **train.loss_kwargs(config))[0])(z)

        loss_fn = jax.jit(loss_and_grad)
        z_teacher = z if config.teacher.enabled else None
        jax.block_until_ready(loss_fn(z, z_teacher))
        loss_seconds = _median_seconds(loss_fn, z, z_teacher, steps=max(steps, 5))

    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    peak = matmul_peak_flops(dtype) * jax.device_count()
    result = {
        "workload": _WORKLOAD.value if flags.FLAGS.is_parsed() else None,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "dtype": config.model.dtype,
        "batch_size": config.batch_size,
        "step_seconds": step_seconds,
        "images_per_second": config.batch_size / step_seconds,
        "step_flops": flops,
        "achieved_flops_per_second": flops / step_seconds,
        "matmul_peak_flops_per_second": peak,
        "mfu": flops / step_seconds / peak,
        "loss_seconds": loss_seconds,
        "loss_share_of_step": loss_seconds / step_seconds,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
    }
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return result


def main(argv):
    del argv
    config, num_channels = workload_config(_WORKLOAD.value, _BATCH.value, _DTYPE.value)
    config.model.remat = _REMAT.value
    if _REMAT_EVERY.value >= 0:
        config.model.caformer.remat_every = _REMAT_EVERY.value
    apply_overrides(config, _OVERRIDE.value)
    if _TORCH_REFERENCE.value:
        if importlib.util.find_spec("torch") is None:
            print("--torch_reference: torch is not installed; the official step is not timed "
                  "(pip install -r requirements-dev.txt)", flush=True)
        else:
            result = compare_with_torch(config, num_channels=num_channels, rounds=_ROUNDS.value,
                                        steps=_STEPS.value, warmup_steps=_WARMUP.value)
            print(json.dumps(result, indent=2))
            print(f"{result['workload']} on {result['cpu']['model'] or result['backend']}: "
                  f"bam_jax {statistics.median(result['bam_jax_step_seconds_per_round']):.3f} "
                  f"s/step, official PyTorch "
                  f"{statistics.median(result['official_step_seconds_per_round']):.3f} s/step; "
                  f"speed ratio official/bam_jax {result['median_speed_ratio']:.2f}x (per round: "
                  + ", ".join(f"{x:.2f}" for x in result["speed_ratio_per_round"])
                  + f"); CPU-time ratio {result['median_cpu_time_ratio']:.2f}x (per round: "
                  + ", ".join(f"{x:.2f}" for x in result["cpu_time_ratio_per_round"]) + ")",
                  flush=True)
            if _OUTPUT.value:
                with open(_OUTPUT.value, "w") as f:
                    json.dump(result, f, indent=2)
            return
    if _ALTERNATE.value:
        result = alternate([_WORKLOAD.value, *_ALTERNATE.value], batch_size=_BATCH.value,
                           dtype=_DTYPE.value, rounds=_ROUNDS.value, steps=_STEPS.value,
                           warmup_steps=_WARMUP.value, remat_every=_REMAT_EVERY.value,
                           remat=_REMAT.value)
        print(json.dumps(result, indent=2))
        for name, w in result["workloads"].items():
            print(f"{name}: median {w['median_step_seconds']:.2f} s/step, "
                  f"{w['step_flops'] / 1e12:.3f} TFLOP/step, time ratio to {_WORKLOAD.value} "
                  f"{w[f'median_time_ratio_to_{_WORKLOAD.value}']:.3f} (per round: "
                  + ", ".join(f"{x:.3f}" for x in w[f"time_ratio_to_{_WORKLOAD.value}_per_round"])
                  + ")", flush=True)
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                json.dump(result, f, indent=2)
        return
    if _COMPILE_ONLY.value:
        result = dict(compile_only(config, num_channels=num_channels), workload=_WORKLOAD.value,
                      remat=config.model.remat,
                      remat_every=config.model.caformer.remat_every
                      if config.model.backbone == "caformer" else None)
        print(json.dumps(result, indent=2))
        gib = 1 / 2**30
        print(f"{result['workload']} compiled ({result['dtype']}, batch {result['batch_size']} on "
              f"{result['num_devices']} device(s)): {result['step_flops'] / 1e12:.3f} TFLOP/step; "
              f"per device: temporaries {result['temp_bytes'] * gib:.2f} GiB, arguments "
              f"{result['argument_bytes'] * gib:.2f} GiB; saved activations (student backward) "
              f"{result['saved_activation_bytes'] * gib:.2f} GiB", flush=True)
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                json.dump(result, f, indent=2)
        return
    result = run(config, num_channels=num_channels, steps=_STEPS.value,
                 warmup_steps=_WARMUP.value)
    print(json.dumps(result, indent=2))
    print(f"{result['workload']} on {result['device']} x{result['num_devices']} "
          f"({result['dtype']}, batch {result['batch_size']}): "
          f"{result['step_seconds']:.3f} s/step, {result['images_per_second']:.2f} img/s, "
          f"{result['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s = "
          f"{100 * result['mfu']:.1f}% of the measured matmul peak "
          f"({result['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s); loss+Sinkhorn "
          f"{100 * result['loss_share_of_step']:.2f}% of the step", flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
