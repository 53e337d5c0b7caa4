"""`bam_jax.tools.benchmark_input`: the tf.data rate on generated JPEGs, and the torchvision side run in
a child process that never imports TensorFlow."""

import os
import subprocess
import sys

from bam_jax.tools import benchmark_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tf_rate_on_generated_jpegs(tmp_path):
    benchmark_input.write_jpegs(str(tmp_path), 8, "smooth")
    assert len(list(tmp_path.glob("train/class*/*.jpg"))) == 8
    rate, per_cpu = benchmark_input.benchmark_tf(
        str(tmp_path), threads=1, batch=4, num_batches=1, antialias=True)
    assert rate > 0 and per_cpu > 0


def test_module_imports_no_tensorflow():
    # torchvision crashes when imported after TensorFlow, so its child process must stay clean.
    code = "import sys, bam_jax.tools.benchmark_input; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_torchvision_side_runs_in_child(tmp_path):
    benchmark_input.write_jpegs(str(tmp_path), 4, "smooth")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        expected_none = True
    else:
        expected_none = False
    rate = benchmark_input._torchvision_in_child(str(tmp_path), 1, 2, 1)
    assert (rate is None) == expected_none
    assert expected_none or rate > 0
