"""`python -m bam_jax.tools.benchmark` reports a sane step on CPU, without TensorFlow importable
(accelerator images have JAX but no TensorFlow); `--torch_reference` times the official PyTorch
step beside it."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the benchmark module with TensorFlow, tfds and clu made unimportable.
_WITHOUT_TENSORFLOW = """
import runpy, sys

class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
            raise ModuleNotFoundError(f"no module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, Unimportable())
sys.argv = ["bam_jax.tools.benchmark"] + sys.argv[1:]
runpy.run_module("bam_jax.tools.benchmark", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.xla_optimized  # a speed measurement: the optimized program
def test_benchmark_default_workload_without_tensorflow(tmp_path):
    output = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, "--workload=default", "--batch_size=16",
         "--steps=2", f"--output={output}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "s/step" in result.stdout and "of the measured matmul peak" in result.stdout
    r = json.loads(output.read_text())
    assert r["backend"] == "cpu" and r["num_devices"] == 2 and r["dtype"] == "float32"
    assert r["batch_size"] == 16 and r["step_seconds"] > 0
    # Measured, not made up: the warm-up and the 2 timed steps fit in the process's lifetime.
    assert 3 * r["step_seconds"] < elapsed
    assert r["images_per_second"] > 16 * 3 / elapsed
    # The default step (ConvNet on 2 views of 16 digits, forward + backward + EMA teacher) is
    # tens of MFLOP to a few GFLOP by XLA's count; far outside that, the count is broken.
    assert 1e7 < r["step_flops"] < 1e11
    assert 0 < r["mfu"] < 1.5
    assert 0 < r["loss_share_of_step"] < 1
    assert r["temp_bytes"] > 0


# A 2-block ViT on 32/16 px crops: the official step's shapes shrunk to well under a second.
TINY_VIT = ["--workload=vit_s16", "--batch_size=4", "--override=model.vit_variant=custom",
            "--override=model.width=32", "--override=model.depth=2", "--override=model.num_heads=2",
            "--override=data.global_crop_size=32", "--override=data.local_crop_size=16",
            "--override=data.local_crops_number=2", "--override=model.projector.hidden_dim=64",
            "--override=model.projector.out_dim=32"]


@pytest.mark.slow
@pytest.mark.xla_optimized  # a speed measurement: the optimized program
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (pip install -r requirements-dev.txt)")
def test_torch_reference_times_both_steps_in_alternating_rounds(tmp_path):
    output = tmp_path / "compare.json"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "bam_jax.tools.benchmark", *TINY_VIT, "--torch_reference",
         "--rounds=2", "--steps=1", f"--output={output}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed ratio official/bam_jax" in result.stdout
    r = json.loads(output.read_text())
    assert r["rounds"] == 2 and r["batch_size"] == 4 and r["dtype"] == "float32"
    for key in ("bam_jax_step_seconds_per_round", "official_step_seconds_per_round",
                "speed_ratio_per_round", "bam_jax_step_cpu_seconds_per_round",
                "official_step_cpu_seconds_per_round", "cpu_time_ratio_per_round"):
        assert len(r[key]) == 2 and all(x > 0 for x in r[key]), key
    assert r["speed_ratio_per_round"][0] == pytest.approx(
        r["official_step_seconds_per_round"][0] / r["bam_jax_step_seconds_per_round"][0])
    # The official step really ran the loss (a finite cross-entropy over 16 columns).
    (loss,) = r["official_warmup_losses"]
    assert 0 < loss < 10
    assert r["torch"] and r["torch_threads"] >= 1 and "avx512f" in r["cpu"]
