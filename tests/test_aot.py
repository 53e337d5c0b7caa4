"""`python -m bam_jax.tools.aot` compiles the real train step for a described TPU slice on this
CPU-only machine (libtpu describes the chips), and reports memory, FLOPs, a roofline and the
collectives; bad input is one error line.

Subprocesses: the command's absl flags (`--config`, `--output`) would clash with those of the
other entry points imported by the tests in this process.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 2-block ViT on digits (global and local crops): the real step, compiled in seconds.
TINY_VIT = '''
from configs import default

def get_config():
    config = default.get_config()
    config.batch_size = 32
    config.model.backbone = "vit"
    config.model.update(vit_variant="custom", width=32, depth=2, num_heads=2, patch_size=4)
    config.data.local_crops_number = 2
    config.model.projector.update(hidden_dim=64, out_dim=32, use_bn=False, last_bn=False)
    config.loss.top_k = 16
    config.knn.enabled = False
    return config
'''

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-tpu.txt): it describes the TPU")


def run_aot(subprocess_env, *args):
    return subprocess.run([sys.executable, "-m", "bam_jax.tools.aot", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "tiny_vit.py"
    path.write_text(TINY_VIT)
    return str(path)


@pytest.mark.slow
@needs_libtpu
def test_report_of_the_step_compiled_for_v5e_2x2(subprocess_env, tiny_config_path, tmp_path):
    output = tmp_path / "report.json"
    result = run_aot(subprocess_env, f"--config={tiny_config_path}", "--topology=v5e:2x2",
                     f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    printed, summary = result.stdout.rsplit("\n}\n", 1)
    report = json.loads(printed + "\n}")
    assert json.loads(output.read_text()) == report
    assert "v5e:2x2" in summary and "fits" in summary

    assert report["topology"] == "v5e:2x2" and report["chip"] == "v5e"
    assert report["num_chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1}
    assert report["per_chip_batch"] * report["num_chips"] == report["batch_size"] == 32
    assert report["hbm_capacity_bytes"] == 16 * 2**30
    assert report["hbm_bytes_per_chip"] == (report["argument_bytes"] + report["output_bytes"]
                                            - report["alias_bytes"] + report["temp_bytes"])
    assert report["hbm_bytes_per_chip"] > 0
    assert report["fits"] == (report["hbm_bytes_per_chip"] <= report["hbm_capacity_bytes"])
    # Forward and backward of 2 x 28² + 2 x 12² digits through a 32-wide ViT, 8 images per chip:
    # far outside 1e7..1e11 FLOPs, the count is broken.
    assert 1e7 < report["step_flops_per_chip"] < 1e11
    seconds = report["roofline_step_seconds"]
    compute = report["step_flops_per_chip"] / report["peak_bf16_flops_per_second"]
    memory = report["bytes_accessed_per_chip"] / report["hbm_bytes_per_second"]
    assert report["roofline_compute_seconds"] == pytest.approx(compute)
    assert report["roofline_memory_seconds"] == pytest.approx(memory)
    assert seconds == pytest.approx(max(compute, memory)) and seconds >= compute
    assert report["roofline_bound"] == ("compute" if compute >= memory else "memory")
    assert report["roofline_images_per_second"] == pytest.approx(32 / seconds)
    assert report["compile_seconds"] > 0
    # Data parallel over 4 chips: the gradients (and the loss's batch statistics) are reduced.
    reduced = report["collectives"]["all-reduce"]
    assert reduced["count"] > 0 and reduced["bytes"] > 0


@pytest.mark.slow
@needs_libtpu
def test_a_batch_that_does_not_split_over_the_chips_is_one_error_line(
        subprocess_env, tiny_config_path, error_line):
    result = run_aot(subprocess_env, f"--config={tiny_config_path}", "--topology=v5e:2x2",
                     "--config.batch_size=30")
    assert result.returncode == 2
    line = error_line(result.stderr, "bam_jax.tools.aot")
    assert "batch size 30" in line and "multiple of 4" in line


@pytest.mark.slow
def test_an_unknown_topology_is_one_error_line(subprocess_env, tiny_config_path, error_line):
    """Checked before libtpu is needed: the same line with or without it."""
    result = run_aot(subprocess_env, f"--config={tiny_config_path}", "--topology=v9:2x2")
    assert result.returncode == 2
    line = error_line(result.stderr, "bam_jax.tools.aot")
    assert "unknown TPU topology 'v9:2x2'" in line and "v5e:16x16" in line


# XLA:TPU's async collective fusion, as in the v5e-256 ViT-S program: one all-gather started
# once, then carried through continuation fusions that each repeat it with the same chain_id.
CHAINED_HLO = '''
  %all-gather.5 = bf16[4096,2,4096]{2,1,0} all-gather(%param_0.1), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}, backend_config={"async_collective_fusion_config":{"flag_start":"-1","flag_end":"-1"}}
  ROOT %custom-call.1 = (bf16[16,2,4096]{2,1,0}, bf16[4096,2,4096]{2,1,0}) custom-call(%all-gather.5), custom_call_target="AsyncCollectiveStart"
  %all-gather.7 = bf16[4096,2,4096]{2,1,0} all-gather(%param_0.2), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
  %all-gather.9 = bf16[4096,2,4096]{2,1,0} all-gather(%param_0.3), channel_id=1, dimensions={0}, frontend_attributes={chain_id="0"}, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
  %pmax.21 = f32[8192]{0} all-reduce(%gte.1), channel_id=1, to_apply=%max
  %psum.70 = f32[8192]{0} all-reduce(%fusion.6), channel_id=1, to_apply=%add
  %all-reduce.299 = bf16[4096,4096]{1,0} all-reduce(%fusion.5950), channel_id=301, to_apply=%add
'''


def test_an_async_collective_fusion_chain_counts_once(subprocess_env, tmp_path):
    """Subprocess: importing the command defines its absl flags (see the module docstring)."""
    hlo = tmp_path / "program.hlo.txt"
    hlo.write_text(CHAINED_HLO)
    result = subprocess.run(
        [sys.executable, "-c", "import json, sys; from bam_jax.tools import aot; "
         "print(json.dumps(aot.collectives(open(sys.argv[1]).read())))", str(hlo)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found["all-gather"] == {"count": 1, "bytes": 4096 * 2 * 4096 * 2}
    assert found["all-reduce"] == {"count": 3, "bytes": 2 * 8192 * 4 + 4096 * 4096 * 2}
