"""One bam_jax pretraining step equals one step of the official `main_pretrain.train_one_epoch`.

The reference (`bam_jax.tools.torch_reference`, the schedules here) is PyTorch written from
the official code (DanielShalam/BAM: models/vit.py on timm's VisionTransformer with
`dynamic_img_size`, models/heads.py MlpProjHead, models/wrappers.py MultiCropWrapper and
StudentTeacherWrapper, bam/bam_loss.py DistillBAMLoss,
utils.py get_params_groups / cosine_scheduler / update_lr_and_wd / AmpScalerWrapper), as the
official code *intends*: it does not run as released (`self.masking_fn` is never set, CUDA and
torch.distributed are assumed), so the top-k masking reads `top_k > 0` and there is one process.
Nothing of bam_jax is used by the reference except the state it starts from and the batch.

bam_jax runs two consecutive jitted steps from a given mid-training state (drawn weights, a
teacher that differs from the student, fresh AdamW moments) at an iteration in the middle of the
schedules (lr, weight decay and teacher momentum all between their end points), on 2 global
16 px + 2 local 8 px crops (the position table is resampled for the local crops), with the
gradient clipped at both steps. Each step is compared with the official iteration run from
bam_jax's state before it (student, teacher, BatchNorm statistics, AdamW moments and step
count): the loss, the pre-clip gradient norm, every student and teacher tensor after the step,
the BatchNorm running statistics and the AdamW moments. Starting each step from the same state
keeps the comparison at float32 precision: run on, the two would drift apart where Adam
amplifies float noise (below), which no tolerance could then tell from a real difference.

Tolerances (see `step_tolerances`): the loss and the gradient norm to 1e-5 relative; tensors to
a few float32 ulps of their scale, plus, for Adam's updates, the precision of the step size and
of each entry's gradient. An entry whose gradient is tiny has a poorly determined direction of
update (Adam divides by its magnitude), and where the true gradient is exactly zero both
frameworks move by amplified float noise: the key bias of every attention layer (a softmax row
is shift-invariant) and, with BatchNorm in the projector, every bias feeding a BatchNorm. Those
are bounded by Adam's largest step, and their gradients are checked to be noise in both.

Known, accepted differences with torch, both below any effect on training:
  - bam_jax (flax) keeps the *biased* batch variance in BatchNorm running_var, torch the unbiased
    one; the reference's running_var is converted (`biased_running_var`).
  - optax computes Adam's bias corrections 1 - b2**t in float32 (1.3e-5 relative error at t = 1,
    torch uses float64), so its steps are ~6e-6 shorter (`STEP_RTOL`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bam_jax import models, sharding, train
from bam_jax.tools import torch_reference
from configs import default as default_config

# Compared with PyTorch references at tight tolerances: the optimized programs users run.
pytestmark = pytest.mark.xla_optimized

torch = pytest.importorskip("torch")

BATCH, GLOBAL, LOCAL, CHANNELS = 8, 2, 2, 3
GLOBAL_SIZE, LOCAL_SIZE, PATCH, WIDTH, DEPTH, HEADS = 16, 8, 4, 32, 2, 2
STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS = 10, 10, 2
FIRST_STEP = 37  # in the cosine part: lr, wd and momentum all between their end points
NUM_STEPS = 2  # the second covers the Adam moments and its bias correction
CLIP = 5.0  # below the gradient norm of both steps (asserted)


def make_config(use_bn: bool):
    config = default_config.get_config()
    config.batch_size = BATCH
    config.num_train_steps = EPOCHS * STEPS_PER_EPOCH
    config.model.backbone = "vit"
    config.model.update(vit_variant="custom", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                        patch_size=PATCH, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                        freeze_patch_embed=True, dtype="float32", param_dtype="float32")
    config.model.projector.update(n_layers=3, hidden_dim=48, out_dim=24, act="gelu",
                                  use_bn=use_bn, last_bn=use_bn, bias=True)
    config.data.update(global_crops_number=GLOBAL, global_crop_size=GLOBAL_SIZE,
                       local_crops_number=LOCAL, local_crop_size=LOCAL_SIZE)
    # eps constant: the official indexes its eps schedule by epoch, bam_jax by step.
    config.loss.update(num_target_crops=2, sinkhorn_reg=0.05, sinkhorn_reg_final=0.05,
                       temperature=0.1, sinkhorn_iters=3, top_k=6, positive_masking=True)
    config.teacher.update(enabled=True, momentum=0.9, momentum_final=1.0)  # official final: 1
    config.optimizer.update(name="adamw", base_lr=0.04, min_lr=1e-5, warmup_epochs=WARMUP_EPOCHS,
                            weight_decay=0.04, weight_decay_final=0.4, clip_grad=CLIP,
                            b1=0.9, b2=0.999)
    config.mesh.num_devices = 1
    return config


# ---------------------------------------------------------------------------------------------
# The official schedules (utils.cosine_scheduler, verbatim maths).
# ---------------------------------------------------------------------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = (np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0
              else np.array([]))
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    iters = iters / len(iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters))
    return np.concatenate((warmup, schedule))


def official_schedules(config):
    opt = config.optimizer
    lr = opt.base_lr * config.batch_size / 256.0  # linear scaling rule (min_lr unscaled)
    return dict(
        lr=cosine_scheduler(lr, opt.min_lr, EPOCHS, STEPS_PER_EPOCH, warmup_epochs=WARMUP_EPOCHS),
        wd=cosine_scheduler(opt.weight_decay, opt.weight_decay_final, EPOCHS, STEPS_PER_EPOCH),
        momentum=cosine_scheduler(config.teacher.momentum, 1, EPOCHS, STEPS_PER_EPOCH))


# ---------------------------------------------------------------------------------------------
# The official network, loss and optimizer helpers (shared with the benchmark's reference).
# ---------------------------------------------------------------------------------------------
_OFFICIAL = torch_reference.official()
ViT, MlpProjHead = _OFFICIAL.ViT, _OFFICIAL.MlpProjHead
MultiCropWrapper = _OFFICIAL.MultiCropWrapper
StudentTeacherWrapper = _OFFICIAL.StudentTeacherWrapper
DistillBAMLoss, get_params_groups = _OFFICIAL.DistillBAMLoss, _OFFICIAL.get_params_groups
update_lr_and_wd = _OFFICIAL.update_lr_and_wd


class OfficialState(NamedTuple):
    """A training state in official names and layouts (numpy float32)."""

    student: dict  # parameters and buffers of the student MultiCropWrapper
    teacher: dict
    adam: dict  # name -> (exp_avg, exp_avg_sq) of every trainable student parameter
    adam_step: int  # AdamW steps taken (0: fresh moments)


def network(config, use_bn):
    backbone = ViT(GLOBAL_SIZE, PATCH, CHANNELS, WIDTH, DEPTH, HEADS)
    p = config.model.projector
    return MultiCropWrapper(backbone, MlpProjHead(WIDTH, p.n_layers, p.hidden_dim, p.out_dim,
                                                  use_bn=use_bn, last_bn=use_bn))


def official_step(config, it, start: OfficialState, images, *, use_bn, weight_decay=True):
    """Iteration `it` of `train_one_epoch` from `start`, in float32 (AmpScalerWrapper off).

    Returns (loss, pre-clip gradient norm, the state after the step)."""
    schedules = official_schedules(config)
    student, teacher = network(config, use_bn), network(config, use_bn)
    load_weights(student, start.student)
    model = StudentTeacherWrapper(student, teacher, schedules["momentum"][it:])
    load_weights(teacher, start.teacher)  # a mid-training teacher, not the student's copy
    optimizer = torch.optim.AdamW(get_params_groups(student))
    if start.adam_step:
        for name, param in student.named_parameters():
            if param.requires_grad:
                exp_avg, exp_avg_sq = start.adam[name]
                optimizer.state[param] = {"step": torch.tensor(float(start.adam_step)),
                                          "exp_avg": torch.from_numpy(exp_avg.copy()),
                                          "exp_avg_sq": torch.from_numpy(exp_avg_sq.copy())}
    loss_fn = DistillBAMLoss(
        n_crops=GLOBAL + LOCAL, n_lrg_crops=GLOBAL, n_tgt_crops=config.loss.num_target_crops,
        ot_reg=config.loss.sinkhorn_reg, softmax_temperature=config.loss.temperature,
        num_sinkhorn_iters=config.loss.sinkhorn_iters, top_k=config.loss.top_k)
    wd_schedule = schedules["wd"] if weight_decay else np.zeros_like(schedules["wd"])

    model.train()
    update_lr_and_wd(optimizer, schedules["lr"], wd_schedule, it)
    z_source, z_target = model(images)
    loss = loss_fn(z_source, z_target)
    # AmpScalerWrapper(enable=False).forward(loss, optimizer, model.parameters(), clip_grad)
    optimizer.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
    optimizer.step()

    adam = {n: (optimizer.state[p]["exp_avg"].numpy().copy(),
                optimizer.state[p]["exp_avg_sq"].numpy().copy())
            for n, p in student.named_parameters() if p.requires_grad}
    return float(loss.detach()), float(norm), OfficialState(
        module_arrays(student), module_arrays(teacher), adam, start.adam_step + 1)


# ---------------------------------------------------------------------------------------------
# Weights between bam_jax's state and the torch modules (official key names).
# ---------------------------------------------------------------------------------------------
def _flat(state) -> dict[tuple, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
        out[tuple(k for k in keys if k != "value")] = np.asarray(leaf, np.float32)
    return out


def torch_named(state, *, use_bn) -> dict[str, np.ndarray]:
    """bam_jax (params or model_state) -> {official torch name: torch-layout array}."""
    step = 3 if use_bn else 2  # Linear, [BatchNorm], GELU per projector layer
    out = {}
    for path, value in _flat(state).items():
        *module, leaf = path
        if leaf == "pos_embed":
            name, value = "backbone.pos_embed", value[None]
        elif leaf == "patch_kernel":  # [(p1 p2 c), D] -> OIHW
            name = "backbone.patch_embed.proj.weight"
            value = value.reshape(PATCH, PATCH, CHANNELS, WIDTH).transpose(3, 2, 0, 1)
        elif leaf == "patch_bias":
            name = "backbone.patch_embed.proj.bias"
        else:
            if module[0] == "projector":
                kind, i = module[1], int(module[2])
                prefix = f"proj_head.projector.{step * i + (kind == 'norms')}"
            else:
                prefix = ".".join(str(m) for m in module)
            suffix = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                      "var": "running_var"}.get(leaf, leaf)
            name = f"{prefix}.{suffix}" if prefix else suffix
            if leaf == "kernel":
                value = value.T
        out[name] = np.ascontiguousarray(value)
    return out


def load_weights(module, named):
    """Copy named tensors in; the sin-cos table is not loaded (the reference builds its own)."""
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    assert {n for n in targets if not n.endswith("num_batches_tracked")} == set(named)
    with torch.no_grad():
        for name, value in named.items():
            if name == "backbone.pos_embed":
                np.testing.assert_allclose(targets[name].numpy(), value, atol=1e-6)
                continue
            assert targets[name].shape == value.shape, name
            targets[name].copy_(torch.from_numpy(np.array(value)))


def module_arrays(module) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in module.state_dict().items()
            if not n.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------
# bam_jax's step.
# ---------------------------------------------------------------------------------------------
def make_batch():
    rng = np.random.default_rng(0)
    return {
        "global_crops": rng.normal(size=(BATCH, GLOBAL, GLOBAL_SIZE, GLOBAL_SIZE, CHANNELS)),
        "local_crops": rng.normal(size=(BATCH, LOCAL, LOCAL_SIZE, LOCAL_SIZE, CHANNELS)),
    }


def torch_images(batch):
    """[B, V, H, W, C] groups -> the official list of crops, each [B, C, H, W]."""
    return [torch.from_numpy(np.ascontiguousarray(group[:, v].transpose(0, 3, 1, 2)))
            .to(torch.float32)
            for group in (batch["global_crops"], batch["local_crops"])
            for v in range(group.shape[1])]


def given_state(create, optimizer):
    """A mid-training TrainState at FIRST_STEP: every tensor drawn here (fresh Adam moments)."""
    rng = np.random.default_rng(1)
    _, params, model_state = nnx.split(nnx.eval_shape(create), nnx.Param, ...)

    def draw(path, leaf, teacher_of=None):
        name = jax.tree_util.keystr(path)
        if "pos_embed" in name:  # the fixed sin-cos table
            return models.vit.sincos_pos_embed(GLOBAL_SIZE // PATCH, GLOBAL_SIZE // PATCH, WIDTH)
        if "patch" in name:  # the frozen random projection, shared by student and teacher
            return np.asarray(teacher_of) if teacher_of is not None else rng.uniform(
                -0.15, 0.15, leaf.shape).astype(np.float32)
        if teacher_of is not None:  # the teacher lags the student by a few percent
            value = np.asarray(teacher_of)
            return (value + (0.05 * np.std(value) + 0.005) * rng.normal(size=leaf.shape)).astype(
                np.float32)
        if "'kernel'" in name:
            value = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0])
        elif "'scale'" in name or "'var'" in name:  # norm scales and BatchNorm variances
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        else:  # biases, the CLS token, BatchNorm means
            value = 0.02 * rng.normal(size=leaf.shape)
        return value.astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, params)
    model_state = jax.tree_util.tree_map_with_path(draw, model_state)
    as_teacher = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, leaf: draw(path, leaf, teacher_of=leaf), tree)
    return train.TrainState(
        step=jnp.asarray(FIRST_STEP, jnp.int32), params=params, model_state=model_state,
        opt_state=optimizer.init(params), teacher_params=as_teacher(params),
        teacher_model_state=as_teacher(model_state), nonfinite_steps=jnp.zeros((), jnp.int32))


def bam_jax_steps(config, batch):
    """NUM_STEPS of bam_jax's jitted train step from `given_state`: the states and metrics."""
    mesh = sharding.make_mesh(config)
    schedules = train.make_schedules(config, STEPS_PER_EPOCH, config.num_train_steps)
    optimizer = train.make_optimizer(config)

    def create():
        return models.build_model(config.model, num_channels=CHANNELS, image_size=GLOBAL_SIZE,
                                  rngs=nnx.Rngs(params=0, dropout=1))

    graphdef = nnx.split(nnx.eval_shape(create))[0]
    # Placed as the step's outputs will be, so that the second step runs the same executable.
    replicated = jax.NamedSharding(mesh, jax.P())
    state = jax.device_put(given_state(create, optimizer), replicated)
    batch = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), batch), replicated)
    step_fn = train.make_train_step(config, graphdef, optimizer, schedules, mesh)
    states, metrics = [jax.device_get(state)], []
    with jax.set_mesh(mesh):
        # The same computation at LLVM -O0: the compile takes half the time (this test's most),
        # and the code differs only in its float32 rounding.
        jitted = jax.jit(step_fn).lower(state, batch).compile(
            {"xla_backend_optimization_level": 0})
        for _ in range(NUM_STEPS):
            state, m = jitted(state, batch)
            states.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
    return states, metrics


