"""Compile the pretraining step for a TPU slice that is only described: `python -m
bam_jax.tools.aot --config=configs/vit_b.py --topology=v5e:16x16 [--output=report.json]`.

libtpu (`pip install -r requirements-tpu.txt`) describes the slice's chips; no TPU is needed.
The trainer's own step, state layout and shardings are lowered on shapes alone and compiled by
XLA:TPU, so a config that does not fit, or does not shard, fails here rather than on the pod.
The report (printed, and written as JSON with `--output`) has the compiler's per-chip memory
and FLOPs, a roofline bound on the step time from the chip's published peaks, and the
collectives in the compiled program. Estimates, not measurements: see docs/aot.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

from absl import app, flags
from ml_collections import config_flags

from bam_jax import cli

PROGRAM = "bam_jax.tools.aot"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a pretraining config file with get_config(); override fields with "
    "--config.field=value.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "The TPU slice, GENERATION:AxB[xC] in chips, e.g. v5e:16x16 (v5e-256), "
    "v4:2x2x4 (v4-32), v5p:4x4x4, v6e:8x8.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the report as JSON here.")
flags.mark_flags_as_required(["config", "topology"])


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: int
    hbm_bytes_per_second: float
    chip_config: str  # libtpu's: "megacore" makes v4's two TensorCores one device, as on a v4 VM


# Published per-chip figures (Google Cloud TPU system architecture pages):
#   v4   275 TFLOP/s bf16, 32 GiB HBM2,   1200 GB/s  https://cloud.google.com/tpu/docs/v4
#   v5e  197 TFLOP/s bf16, 16 GiB HBM2,    819 GB/s  https://cloud.google.com/tpu/docs/v5e
#   v5p  459 TFLOP/s bf16, 95 GiB HBM2e,  2765 GB/s  https://cloud.google.com/tpu/docs/v5p
#   v6e  918 TFLOP/s bf16, 32 GiB HBM,    1640 GB/s  https://cloud.google.com/tpu/docs/v6e
GiB = 2**30
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, "megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, "default"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, "default"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, "default"),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# One HLO instruction whose op is a collective: `%name = SHAPE op(` or its async `op-done(` (the
# `-start` half is skipped: its shape bundles operands with the result).
_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-done)?\(")
# XLA:TPU's async collective fusion splits one asynchronous collective into a start and
# continuation fusions that carry the transfer alongside other work; each fusion holds the op
# again, tagged with the chain's `chain_id` frontend attribute. One chain is one collective.
_CHAIN = re.compile(r'chain_id="(?P<chain>[^"]*)"')
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}


def chip_of(topology: str) -> Chip:
    """The chip of a topology string, checked before libtpu is loaded."""
    generation = topology.split(":", 1)[0].lower()
    if ":" not in topology or generation not in CHIPS:
        raise ValueError(f"unknown TPU topology {topology!r}; use GENERATION:AxB[xC] in chips "
                         f"with GENERATION one of {', '.join(CHIPS)}, e.g. v5e:16x16 or v4:2x2x4")
    return CHIPS[generation]


def topology_devices(topology: str, chip: Chip) -> list:
    """The slice's devices as libtpu describes them (compile-only: nothing runs on them)."""
    import jax  # noqa: PLC0415
    from jax.experimental import topologies  # noqa: PLC0415

    # libtpu otherwise reads a TPU VM's metadata and logs errors for each value it misses.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", {"v4": "v4-8", "v5e": "v5litepod-4",
                                                   "v5p": "v5p-8", "v6e": "v6e-4"}[chip.name])
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No chip to guard: several compiles (a sweep, the tests) may hold libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=chip.chip_config).devices
    except jax.errors.JaxRuntimeError as error:
        raise ValueError(f"--topology={topology}: {cli.first_line(error)}") from None
    except RuntimeError as error:  # jax: "JAX TPU support not installed"
        raise ValueError(f"libtpu is not installed, so no TPU can be described "
                         f"({cli.first_line(error)}); install it with "
                         f"`pip install -r requirements-tpu.txt`") from None
    return list(devices)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the compiled program: each collective's result bytes on one
    chip. Ops in a loop body (the Sinkhorn iterations) count once, not once per iteration; an
    async collective fusion chain (one collective spread over several fusions) counts once."""
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    chains = set()
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if match is None:
            continue
        chain = _CHAIN.search(line)
        if chain is not None:
            if (match["op"], chain["chain"]) in chains:
                continue
            chains.add((match["op"], chain["chain"]))
        entry = found[match["op"]]
        entry["count"] += 1
        for array in _ARRAY.finditer(match["shape"]):
            size = _DTYPE_BYTES.get(array["dtype"], 1)
            for dim in filter(None, array["dims"].split(",")):
                size *= int(dim)
            entry["bytes"] += size
    return found


def image_channels(config) -> int:
    """The pipeline's channels without opening the dataset (which need not be reachable here):
    the bundled digits are gray, tfds ImageNet and image folders RGB."""
    return 1 if config.data.source == "mnist_bundled" else 3


def compile_report(config, topology: str) -> dict:
    """The report of the train step of `config` compiled for `topology`."""
    from bam_jax import config_checks, sharding, train  # noqa: PLC0415

    config_checks.check_pretrain_config(config)
    chip = chip_of(topology)
    devices = topology_devices(topology, chip)
    mesh = sharding.make_mesh(config, devices)
    hosts = len({device.process_index for device in devices})
    sharding.check_global_batch(config.batch_size, mesh, process_count=hosts)
    start = time.perf_counter()
    compiled = train.compile_from_shapes(config, mesh,
                                         num_channels=image_channels(config)).compiled
    compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    hbm = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    compute_seconds = flops / chip.peak_bf16_flops
    memory_seconds = bytes_accessed / chip.hbm_bytes_per_second
    roofline = max(compute_seconds, memory_seconds)
    return {
        "model": f"vit-{config.model.vit_variant}" if config.model.backbone == "vit"
        else config.model.backbone,
        "topology": topology, "chip": chip.name, "num_chips": len(devices), "num_hosts": hosts,
        "mesh": dict(mesh.shape), "batch_size": config.batch_size,
        "per_chip_batch": config.batch_size // sharding.data_devices(mesh),
        "dtype": config.model.dtype, "remat": _remat(config.model),
        "compile_seconds": compile_seconds,
        "hbm_bytes_per_chip": hbm,
        "hbm_capacity_bytes": chip.hbm_bytes,
        "fits": hbm <= chip.hbm_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "step_flops_per_chip": flops,
        "bytes_accessed_per_chip": bytes_accessed,
        "peak_bf16_flops_per_second": chip.peak_bf16_flops,
        "hbm_bytes_per_second": chip.hbm_bytes_per_second,
        "roofline_compute_seconds": compute_seconds,
        "roofline_memory_seconds": memory_seconds,
        "roofline_bound": "compute" if compute_seconds >= memory_seconds else "memory",
        "roofline_step_seconds": roofline,
        "roofline_images_per_second": config.batch_size / roofline if roofline else None,
        "collectives": collectives(compiled.as_text()),
    }


def _remat(model) -> bool:
    """Whether the backbone recomputes its activations in the backward: `model.remat` for a ViT,
    `model.caformer.remat_every` > 0 (blocks checkpointed in groups) for a CAFormer."""
    if model.backbone == "caformer":
        return model.caformer.get("remat_every", 0) > 0
    return bool(model.get("remat", False))


def summary_line(report: dict) -> str:
    gib = 1 / GiB
    ops = ", ".join(f"{op} x{c['count']} ({c['bytes'] * gib:.2f} GiB)"
                    for op, c in report["collectives"].items() if c["count"]) or "none"
    return (f"{report['model']} on {report['topology']} ({report['num_chips']} x "
            f"{report['chip']}, {report['per_chip_batch']} images/chip): "
            f"{report['hbm_bytes_per_chip'] * gib:.2f} of {report['hbm_capacity_bytes'] * gib:.0f}"
            f" GiB HBM per chip ({'fits' if report['fits'] else 'DOES NOT FIT'}), "
            f"{report['step_flops_per_chip'] / 1e12:.2f} TFLOP/chip/step, roofline "
            f"{report['roofline_step_seconds'] * 1e3:.1f} ms/step = "
            f"{report['roofline_images_per_second']:.0f} img/s ({report['roofline_bound']}-bound);"
            f" collectives: {ops}; compiled in {report['compile_seconds']:.0f} s")


def main(argv):
    del argv
    import jax  # noqa: PLC0415

    if not os.environ.get("JAX_PLATFORMS"):
        # The slice compiles through libtpu's own client; the host only needs a CPU backend, and
        # looking for a local TPU first costs time and stderr noise on a machine without one.
        jax.config.update("jax_platforms", "cpu")
    report = cli.run_or_exit(PROGRAM, compile_report, _CONFIG.value, _TOPOLOGY.value)
    print(json.dumps(report, indent=2))
    print(summary_line(report), flush=True)
    if _OUTPUT.value:
        cli.run_or_exit(PROGRAM, _write_json, _OUTPUT.value, report)


def _write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
