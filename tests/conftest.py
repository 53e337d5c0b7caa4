"""Test setup and the fixtures several test files share.

Before jax is imported anywhere: 8 simulated CPU devices; XLA's optimizations off (most tests
compile far more than they run; tests marked `xla_optimized` compile optimized programs); a
persistent compilation cache in a temporary directory of this session, which the subprocesses
the tests start inherit (they compile the same programs as the in-process runs).

Markers: `slow` — the test starts `python` subprocesses; `xla_optimized` — the test compares
numerics against a PyTorch/NumPy reference with tight tolerances, or measures speed.
"""
import atexit
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="bam_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts python subprocesses (still run by default)")
    config.addinivalue_line(
        "markers", "xla_optimized: compiles with XLA's optimizations (numerics against a "
                   "reference with tight tolerances, or speed)")


_OPTIMIZATIONS_OFF = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("", "0", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked `xla_optimized` compile, and run, optimized programs, subprocesses too.

    Switched here, before the test's fixtures are set up (a module-scoped fixture of a marked
    test computes optimized too when a marked test is the first to use it).
    """
    if not _OPTIMIZATIONS_OFF:
        return
    optimized = item.get_closest_marker("xla_optimized") is not None
    if optimized:
        os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    else:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    if "jax" not in sys.modules and not optimized:
        return  # jax, when imported, reads the variable
    import jax  # noqa: PLC0415

    if jax.config.read("jax_disable_most_optimizations") == optimized:
        # The option is not part of jit's in-memory cache key: drop what was compiled under the
        # other setting (switched only between a run of marked tests and one of unmarked ones).
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", not optimized)


# ---------------------------------------------------------------------------------------------
# Helpers (plain functions, handed out by fixtures).


def _tiny_config(*, backbone="vit", teacher=True, steps=4, num_devices=0):
    """The default recipe shrunk to seconds: a 2-block ViT (or small ConvNet), 32 images a step."""
    from configs import default as default_config  # noqa: PLC0415

    config = default_config.get_config()
    config.batch_size = 32
    config.num_train_steps = steps
    config.model.backbone = backbone
    config.model.update(vit_variant="custom", width=32, depth=2, num_heads=2, patch_size=4)
    config.model.convnet.channels = (8, 16)
    config.model.convnet.strides = (2, 2)
    config.data.local_crops_number = 2  # exercise the multi-resolution path
    # The official head, without BatchNorm: a BatchNorm makes whatever feeds it a batch-constant
    # shift (biases, the last LayerNorm's offset) have a zero true gradient, and Adam turns that
    # gradient's float noise, which differs with the device count, into updates.
    config.model.projector.update(hidden_dim=64, out_dim=32, use_bn=False, last_bn=False)
    config.teacher.enabled = teacher
    config.loss.top_k = 16
    config.knn.enabled = False
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
    config.mesh.num_devices = num_devices
    return config


# The same tiny ConvNet as a config file for `bam_jax.main` (in-process or a subprocess).
TINY_CONFIG_FILE = '''
from configs import default

def get_config():
    config = default.get_config()
    config.batch_size = 32
    config.num_train_steps = 8
    config.model.backbone = "convnet"
    config.model.convnet.channels = (8, 16)
    config.model.convnet.strides = (2, 2)
    config.data.local_crops_number = 0  # two global crops: the cheapest step
    # As the tiny_config fixture (whose model the restore tests rebuild): the official head.
    config.model.projector.update(hidden_dim=64, out_dim=32, use_bn=False, last_bn=False)
    config.teacher.enabled = False
    config.loss.top_k = 16
    config.knn.enabled = False
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = True
    return config
'''


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f) if "loss" in row}


def _read_state(workdir, step):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def _checkpoint_steps(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def _assert_trees_close(a, b, **tolerance):
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   **tolerance)


def _resume_from(source_workdir, target_workdir, step):
    """A copy of a finished run's workdir that stops at `step`, as if killed right after it."""
    shutil.copytree(source_workdir, target_workdir)
    checkpoints = os.path.join(target_workdir, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    metrics = _read_metrics(source_workdir)
    with open(os.path.join(target_workdir, "metrics.jsonl"), "w") as f:
        for s in sorted(metrics):
            if s <= step:
                f.write(json.dumps(metrics[s]) + "\n")


def _damage_checkpoint(step_dir):
    """Truncate the data file of the step's arrays (a torn write)."""
    data = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _error_line(err, program="bam_jax"):
    """The one non-empty line of `err`, which must be `PROGRAM: error: ...`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), err
    return lines[0]


def _run_main(capsys, config_file, workdir, *overrides):
    """(exit code, stdout, stderr) of `python -m bam_jax.main` run in this process.

    Flags are parsed by `cli.flags_parser`, as `app.run` does.
    """
    from absl import flags  # noqa: PLC0415

    from bam_jax import cli  # noqa: PLC0415
    from bam_jax import main as bam_main  # noqa: PLC0415

    argv = ["bam_jax", f"--config={config_file}", f"--workdir={workdir}", *overrides]
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the previous call's override flags
    # ml_collections loads every file as module `config_config`, into the previous file's
    # namespace when that module is still there: a file without get_config() would inherit one.
    sys.modules.pop("config_config", None)
    saved_argv, sys.argv = sys.argv, argv  # ml_collections reads --config.x from sys.argv
    capsys.readouterr()
    code = 0
    try:
        cli.flags_parser("bam_jax")(argv)
        bam_main.main([])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved_argv
        flags.FLAGS.unparse_flags()
    out, err = capsys.readouterr()
    return code, out, err


class _Captured:
    """capsys's readouterr() without capsys (any fixture scope): what was printed meanwhile."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self):
        out, err = self.out.getvalue(), self.err.getvalue()
        for stream in (self.out, self.err):
            stream.seek(0)
            stream.truncate()
        return out, err


def _main_in_process(config_file, workdir, *overrides):
    """As `_run_main`, sys.stdout and sys.stderr redirected instead of capsys."""
    captured = _Captured()
    with contextlib.redirect_stdout(captured.out), contextlib.redirect_stderr(captured.err):
        return _run_main(captured, config_file, workdir, *overrides)


def _subprocess_env(**extra):
    """The environment of a `python` subprocess of the tests: the repository importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(backbone="vit", teacher=True, steps=4, num_devices=0): a fresh ConfigDict."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory):
    """The tiny ConvNet (8 steps of 32 digits, checkpoints every 2, async) as a config file."""
    path = tmp_path_factory.mktemp("config") / "tiny.py"
    path.write_text(TINY_CONFIG_FILE)
    return str(path)


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(workdir): {step: metrics.jsonl row} of the rows with a loss."""
    return _read_metrics


@pytest.fixture(scope="session")
def read_state():
    """read_state(workdir, step): the checkpoint's state as a plain tree of arrays."""
    return _read_state


@pytest.fixture(scope="session")
def checkpoint_steps():
    """checkpoint_steps(workdir): the sorted committed checkpoint steps."""
    return _checkpoint_steps


@pytest.fixture(scope="session")
def assert_trees_close():
    """assert_trees_close(a, b, rtol=, atol=): same structure, leaves close."""
    return _assert_trees_close


@pytest.fixture(scope="session")
def resume_from():
    """resume_from(source, target, step): a copy of a workdir cut back to `step`."""
    return _resume_from


@pytest.fixture(scope="session")
def damage_checkpoint():
    """damage_checkpoint(step_dir): truncate its array data (a torn write)."""
    return _damage_checkpoint


@pytest.fixture(scope="session")
def error_line():
    """error_line(err, program="bam_jax"): the one `PROGRAM: error: ...` line of stderr."""
    return _error_line


@pytest.fixture
def run_main(capsys):
    """run_main(config_file, workdir, *overrides) -> (code, stdout, stderr), in this process."""
    return lambda config_file, workdir, *overrides: _run_main(capsys, config_file, workdir,
                                                              *overrides)


@pytest.fixture(scope="session")
def main_in_process():
    """main_in_process(config_file, workdir, *overrides) -> (code, stdout, stderr), any scope."""
    return _main_in_process


@pytest.fixture(scope="session")
def subprocess_env():
    """subprocess_env(**extra): os.environ for a `python` subprocess, the repository importable."""
    return _subprocess_env


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A 2-step tiny ViT pretraining (EMA teacher on), run once per session; read it only."""
    from bam_jax import train  # noqa: PLC0415

    workdir = str(tmp_path_factory.mktemp("pretrained"))
    config = _tiny_config(steps=2)
    config.knn.batch_size = 1000  # eval sets of 4,000 / 1,000 in a few batches
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture
def pretrained_copy(pretrained, tmp_path):
    """A copy of `pretrained` the test may write to."""
    workdir = str(tmp_path / "pretrained")
    shutil.copytree(pretrained, workdir)
    return workdir


@pytest.fixture
def config_only_workdir(pretrained, tmp_path):
    """A workdir whose run wrote its config.json (that of `pretrained`) but no checkpoint yet."""
    workdir = tmp_path / "no_checkpoint"
    workdir.mkdir()
    shutil.copy(os.path.join(pretrained, "config.json"), workdir / "config.json")
    return str(workdir)