def as_official(state, use_bn) -> OfficialState:
    """bam_jax's TrainState in official names and layouts (Adam moments included)."""
    def named(*trees):
        return {k: v for tree in trees for k, v in torch_named(tree, use_bn=use_bn).items()}

    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    mu, nu = named(adam.mu), named(adam.nu)
    return OfficialState(named(state.params, state.model_state),
                         named(state.teacher_params, state.teacher_model_state),
                         {n: (mu[n], nu[n]) for n in mu}, int(adam.count))


# ---------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------
PARAMETER_RTOL = 2e-6  # of a tensor's largest entry: a few float32 ulps
STATISTICS_RTOL = 1e-5  # BatchNorm running statistics: float32 batch moments of 32 rows
STEP_RTOL = 2e-5  # of lr: optax's float32 bias corrections 1 - b2**t are 1.3e-5 off at t = 1, 2
GRADIENT_NOISE = 2e-5  # float32 error of a gradient entry, relative to its tensor's largest
MOMENT_RTOL = 4e-5  # AdamW's first moments (second: twice), of the tensor's largest entry
ADAM_BOUND = 3.0  # |Adam update| / lr, bounding updates of pure float noise


def noise_entries(name, shape, use_bn):
    """Entries whose true gradient is exactly zero: the key bias of every attention layer (a
    softmax row is shift-invariant) and, with BatchNorm in the projector, every bias feeding a
    BatchNorm (shift-invariant too): the Linear biases and the backbone's last LayerNorm bias."""
    mask = np.zeros(shape, bool)
    if name.endswith("attn.qkv.bias"):
        mask[WIDTH:2 * WIDTH] = True
    if use_bn and (name == "backbone.norm.bias" or name.startswith("proj_head.projector.")
                   and name.endswith(".bias") and int(name.split(".")[2]) % 3 == 0):
        mask[:] = True
    return mask


