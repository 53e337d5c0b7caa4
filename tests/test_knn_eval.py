"""Stand-alone kNN of a workdir, and the tiny pretraining the probe and picture tests share."""

import json
import os
import subprocess
import sys

import pytest

from bam_jax import train
from bam_jax.evals import knn as knn_eval
from test_train import tiny_config

_SHARED = {}


def shared_pretrained_workdir(tmp_path_factory):
    """A 2-step tiny ViT pretraining (EMA teacher on), run once per test session.

    A module-level cache rather than a fixture: the three test files import this one function, so
    the ~20 s pretraining happens once however many of them run.
    """
    if "workdir" not in _SHARED:
        workdir = str(tmp_path_factory.mktemp("pretrained"))
        config = tiny_config(steps=2)
        config.knn.batch_size = 1000  # eval sets of 4,000 / 1,000 in a few batches
        train.train_and_evaluate(config, workdir)
        _SHARED["workdir"] = workdir
    return _SHARED["workdir"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return shared_pretrained_workdir(tmp_path_factory)


def config_only_workdir(pretrained, tmp_path):
    """A workdir whose run wrote its config.json but no checkpoint yet."""
    workdir = tmp_path / "no_checkpoint"
    workdir.mkdir()
    (workdir / "config.json").write_text(open(os.path.join(pretrained, "config.json")).read())
    return str(workdir)


def test_knn_eval_restores_student_and_teacher_and_logs(pretrained, capsys):
    overrides = knn_eval.overrides_config()
    overrides.knn.k = 10
    result = knn_eval.knn_eval(pretrained, overrides)
    assert result["step"] == 2 and result["offline_knn_k"] == 10
    for key in ("offline_knn_top1", "offline_knn_top5", "offline_teacher_knn_top1"):
        assert 10.0 < result[key] <= 100.0  # above chance on 10 digits even after 2 steps
    assert "offline_knn_top1" in capsys.readouterr().out
    with open(os.path.join(pretrained, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 2 and rows[-1]["offline_knn_top1"] == result["offline_knn_top1"]


def test_no_checkpoint_is_one_clear_error_and_random_init_needs_none(pretrained, tmp_path):
    workdir = config_only_workdir(pretrained, tmp_path)
    with pytest.raises(ValueError, match="no checkpoint in .*--random_init"):
        knn_eval.knn_eval(workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    result = knn_eval.knn_eval(workdir, random_init=True)
    assert result["step"] == 0 and 0.0 < result["offline_init_knn_top1"] <= 100.0


def test_cli_prints_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "bam_jax.evals.knn", f"--workdir={tmp_path / 'empty'}"],
        capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), os.pardir),
        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "bam_jax.evals.knn: error:" in line]
    assert len(errors) == 1 and "config.json does not exist" in errors[0]
