"""The trainer: device-count invariance, exact resume, restore on fewer devices, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bam_jax import train
from configs import default as default_config


def tiny_config(*, backbone="vit", teacher=True, steps=4, num_devices=0):
    """The default recipe shrunk to seconds: a 2-block ViT (or small ConvNet), 32 images a step."""
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


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f) if "loss" in row}


def read_state(workdir, step):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def assert_trees_close(a, b, **tolerance):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   **tolerance)


def resume_from(source_workdir, target_workdir, step):
    """A copy of a finished run's workdir that stops at `step`, as if killed right after it."""
    shutil.copytree(source_workdir, target_workdir)
    checkpoints = os.path.join(target_workdir, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    metrics = read_metrics(source_workdir)
    with open(os.path.join(target_workdir, "metrics.jsonl"), "w") as f:
        for s in sorted(metrics):
            if s <= step:
                f.write(json.dumps(metrics[s]) + "\n")


@pytest.fixture(scope="module")
def vit_run_8(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vit8"))
    result = train.train_and_evaluate(tiny_config(), workdir)
    return workdir, result


def test_schedules_match_the_official_cosine_scheduler():
    # utils.cosine_scheduler(1.0, 0.1, epochs=2, niter_per_ep=5, warmup_epochs=1)
    warmup = np.linspace(0, 1.0, 5)
    iters = np.arange(5) / 5
    expected = np.concatenate([warmup, 0.1 + 0.5 * 0.9 * (1 + np.cos(np.pi * iters))])
    schedule = train.cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=5)
    np.testing.assert_allclose([schedule(s) for s in range(10)], expected, rtol=1e-6, atol=1e-7)
    eps = train.linear_then_constant(0.1, 0.05, ramp_steps=3)
    np.testing.assert_allclose([eps(s) for s in range(5)], [0.1, 0.075, 0.05, 0.05, 0.05],
                               rtol=1e-6)


def test_eight_devices_equal_one(vit_run_8, tmp_path):
    workdir_8, result_8 = vit_run_8
    workdir_1 = str(tmp_path / "vit1")
    result_1 = train.train_and_evaluate(tiny_config(num_devices=1), workdir_1)
    assert result_8["step"] == result_1["step"] == 4
    metrics_8, metrics_1 = read_metrics(workdir_8), read_metrics(workdir_1)
    for step in range(1, 5):
        np.testing.assert_allclose(metrics_8[step]["loss"], metrics_1[step]["loss"], rtol=1e-4)
    assert_trees_close(read_state(workdir_8, 4)["params"], read_state(workdir_1, 4)["params"],
                       rtol=1e-3, atol=2e-5)


def test_loss_decreases_and_teacher_moves(vit_run_8):
    workdir, _ = vit_run_8
    metrics = read_metrics(workdir)
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    state = read_state(workdir, 4)
    assert state["teacher_params"] is not None
    differences = jax.tree.map(lambda a, b: np.abs(a - b).max(), state["params"],
                               state["teacher_params"])
    assert max(jax.tree.leaves(differences)) > 0  # the EMA lags the student
    assert 0.995 <= metrics[4]["teacher_momentum"] <= 1.0


def test_resume_continues_exactly(tmp_path):
    config = tiny_config(backbone="convnet", teacher=False)
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full)
    resumed = str(tmp_path / "resumed")
    resume_from(full, resumed, step=2)
    result = train.train_and_evaluate(config, resumed)
    assert result["step"] == 4
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(resumed)
    for step in (3, 4):
        assert resumed_metrics[step]["loss"] == full_metrics[step]["loss"]
    assert_trees_close(read_state(full, 4), read_state(resumed, 4), rtol=0, atol=0)


def test_checkpoint_of_eight_devices_restores_on_four(vit_run_8, tmp_path):
    workdir_8, _ = vit_run_8
    resumed = str(tmp_path / "on4")
    resume_from(workdir_8, resumed, step=2)
    train.train_and_evaluate(tiny_config(num_devices=4), resumed)
    assert_trees_close(read_state(workdir_8, 4)["params"], read_state(resumed, 4)["params"],
                       rtol=1e-3, atol=2e-5)


def test_incompatible_checkpoint_is_refused(vit_run_8, tmp_path):
    workdir_8, _ = vit_run_8
    other = str(tmp_path / "other")
    resume_from(workdir_8, other, step=2)
    config = tiny_config()
    config.model.width = 48
    with pytest.raises(ValueError, match="does not match the configured model"):
        train.train_and_evaluate(config, other)


def test_batch_not_divisible_by_devices_fails_clearly(tmp_path):
    config = tiny_config()
    config.batch_size = 36
    with pytest.raises(ValueError, match="batch"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))


def test_nonfinite_loss_stops_without_saving(tmp_path):
    config = tiny_config(backbone="convnet", teacher=False)
    config.optimizer.base_lr = float("nan")
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="skip_nonfinite_steps"):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "2"))


def _short_default_run(workdir, **loss_and_head):
    """The embedded default recipe for 12 steps; returns the metrics of the last step."""
    config = default_config.get_config()
    config.num_train_steps = 12
    config.knn.enabled = False
    config.log_every_steps = 12
    config.async_checkpointing = False
    config.model.projector.update(loss_and_head.pop("projector", {}))
    config.loss.update(loss_and_head)
    train.train_and_evaluate(config, workdir)
    return read_metrics(workdir)[12]


def test_default_recipe_does_not_collapse_where_the_official_head_drifts_to_it(tmp_path):
    learning = _short_default_run(str(tmp_path / "default"))
    assert learning["mean_similarity"] < 0.2
    assert learning["source_entropy"] < learning["uniform_entropy"] - 1.0
    assert learning["loss"] < learning["uniform_entropy"] - 1.0
    # The official head (no BatchNorm) and eps 0.05 on the same data drift towards the
    # collapsed point (all embeddings aligned, a flat softmax): the test can tell them apart.
    collapsing = _short_default_run(str(tmp_path / "official"), sinkhorn_reg=0.05,
                                    sinkhorn_reg_final=0.05, top_k=0,
                                    projector=dict(use_bn=False, last_bn=False))
    assert collapsing["mean_similarity"] > 0.6
    assert collapsing["source_entropy"] > learning["source_entropy"] + 1.0
