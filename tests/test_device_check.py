"""launch/device_check.sh: the batch search, and the whole check end to end on CPU (--tiny)."""

import json
import os
import subprocess
import sys

import pytest

from bam_jax.tools import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_search_halves_after_out_of_memory_only():
    tried = []

    def attempt(batch):
        tried.append(batch)
        return ("ok", {"batch": batch}) if batch <= 48 else ("oom", None)

    batch, result, attempts = device_check.largest_fitting_batch(attempt, 256, 8)
    assert (batch, result, tried) == (32, {"batch": 32}, [256, 128, 64, 32])
    assert [a["outcome"] for a in attempts] == ["oom", "oom", "oom", "ok"]

    # Another failure ends the search; nothing below the minimum is tried.
    failed = device_check.largest_fitting_batch(lambda b: ("failed (exit 1)", None), 64, 8)
    assert failed[0] is None and len(failed[2]) == 1
    assert device_check.largest_fitting_batch(attempt, 100, 64) == (None, None, [
        {"batch_size": 100, "outcome": "oom", "seconds": 0.0}])
    assert device_check.is_out_of_memory("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 12.5GiB")
    assert not device_check.is_out_of_memory("ValueError: bad config")


@pytest.mark.slow
@pytest.mark.xla_optimized  # speed measurements: the optimized programs
def test_tiny_device_check_writes_one_json(tmp_path):
    output = tmp_path / "check.json"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [os.path.join(ROOT, "launch", "device_check.sh"), f"--output={output}", "--tiny",
         f"--python={sys.executable}", "--", "--steps=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(output.read_text())
    assert r["tiny"] and r["dtype"] == "bfloat16" and 0 < r["total_seconds"] < r["budget_s"]
    assert set(r["workloads"]) == {"vit_s16", "vit_b16"}
    for name, entry in r["workloads"].items():
        assert entry["batch_size"] == 16, (name, entry["attempts"])
        assert entry["attempts"][-1]["outcome"] == "ok"
        bench = entry["result"]
        assert bench["backend"] == "cpu" and bench["dtype"] == "bfloat16"
        assert bench["batch_size"] == 16 and bench["step_seconds"] > 0 and bench["mfu"] > 0
    augmentation = r["augmentation"]
    assert "skipped" not in augmentation, augmentation
    for name in ("vit_s16", "vit_b16"):
        assert augmentation[name]["batch_size"] == 16
        assert augmentation[name]["seconds"] > 0 and augmentation[name]["share_of_step"] > 0
