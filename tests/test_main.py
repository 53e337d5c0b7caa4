"""`python -m bam_jax.main`: the embedded default end to end (a few steps, kNN reported), and
bad config values and config files refused in one line before anything is created."""

import json
import os
import subprocess
import sys

import pytest

from bam_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Bad input refused before any work: in-process runs (flags parsed by cli.flags_parser, as
# app.run does: conftest's run_main), the trainer replaced by a stub that fails the test if it is
# ever reached.

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")


@pytest.fixture
def no_training(monkeypatch):
    def reached(*args):
        raise AssertionError("the run reached the trainer")

    monkeypatch.setattr(train, "train_and_evaluate", reached)


BAD_FIELDS = [
    ("log_every_steps", "0"), ("checkpoint_every_steps", "0"), ("data.global_crop_size", "0"),
    ("batch_size", "-8"), ("data.color_jitter_prob", "1.5"), ("loss.temperature", "0"),
    ("optimizer.name", "adam"), ("loss.top_k", "-1"), ("loss.num_target_crops", "3")]


@pytest.mark.parametrize("field,value", BAD_FIELDS + [("ccrop.alpha", "0")],
                         ids=[f"{f}={v}" for f, v in BAD_FIELDS + [("ccrop.alpha", "0")]])
def test_bad_config_value_is_one_line_before_the_workdir_exists(tmp_path, run_main, error_line,
                                                                 no_training, field, value):
    workdir = tmp_path / "w"
    switch = ["--config.ccrop.enabled=True"] if field.startswith("ccrop.") else []
    code, _, err = run_main(DEFAULT_CONFIG, workdir, *switch, f"--config.{field}={value}")
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"bam_jax: error: config.{field}="), line
    assert "must be" in line and f"; set --config.{field}=" in line
    assert not workdir.exists()


CONFIG_FILES = {
    # name: (file text or None for no file, what the one line says after the path)
    "missing.py": (None, ": No such file or directory"),
    "syntax.py": ("from configs import default\n\ndef get_config(:\n    return None\n",
                  ": line 3: invalid syntax"),
    "no_get_config.py": ("from configs import default\n\nCONFIG = default.get_config()\n",
                         ": defines no get_config()"),
}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_bad_config_file_is_one_line_naming_it(tmp_path, run_main, error_line, no_training, name):
    text, problem = CONFIG_FILES[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    workdir = tmp_path / "w"
    # With an override too: ml_collections then fails on the missing file while parsing it.
    for overrides in ([], ["--config.batch_size=64"]):
        code, _, err = run_main(str(path), workdir, *overrides)
        assert code == 2
        assert error_line(err) == f"bam_jax: error: config file {path}{problem}"
        assert sorted(os.listdir(tmp_path)) == ([name] if text is not None else [])


def test_error_while_running_a_config_file_names_its_line(tmp_path, run_main, error_line,
                                                          no_training):
    path = tmp_path / "raises.py"
    path.write_text("def get_config():\n    return {}['nope']\n")
    code, _, err = run_main(str(path), tmp_path / "w")
    assert code == 2
    assert error_line(err) == f"bam_jax: error: config file {path}: line 2: KeyError: 'nope'"


@pytest.mark.slow
@pytest.mark.parametrize("module,program", [("bam_jax.main", "bam_jax"),
                                            ("bam_jax.evals.linear_probe", "bam_jax.evals.linear_probe"),
                                            ("bam_jax.evals.finetune", "bam_jax.evals.finetune")])
def test_entry_points_name_a_bad_config_file_in_a_real_process(tmp_path, module, program):
    path = tmp_path / "syntax.py"
    path.write_text("def get_config():\n    return dict(a=1\n")
    workdir = tmp_path / "w"
    result = subprocess.run(
        [sys.executable, "-m", module, f"--config={path}", f"--workdir={workdir}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"{program}: error: config file {path}: line 2: '(' was never closed"], result.stderr
    assert not workdir.exists()
