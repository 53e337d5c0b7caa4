"""Entry point: `python -m bam_jax.main --config=configs/vit_b.py --workdir=DIR`.

Config files are Python that this command runs: only use config files you trust.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from bam_jax import cli, config_checks
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(); override fields with "
    "--config.field=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard logs go; an existing run "
    "there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        # First: a bad value then costs no startup and leaves no empty workdir behind.
        config_checks.check_pretrain_config(_CONFIG.value)
    except (ValueError, OSError) as error:  # OSError: ml_collections' unreadable config
        _exit_with(error)
    import jax

    from bam_jax import checkpoint, train

    distributed = _distributed_kwargs()
    if distributed is not None:
        jax.distributed.initialize(**distributed)
    logging.getLogger("absl").setLevel(logging.WARNING)
    print(f"bam_jax: {jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); workdir {_WORKDIR.value}", flush=True)
    try:
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, checkpoint.IncompatibleCheckpointError, train.NonFiniteLossError,
            train.RunInterrupted, FileNotFoundError, PermissionError, OSError) as error:
        _exit_with(error)
    summary = {k: v for k, v in result.items() if k.startswith(("init_knn", "knn", "teacher_knn", "loss"))}
    print("done: step " + str(result["step"]) + "  " +
          "  ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items())), flush=True)


def _exit_with(error: BaseException) -> None:
    print(cli.error_line("bam_jax", error), file=sys.stderr, flush=True)
    sys.exit(2)


def _distributed_kwargs() -> dict[str, int] | None:
    """`jax.distributed.initialize` arguments under a multi-process launch, else None.

    - JAX_COORDINATOR_ADDRESS (launch/gpu_multinode.sh, or any launcher): JAX reads the address
      itself but not the process count and id, so they are passed from JAX_NUM_PROCESSES and
      JAX_PROCESS_ID.
    - An `srun` step with several tasks (SLURM_STEP_NODELIST is only set inside a step) and
      BAM_JAX_DISTRIBUTED=1 (launch/tpu_vm_train.sh on TPU pod slices): JAX detects the rest.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return {key: int(env[name]) for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                                                     ("process_id", "JAX_PROCESS_ID"))
                if env.get(name)}
    if env.get("SLURM_STEP_NODELIST") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}
    if env.get("BAM_JAX_DISTRIBUTED") == "1":
        return {}
    return None


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("bam_jax"))
