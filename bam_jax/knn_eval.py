"""Stand-alone kNN of a pretraining workdir: `python -m bam_jax.knn_eval --workdir=DIR`.

The newest readable checkpoint of DIR (student, and teacher when the run has one) is restored onto
this machine's mesh and evaluated with the trainer's own `evaluate.KnnEvaluator`, so the numbers
are those the online evaluation would give. Options override the run's config.json:

    python -m bam_jax.knn_eval --workdir=DIR --config.knn.k=200 --config.knn.temperature=0.1
    python -m bam_jax.knn_eval --workdir=DIR --random_init   # the same backbone at init

Results are printed and appended to DIR/metrics.jsonl under `offline_*` keys (the online kNN of
training writes `knn_*`), at the checkpoint's step.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402

from bam_jax import cli  # noqa: E402
from bam_jax import evaluate  # noqa: E402
from bam_jax import train  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The kNN evaluation.
# ---------------------------------------------------------------------------------------------
def overrides_config() -> ml_collections.ConfigDict:
    """The fields `--config.*` may override; None keeps the value of the run's config.json."""

    def keep(field_type):
        return ml_collections.FieldReference(None, field_type=field_type)

    return ml_collections.ConfigDict(dict(
        knn=dict(k=keep(int), temperature=keep(float), train_fraction=keep(float),
                 batch_size=keep(int)),
        mesh=dict(num_devices=keep(int), fsdp=keep(int)),
        # backbone="pixels" with --random_init: the raw-pixel baseline on the run's data.
        model=dict(backbone=keep(str)),
        data=dict(data_dir=keep(str), folder=keep(str), eval_train_split=keep(str),
                  eval_split=keep(str)),
    ))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for group, fields in overrides.items():
        for name, value in fields.items():
            if value is not None:
                config[group][name] = value
    return config


def knn_eval(workdir: str, overrides: ml_collections.ConfigDict | None = None, *,
             random_init: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 of the student (and teacher) of `workdir`; also appended to metrics.jsonl.

    Returns the logged row: `offline_knn_top1`, ..., `offline_teacher_knn_top1`, ... (with
    `offline_init_` instead of `offline_` for `random_init`), `offline_knn_k` and `step`.
    """
    config = train.read_run_config(workdir)
    if overrides is not None:
        config = apply_overrides(config, overrides)
    mesh = train.make_mesh(config)
    graphdef, state, step = train.restore_run(
        config, workdir, mesh, fsdp_min_size=config.mesh.fsdp_min_size,
        random_init=random_init, random_init_flag="--random_init")
    evaluator = evaluate.KnnEvaluator(config, graphdef, mesh, train.BATCH_AXES)
    prefix = "offline_init_" if random_init else "offline_"
    results = {prefix + k: v for k, v in evaluator.evaluate(state).items()}
    results[prefix + "knn_k"] = config.knn.k
    logger = train.MetricsLogger(workdir, total_steps=step, global_batch=config.knn.batch_size)
    logger.write(step, results)
    logger.close()
    print(f"kNN (k={config.knn.k}, T={config.knn.temperature}) of {workdir} at step {step}"
          + (" (random init)" if random_init else "") + ": "
          + "  ".join(f"{k} {v:.2f}" for k, v in results.items() if not k.endswith("_k")),
          flush=True)
    return dict(results, step=step)


def _main(argv, config_flag, workdir_flag, random_init_flag):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        knn_eval(workdir_flag.value, config_flag.value, random_init=random_init_flag.value)
    except (ValueError, OSError) as error:
        print(cli.error_line("bam_jax.knn_eval", error), file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _config = config_flags.DEFINE_config_dict(
        "config", overrides_config(), "Overrides of the run's config.json, e.g. --config.knn.k=200")
    _workdir = flags.DEFINE_string("workdir", None, "A pretraining workdir (python -m "
                                   "bam_jax.main --workdir).", required=True)
    _random_init = flags.DEFINE_bool("random_init", False, "Evaluate the same backbone at its "
                                     "initialisation instead of the newest checkpoint.")
    app.run(lambda argv: _main(argv, _config, _workdir, _random_init),
            flags_parser=cli.flags_parser("bam_jax.knn_eval"))
