"""The trainer: device-count invariance, learning, the optimizers against PyTorch, ContrastiveCrop in
the loop. Resume, another device count and bad input are in test_faults.py."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import sharding, train
from configs import default as default_config


@pytest.fixture(scope="module")
def vit_run_8(tmp_path_factory, tiny_config):
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


def test_eight_devices_equal_one(vit_run_8, tmp_path, tiny_config, read_metrics, read_state,
                                assert_trees_close):
    workdir_8, result_8 = vit_run_8
    workdir_1 = str(tmp_path / "vit1")
    result_1 = train.train_and_evaluate(tiny_config(num_devices=1), workdir_1)
    assert result_8["step"] == result_1["step"] == 4
    metrics_8, metrics_1 = read_metrics(workdir_8), read_metrics(workdir_1)
    for step in range(1, 5):
        np.testing.assert_allclose(metrics_8[step]["loss"], metrics_1[step]["loss"], rtol=1e-4)
    assert_trees_close(read_state(workdir_8, 4)["params"], read_state(workdir_1, 4)["params"],
                       rtol=1e-3, atol=2e-5)


def test_loss_decreases_and_teacher_moves(vit_run_8, read_metrics, read_state):
    workdir, _ = vit_run_8
    metrics = read_metrics(workdir)
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    state = read_state(workdir, 4)
    assert state["teacher_params"] is not None
    differences = jax.tree.map(lambda a, b: np.abs(a - b).max(), state["params"],
                               state["teacher_params"])
    assert max(jax.tree.leaves(differences)) > 0  # the EMA lags the student
    assert 0.995 <= metrics[4]["teacher_momentum"] <= 1.0


def _short_default_run(workdir, read_metrics, **loss_and_head):
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


def test_default_recipe_does_not_collapse_where_the_official_head_drifts_to_it(tmp_path,
                                                                              read_metrics):
    learning = _short_default_run(str(tmp_path / "default"), read_metrics)
    assert learning["mean_similarity"] < 0.2
    assert learning["source_entropy"] < learning["uniform_entropy"] - 1.0
    # Below the collapsed loss ln(#columns) (every local crop's row counts too, so by less than
    # the source entropy after 12 steps).
    assert learning["loss"] < learning["uniform_entropy"] - 0.5
    # The official head (no BatchNorm) and eps 0.05 on the same data drift towards the
    # collapsed point (all embeddings aligned, a flat softmax): the test can tell them apart.
    collapsing = _short_default_run(str(tmp_path / "official"), read_metrics, sinkhorn_reg=0.05,
                                    sinkhorn_reg_final=0.05, top_k=0,
                                    projector=dict(use_bn=False, last_bn=False))
    assert collapsing["mean_similarity"] > 0.6
    assert collapsing["source_entropy"] > learning["source_entropy"] + 1.0
    assert collapsing["loss"] > learning["loss"] + 0.5


# ---------------------------------------------------------------------------------------------
# The optimizers against PyTorch: torch.optim.AdamW / SGD and the official utils.LARS, with the
# official param groups (decay on >= 2-dim parameters only) and per-step lr and weight decay.

def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"kernel": (3, 4), "bias": (4,), "norm_scale": (4,), "cls_token": (1, 1, 4),
              "conv": (2, 2, 1, 3)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _optimizer_config(name, clip_grad=0.0):
    config = default_config.get_config()
    config.optimizer.update(name=name, clip_grad=clip_grad)
    return config


def _run_ours(name, params, grads, lrs, wds, clip_grad=0.0):
    optimizer = train.make_optimizer(_optimizer_config(name, clip_grad))
    params = jax.tree.map(jax.numpy.asarray, params)
    state = optimizer.init(params)
    for g, lr, wd in zip(grads, lrs, wds):
        state = train.set_hyperparams(state, lr, wd)
        updates, state = optimizer.update(jax.tree.map(jax.numpy.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


class _OfficialLARS:
    """utils.LARS of the official code (from Barlow Twins), on plain tensors."""

    def __init__(self, torch, groups, momentum=0.9, eta=0.001):
        self.torch, self.groups, self.momentum, self.eta, self.mu = torch, groups, momentum, eta, {}

    def step(self):
        torch = self.torch
        for g in self.groups:
            for p in g["params"]:
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0., torch.where(
                        update_norm > 0, self.eta * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                mu = self.mu.setdefault(id(p), torch.zeros_like(p))
                mu.mul_(self.momentum).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def _run_torch(name, params, grads, lrs, wds, clip_grad=0.0):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    # get_params_groups: biases and 1-dim parameters are not regularized.
    groups = [{"params": [t for t in tensors.values() if t.ndim > 1]},
              {"params": [t for t in tensors.values() if t.ndim <= 1], "weight_decay": 0.0}]
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups)
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    else:
        optimizer = _OfficialLARS(torch, groups)
    opt_groups = optimizer.param_groups if name != "lars" else optimizer.groups
    for g, lr, wd in zip(grads, lrs, wds):
        for i, group in enumerate(opt_groups):  # utils.update_lr_and_wd
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip_grad)
        with torch.no_grad():
            optimizer.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.xla_optimized
@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizer_steps_equal_the_official_ones(name):
    params = _params()
    rng = np.random.default_rng(1)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    lrs, wds = [0.1, 0.05, 0.2], [0.04, 0.3, 0.5]  # changing, as the schedules do
    ours = _run_ours(name, params, grads, lrs, wds, clip_grad=0.5)
    reference = _run_torch(name, params, grads, lrs, wds, clip_grad=0.5)
    for k in params:
        np.testing.assert_allclose(ours[k], reference[k], rtol=2e-5, atol=5e-6, err_msg=k)
    # Without the decay the reference moves the matrices elsewhere: the comparison sees it.
    undecayed = _run_torch(name, params, grads, lrs, [0.0] * 3, clip_grad=0.5)
    assert np.abs(undecayed["kernel"] - reference["kernel"]).max() > 20 * 5e-6


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_zero_gradient_update_decays_exactly_the_matrices(name):
    params = _params()
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    new = _run_ours(name, params, [zeros], [1.0], [0.5])
    for k, p in params.items():
        if p.ndim > 1:
            # AdamW and SGD: p - lr * wd * p. LARS: the trust ratio rescales the decay term
            # wd * p to eta * |p|, so the step is lr * eta * p.
            factor = 0.001 if name == "lars" else 0.5
            np.testing.assert_allclose(new[k], p * (1.0 - factor), rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(new[k], p, err_msg=k)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_teacher_draws_its_own_drop_path_masks(drop_path_rate, tiny_config):
    config = tiny_config()
    config.model.drop_path_rate = drop_path_rate
    graphdef, make_state, _, _ = train.state_layout(
        train.run_model_factory(config), train.make_optimizer(config), True,
        sharding.make_mesh(config), config.mesh.fsdp_min_size)
    state = make_state()
    images = jax.random.normal(jax.random.key(0), (4, 2, 28, 28, 1))

    def forward(params, model_state):
        return nnx.merge(graphdef, params, model_state)(images, deterministic=False)

    student = forward(state.params, state.model_state)
    teacher = forward(state.teacher_params, state.teacher_model_state)  # same weights
    if drop_path_rate:
        assert np.abs(student - teacher).max() > 1e-3
    else:
        np.testing.assert_array_equal(student, teacher)


# ---------------------------------------------------------------------------------------------
# ContrastiveCrop in the loop: 64 digits in a folder, 2 steps an epoch, boxes after epochs 1, 2.

@pytest.fixture(scope="module")
def ccrop_run(tmp_path_factory, tiny_config):
    import tensorflow as tf  # noqa: PLC0415

    from bam_jax.data import pipeline  # noqa: PLC0415

    root = tmp_path_factory.mktemp("digits")
    images, labels = pipeline.load_mnist_bundled()["train"]
    for i in range(64):
        folder = root / "train" / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.repeat(images[i].reshape(28, 28, 1), 3, axis=-1)
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(rgb).numpy())
    config = tiny_config(steps=8)
    config.data.update(source="folder", folder=str(root))
    config.ccrop.update(enabled=True, loc_interval=1, batch_size=16)
    config.keep_checkpoints = 10
    config.optimizer.warmup_epochs = 1
    workdir = str(tmp_path_factory.mktemp("ccrop"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


def test_contrastive_crop_boxes_are_updated_and_checkpointed(ccrop_run):
    config, workdir = ccrop_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        updates = [row["step"] for row in map(json.loads, f) if "ccrop_update_seconds" in row]
    assert updates == [4, 6]  # after epochs 1 and 2 (0-based), not after the last
    before = checkpoint_lib.read_boxes(workdir, 2, 64)
    boxes = checkpoint_lib.read_boxes(workdir, 8, 64)
    np.testing.assert_array_equal(before, np.tile([0.0, 0.0, 1.0, 1.0], (64, 1)))
    assert boxes.shape == (64, 4) and boxes.dtype == np.float32
    assert np.all((0 <= boxes[:, :2]) & (boxes[:, :2] <= boxes[:, 2:]) & (boxes[:, 2:] <= 1))
    assert np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) < 0.95


def test_resume_after_a_box_update_continues_exactly(ccrop_run, tmp_path, resume_from, read_metrics,
                                                    read_state, assert_trees_close):
    config, workdir = ccrop_run
    # The boxes of the update at step 6 are not whole images (at step 4 the teacher is still
    # near its init and boxes every digit whole), so a resume that lost them would crop otherwise.
    boxes = checkpoint_lib.read_boxes(workdir, 6, 64)
    assert np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) < 0.95
    resumed = str(tmp_path / "resumed")
    resume_from(workdir, resumed, step=6)
    train.train_and_evaluate(config, resumed)
    np.testing.assert_array_equal(checkpoint_lib.read_boxes(resumed, 8, 64), boxes)
    full_metrics, resumed_metrics = read_metrics(workdir), read_metrics(resumed)
    for step in (7, 8):
        assert resumed_metrics[step]["loss"] == full_metrics[step]["loss"]
    assert_trees_close(read_state(workdir, 8), read_state(resumed, 8), rtol=0, atol=0)
    # On another device count the boxes come back the same (a host array in the checkpoint).
    on4 = str(tmp_path / "on4")
    resume_from(workdir, on4, step=6)
    on4_config = config.copy_and_resolve_references()
    on4_config.mesh.num_devices = 4
    train.train_and_evaluate(on4_config, on4)
    np.testing.assert_array_equal(checkpoint_lib.read_boxes(on4, 8, 64), boxes)
