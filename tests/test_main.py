"""`python -m bam_jax.main` runs the embedded default end to end (a few steps) and reports kNN."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_runs_the_default_config(tmp_path):
    workdir = tmp_path / "default"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "bam_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}", "--config.num_train_steps=2", "--config.knn.eval_at_start=False"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled train step per device" in result.stdout
    assert "done: step 2" in result.stdout and "knn_top1" in result.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in rows} == {2}  # logged at the last step (log_every_steps=5)
    assert any("knn_top1" in row for row in rows)
    assert (workdir / "config.json").exists()
    assert (workdir / "checkpoints" / "2").is_dir()
