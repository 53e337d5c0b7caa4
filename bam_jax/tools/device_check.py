"""One prepared accelerator check: `launch/device_check.sh --output=FILE` (or this module).

For ViT-S/16 and ViT-B/16 (the official recipe: 2x224 + 6x96 crops, 3x4096 projector, EMA
teacher, AdamW; bf16 compute) it finds the largest batch that fits, starting from
`--start_batches` and halving after an out-of-memory failure, and records that batch's
`bam_jax.tools.benchmark` figures (step time, images/s, MFU). Each attempt runs in its own
process, so an out-of-memory error leaves nothing behind, and this process touches the device
only at the end. Then it times the on-device photometric
augmentation (colour jitter, grayscale, blur, solarisation, normalisation) of one batch of uint8
crops of each workload's shape, as a share of that workload's step. Everything goes into one JSON.

`--budget_s` bounds the whole check: each workload gets an equal share of what is left when its
search starts (30 s kept for the augmentation), attempts not started in time are skipped, and an
attempt's timeout is what is left of its share. The default leaves a margin below 8 minutes
including compilation.
`--tiny` shrinks the model and crops so the whole check runs on a CPU in about a minute, which is
how the tests exercise it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

# The benchmark's config edits of --tiny (bam_jax.tools.benchmark --override).
TINY_OVERRIDES = ("model.vit_variant=custom", "model.width=32", "model.depth=2",
                  "model.num_heads=2", "data.global_crop_size=32", "data.local_crop_size=16",
                  "data.local_crops_number=2", "model.projector.hidden_dim=64",
                  "model.projector.out_dim=32")
# Seconds of the budget kept for the augmentation measurement at the end.
AUGMENTATION_RESERVE_S = 30.0
# How XLA and JAX report an allocation that does not fit (GPU, TPU, CPU).
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def is_out_of_memory(stderr: str) -> bool:
    return any(marker in stderr for marker in _OOM_MARKERS)


def largest_fitting_batch(attempt: Callable[[int], tuple[str, dict | None]], start: int,
                          minimum: int) -> tuple[int | None, dict | None, list[dict]]:
    """Halves the batch from `start` while `attempt(batch)` answers "oom".

    `attempt` returns ("ok", result), ("oom", None) or (another outcome, None), which ends the
    search. Returns (batch, its result, every attempt) with batch None when none fitted.
    """
    attempts, batch = [], start
    while batch >= minimum:
        began = time.perf_counter()
        outcome, result = attempt(batch)
        attempts.append({"batch_size": batch, "outcome": outcome,
                         "seconds": round(time.perf_counter() - began, 1)})
        if outcome == "ok":
            return batch, result, attempts
        if outcome != "oom":
            break
        batch //= 2
    return None, None, attempts


def benchmark_attempt(workload: str, *, steps: int, dtype: str, overrides: tuple[str, ...],
                      deadline: float) -> Callable[[int], tuple[str, dict | None]]:
    """`attempt(batch)` for `largest_fitting_batch`: one benchmark process, its JSON."""
    def attempt(batch: int) -> tuple[str, dict | None]:
        left = deadline - time.monotonic()
        if left < 10:
            return "skipped: out of time", None
        with tempfile.TemporaryDirectory() as tmp:
            output = os.path.join(tmp, "result.json")
            command = [sys.executable, "-m", "bam_jax.tools.benchmark", f"--workload={workload}",
                       f"--batch_size={batch}", f"--dtype={dtype}", f"--steps={steps}",
                       f"--output={output}", *(f"--override={o}" for o in overrides)]
            print(f"[device_check] {workload} batch {batch}: {' '.join(command[1:])}",
                  flush=True)
            try:
                process = subprocess.run(command, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                return "timeout", None
            if process.returncode == 0:
                with open(output) as f:
                    return "ok", json.load(f)
            if is_out_of_memory(process.stderr):
                return "oom", None
            print(process.stderr[-3000:], file=sys.stderr, flush=True)
            return f"failed (exit {process.returncode})", None
    return attempt


def augmentation_cost(workloads: dict, *, overrides: tuple[str, ...], steps: int) -> dict:
    """Seconds of the on-device photometric stage on one batch of each benchmarked workload's
    uint8 crops, and their share of its step."""
    import jax  # noqa: PLC0415 (the device is touched only now: the benchmarks have finished)

    from bam_jax import photometric  # noqa: PLC0415
    from bam_jax.tools import benchmark  # noqa: PLC0415

    out = {}
    for name, entry in workloads.items():
        if entry["result"] is None:
            continue
        config, channels = benchmark.workload_config(name, entry["batch_size"], "auto")
        benchmark.apply_overrides(config, list(overrides))
        config.data.augment_on_device = "on"  # uint8 crops with their parameters
        batch = benchmark.random_batch(config, channels,
                                       jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        policy = photometric.Policy.from_data_config(config.data)
        augment = jax.jit(lambda b: photometric.augment_batch(b, policy))  # noqa: B023
        jax.block_until_ready(augment(batch))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(augment(batch))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[name] = {"batch_size": config.batch_size, "seconds": seconds,
                     "share_of_step": seconds / entry["result"]["step_seconds"]}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bam_jax.tools.device_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="write the JSON here")
    parser.add_argument("--workloads", default="vit_s16,vit_b16",
                        help="comma-separated benchmark workloads")
    parser.add_argument("--start_batches", default=None,
                        help="first batch tried per workload, then halved after an "
                        "out-of-memory failure (default 256,128: ViT-S/16 at the official "
                        "per-GPU batch, ViT-B/16 at half of it; --tiny: 16 each)")
    parser.add_argument("--min_batch", type=int, default=8, help="give up below this batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per benchmark")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="seconds for the whole check")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-block ViT on 32/16 px crops: a CPU smoke test")
    args = parser.parse_args(argv)
    args.workloads = args.workloads.split(",")
    starts = args.start_batches or ("16," * len(args.workloads) if args.tiny else "256,128")
    args.start_batches = [int(b) for b in starts.strip(",").split(",")]
    if len(args.start_batches) != len(args.workloads):
        parser.error("--start_batches needs one batch per workload")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.monotonic()
    deadline = began + args.budget_s
    overrides = TINY_OVERRIDES if args.tiny else ()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": args.tiny,
              "dtype": args.dtype, "budget_s": args.budget_s, "workloads": {}}
    for i, (name, start) in enumerate(zip(args.workloads, args.start_batches)):
        # An equal share of what is left (the augmentation's seconds aside) for each workload
        # still to run: a long search on the first cannot starve the others.
        left = deadline - AUGMENTATION_RESERVE_S - time.monotonic()
        attempt = benchmark_attempt(
            name, steps=args.steps, dtype=args.dtype, overrides=overrides,
            deadline=time.monotonic() + left / (len(args.workloads) - i))
        batch, result, attempts = largest_fitting_batch(attempt, start, args.min_batch)
        report["workloads"][name] = {"batch_size": batch, "attempts": attempts, "result": result}
        if result:
            print(f"[device_check] {name}: batch {batch}, {result['step_seconds']:.3f} s/step, "
                  f"{result['images_per_second']:.1f} img/s, MFU {100 * result['mfu']:.1f}% "
                  f"on {result['device']}", flush=True)
        else:
            print(f"[device_check] {name}: no batch ran ({attempts[-1]['outcome']})", flush=True)
    try:
        report["augmentation"] = augmentation_cost(report["workloads"], overrides=overrides,
                                                   steps=args.steps)
    except Exception as error:  # noqa: BLE001 (keep the benchmarks' figures whatever happens)
        report["augmentation"] = {"skipped": f"failed: {type(error).__name__}: {error}"}
    if "skipped" in report["augmentation"]:
        print(f"[device_check] augmentation: skipped, {report['augmentation']['skipped']}",
              flush=True)
    for name, cost in report["augmentation"].items():
        if name != "skipped":
            print(f"[device_check] augmentation of a {name} batch of {cost['batch_size']}: "
                  f"{1e3 * cost['seconds']:.1f} ms, {100 * cost['share_of_step']:.1f}% of its "
                  "step", flush=True)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[device_check] {report['total_seconds']:.0f} s in all; wrote {args.output}",
          flush=True)


if __name__ == "__main__":
    main()