def step_tolerances(reference: OfficialState, lr, trainable, use_bn):
    """Per-entry absolute tolerances on the student after one step from a common state.

    Every entry gets PARAMETER_RTOL of its tensor's scale. A trainable entry moves by
    lr * m_hat / sqrt(v_hat), whose relative error is STEP_RTOL (the step size) plus that of
    the first moment m, about GRADIENT_NOISE * max|m| / |m| (reassociation perturbs each
    gradient entry by a fraction of its tensor's largest), at most ADAM_BOUND. On the noise
    entries both frameworks update by amplified float noise and only ADAM_BOUND is left.
    """
    tolerance = {}
    for name, value in reference.student.items():
        rtol = STATISTICS_RTOL if "running" in name else PARAMETER_RTOL
        tol = np.full(value.shape, rtol * max(float(np.abs(value).max()), 1e-3))
        if name in trainable:
            m = np.abs(reference.adam[name][0])
            amplification = GRADIENT_NOISE * m.max() / np.maximum(m, 1e-30)
            amplification[noise_entries(name, m.shape, use_bn)] = ADAM_BOUND
            tol += lr * np.minimum(ADAM_BOUND, STEP_RTOL + amplification)
        tolerance[name] = tol
    return tolerance


def worst_ratios(ours: dict, reference: dict, tolerance: dict) -> dict:
    """Per tensor: max |ours - reference| / tolerance (<= 1 passes)."""
    return {name: float(np.max(np.abs(ours[name] - reference[name]) / tolerance[name]))
            for name in reference}


def scaled_tolerances(arrays: dict, rtol: float) -> dict:
    return {n: np.full(v.shape, rtol * max(float(np.abs(v).max()), 1e-3))
            for n, v in arrays.items()}


def biased_running_var(name, torch_value, before, rows):
    """bam_jax's BatchNorm (flax) keeps the biased batch variance in running_var, torch the
    unbiased one (x rows / (rows - 1)): the same update in bam_jax's convention."""
    if not name.endswith("running_var"):
        return torch_value
    momentum = 0.1
    return (1 - momentum) * before + (torch_value - (1 - momentum) * before) * (rows - 1) / rows


@pytest.mark.parametrize("use_bn", [False, True], ids=["official_vit_head", "bn_head"])
def test_two_steps_equal_the_official_train_one_epoch(use_bn):
    config = make_config(use_bn)
    batch = make_batch()
    states, metrics = bam_jax_steps(config, batch)
    images = torch_images(batch)
    official = official_schedules(config)
    rows = BATCH * (GLOBAL + LOCAL)  # the projector's BatchNorm sees every view
    report = {}

    for i, m in enumerate(metrics):
        it = FIRST_STEP + i
        # The schedules are the official ones at this iteration, away from their end points.
        np.testing.assert_allclose(m["learning_rate"], official["lr"][it], rtol=1e-6)
        np.testing.assert_allclose(m["weight_decay"], official["wd"][it], rtol=1e-6)
        np.testing.assert_allclose(m["teacher_momentum"], official["momentum"][it], rtol=1e-6)
        np.testing.assert_allclose(m["sinkhorn_reg"], config.loss.sinkhorn_reg, rtol=1e-6)
        assert 10 * config.optimizer.min_lr < official["lr"][it] < official["lr"][20]
        assert 0.05 < official["wd"][it] < 0.35 and 0.9 < official["momentum"][it] < 0.99
        assert bool(m["finite"])

        # The official step from bam_jax's state before this step (student, teacher, moments).
        start, ours = as_official(states[i], use_bn), as_official(states[i + 1], use_bn)
        assert start.adam_step == i and ours.adam_step == i + 1
        loss, norm, ref = official_step(config, it, start, images, use_bn=use_bn)

        # Loss and pre-clip gradient norm; the clipping really happened.
        np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-5)
        assert norm > 1.5 * CLIP, norm
        report[f"loss {i + 1}"] = abs(float(m["loss"]) - loss) / abs(loss)
        report[f"grad norm {i + 1}"] = abs(float(m["grad_norm"]) - norm) / norm

        trainable = set(ref.adam)
        assert set(ours.student) == set(ref.student) == set(ours.teacher) == set(ref.teacher)
        assert len(ref.student) - len(trainable) == 3 + 6 * use_bn  # see `frozen` below
        ref_student = {n: biased_running_var(n, v, start.student[n], rows)
                       for n, v in ref.student.items()}
        ref_teacher = {n: biased_running_var(n, v, start.teacher[n], rows)
                       for n, v in ref.teacher.items()}

        # Student (parameters and BatchNorm statistics), teacher, Adam moments.
        tol_student = step_tolerances(ref, official["lr"][it], trainable, use_bn)
        tol_teacher = {n: t * (STATISTICS_RTOL / PARAMETER_RTOL if "running" in n else 1)
                       for n, t in scaled_tolerances(ref.teacher, PARAMETER_RTOL).items()}
        ref_mu = {n: v[0] for n, v in ref.adam.items()}
        ref_nu = {n: v[1] for n, v in ref.adam.items()}
        tol_mu = scaled_tolerances(ref_mu, MOMENT_RTOL)
        tol_nu = scaled_tolerances(ref_nu, 2 * MOMENT_RTOL)
        for name in trainable:  # the moments of the noise entries are noise, small in both
            noise = noise_entries(name, ref_mu[name].shape, use_bn)
            sibling = name[:-len("bias")] + "weight" if noise.all() else name
            tiny = 1e-4 * np.abs(ref_mu[sibling][~noise_entries(sibling, ref_mu[sibling].shape,
                                                                 use_bn)]).max()
            assert np.abs(ref_mu[name][noise]).max(initial=0) < tiny, name
            tol_mu[name][noise], tol_nu[name][noise] = tiny, (10 * tiny) ** 2  # |g| < 10 tiny
        ratios = {}
        for what, ours_part, ref_part, tol in (
                ("student", ours.student, ref_student, tol_student),
                ("teacher", ours.teacher, ref_teacher, tol_teacher),
                ("adam mu", {n: v[0] for n, v in ours.adam.items()}, ref_mu, tol_mu),
                ("adam nu", {n: v[1] for n, v in ours.adam.items()}, ref_nu, tol_nu)):
            ratios |= {f"step {i + 1} {what} {n}": r
                       for n, r in worst_ratios(ours_part, ref_part, tol).items()}
        failing = {n: r for n, r in ratios.items() if not r <= 1}
        assert not failing, failing
        worst = max(ratios, key=ratios.get)
        report[f"difference/tolerance {i + 1}"] = f"{ratios[worst]:.2f} ({worst})"
        for what, ours_part, ref_part in (("student", ours.student, ref_student),
                                          ("teacher", ours.teacher, ref_teacher)):
            relative = {}  # to the tensor's scale, noise entries aside
            for n in trainable:
                kept = ~noise_entries(n, ref_part[n].shape, use_bn)
                if kept.any():
                    relative[n] = float(np.abs(ours_part[n] - ref_part[n])[kept].max()
                                        / np.abs(ref_part[n]).max())
            worst = max(relative, key=relative.get)
            report[f"{what} {i + 1}"] = f"{relative[worst]:.1e} ({worst})"

        # Not vacuous: in every trainable tensor (and BatchNorm statistic) the typical entry
        # moved by far more than its tolerance, in the student and in the teacher; loose
        # tolerances concern few entries.
        for name in trainable | {n for n in ref.student if "running" in n}:
            kept = ~noise_entries(name, ref.student[name].shape, use_bn)
            if not kept.any():
                continue
            for after, before, tol in ((ref.student, start.student, tol_student),
                                       (ref.teacher, start.teacher, tol_teacher)):
                moved = np.abs(after[name] - before[name])[kept]
                assert np.median(moved) > 30 * np.median(tol[name][kept]), name
        loose = sum(int(np.sum(tol_student[n] > 0.01 * official["lr"][it])) for n in trainable)
        loose /= sum(ref.student[n].size for n in trainable)
        assert loose < 0.1, loose
        report[f"entries with tolerance > lr/100 {i + 1}"] = f"{loose:.1%}"

        # Frozen: the patch projection and the position table never move in bam_jax; in torch
        # the EMA of equal tensors rounds (m*x + (1-m)*x); the tables are the same.
        frozen = {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
                  "backbone.pos_embed"}
        assert frozen.isdisjoint(trainable)
        for name in frozen:
            np.testing.assert_array_equal(ours.student[name], start.student[name])
            np.testing.assert_array_equal(ours.teacher[name], start.teacher[name])
            np.testing.assert_allclose(ref.student[name], start.student[name], rtol=0, atol=1e-6)
            np.testing.assert_allclose(ref.teacher[name], start.teacher[name], rtol=0, atol=1e-6)

        if i == 0:
            # Able to fail: the official step without weight decay (as when the decay is not
            # applied) is far outside the tolerances.
            *_, without = official_step(config, it, start, images, use_bn=use_bn,
                                        weight_decay=False)
            ratio = max(worst_ratios(ours.student, without.student, tol_student).values())
            assert ratio > 10, ratio
            report["without weight decay: difference/tolerance"] = f"{ratio:.0f}"

    print(f"\n[{'bn' if use_bn else 'no-bn'} head] " + "; ".join(
        f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
