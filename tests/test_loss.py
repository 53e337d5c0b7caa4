"""The BAM loss against an independent NumPy reference, its properties, and its sharded forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bam_jax
from bam_jax import loss as loss_lib


# ---------------------------------------------------------------------------------------------
# Reference: written from the maths, in the official code's crop-major 2-D layout, float64,
# linear-domain Sinkhorn with the official marginals (rows v*B+i, columns t*B+j).
# ---------------------------------------------------------------------------------------------
def _np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _crop_major(x):
    return np.transpose(x, (1, 0, 2)).reshape(-1, x.shape[-1])


def reference_target(q_t, mask, eps, iters, num_masked_per_column):
    """Official-style Sinkhorn: total 1, columns to r, rows to c, final row normalisation."""
    k = np.exp(q_t / eps - np.max(np.where(mask, -np.inf, q_t / eps)))
    k = np.where(mask, 0.0, k)
    k = k / k.sum()
    n_rows, n_cols = k.shape
    r = np.ones(n_cols) / (n_rows - num_masked_per_column)
    c = np.ones(n_rows) / n_rows
    for _ in range(iters):
        k = k * (r / k.sum(axis=0))[None, :]
        k = k * (c / k.sum(axis=1))[:, None]
    return k / k.sum(axis=1, keepdims=True)


def reference_loss(z, *, num_global_crops, num_target_crops=None, z_teacher=None,
                   sinkhorn_reg=0.05, temperature=0.1, sinkhorn_iters=3, top_k=0,
                   positive_masking=True, target_z=None):
    """`target_z` (default z) feeds the target alone: the target carries no gradient."""
    batch, num_views, _ = z.shape
    g = num_global_crops
    t = num_target_crops or g
    zn = _crop_major(_np_normalize(z))
    source = _np_normalize(z if z_teacher is None else z_teacher)
    columns = _crop_major(source[:, :t])
    q = zn @ columns.T
    if z_teacher is None:
        target_source = _np_normalize(z if target_z is None else target_z)
        q_t = _crop_major(target_source) @ _crop_major(target_source[:, :t]).T
    else:
        q_t = _crop_major(source) @ columns.T

    def mask_for(n_rows):
        rows = np.arange(n_rows) % batch
        cols = np.arange(t * batch) % batch
        m = rows[:, None] == cols[None, :]
        return m if positive_masking else np.zeros_like(m)

    p = reference_target(q_t, mask_for(q_t.shape[0]), sinkhorn_reg, sinkhorn_iters,
                         t if positive_masking else 0)[: batch * g]
    if top_k > 0:
        avg = np.mean(np.stack(np.split(p, g)), axis=0)
        idx = np.argsort(-avg, axis=1)[:, :top_k]
        keep = np.zeros_like(avg, bool)
        np.put_along_axis(keep, idx, True, axis=1)
        p = np.where(np.tile(keep, (g, 1)), p, 0.0)
        p = p / p.sum(axis=1, keepdims=True)
    p = np.split(p, g)

    mask = mask_for(q.shape[0])
    logits = np.where(mask, np.finfo(np.float64).min, q / temperature)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_q = np.split(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), num_views)
    keep_mask = (~mask[:batch]).astype(np.float64)
    total = 0.0
    for v_tgt in range(g):
        sub, n = 0.0, 0
        for v_src in range(num_views):
            if v_tgt == v_src and num_views > 1:
                continue
            sub -= np.mean(np.sum(p[v_tgt] * log_q[v_src] * keep_mask, axis=1))
            n += 1
        total += sub / n
    return total / g


def _inputs(seed, batch, views, dim, teacher_views=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, views, dim)).astype(np.float32)
    zt = None
    if teacher_views:
        zt = (z[:, :teacher_views] + 0.5 * rng.normal(size=(batch, teacher_views, dim))).astype(
            np.float32)
    return z, zt


GRID = [
    dict(views=v, num_target_crops=t, top_k=k, teacher=te, positive_masking=m)
    for v, t, k, te, m in itertools.product([2, 4, 8], [1, 2], [0, 5], [False, True],
                                            [True, False])
]


@pytest.mark.xla_optimized  # against a reference at tight tolerances
@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
def test_matches_reference_value_and_gradient(case):
    batch, dim = 6, 16
    z, zt = _inputs(0, batch, case["views"], dim, teacher_views=case["views"] if case["teacher"] else None)
    kwargs = dict(num_global_crops=2, num_target_crops=case["num_target_crops"], top_k=case["top_k"],
                  positive_masking=case["positive_masking"], sinkhorn_reg=0.05, temperature=0.1,
                  sinkhorn_iters=3)
    value, grad = jax.jit(jax.value_and_grad(
        lambda x, t: bam_jax.bam_loss(x, z_teacher=t, **kwargs)))(
            jnp.asarray(z), None if zt is None else jnp.asarray(zt))
    expected = reference_loss(z, z_teacher=zt, **kwargs)
    np.testing.assert_allclose(value, expected, rtol=2e-5, atol=2e-5)

    # Gradient: directional derivatives of the float64 reference by central differences, along
    # 3 random directions (one direction could miss a wrong component of the gradient).
    rng = np.random.default_rng(1)
    for _ in range(3):
        direction = rng.normal(size=z.shape)
        h = 1e-5
        numeric = (reference_loss(z + h * direction, z_teacher=zt, target_z=z, **kwargs)
                   - reference_loss(z - h * direction, z_teacher=zt, target_z=z, **kwargs)) / (2 * h)
        analytic = float(np.sum(np.asarray(grad, np.float64) * direction))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=2e-4)


def test_single_view_does_not_skip_itself():
    z, _ = _inputs(2, 5, 1, 8)
    kwargs = dict(num_global_crops=1, sinkhorn_iters=2)
    np.testing.assert_allclose(bam_jax.bam_loss(jnp.asarray(z), **kwargs),
                               reference_loss(z, **kwargs), rtol=2e-5)


def test_sinkhorn_rows_sum_to_one_and_masked_entries_are_zero():
    z, _ = _inputs(3, 8, 4, 16)
    zn = loss_lib._normalize(jnp.asarray(z))
    columns = zn[:, :2].reshape(16, -1)
    scores = jnp.einsum("bvd,cd->bvc", zn, columns)
    mask = (jnp.arange(8)[:, None] == jnp.arange(16)[None, :] // 2)[:, None, :]
    p = bam_jax.sinkhorn_target(scores, sinkhorn_reg=0.05, sinkhorn_iters=3, mask=mask)
    np.testing.assert_allclose(jnp.sum(p, axis=-1), 1.0, rtol=1e-5)
    assert jnp.all(jnp.where(jnp.broadcast_to(mask, p.shape), p, 0.0) == 0.0)

    def column_spread(iters):
        p = bam_jax.sinkhorn_target(scores, sinkhorn_reg=0.05, sinkhorn_iters=iters, mask=mask)
        sums = jnp.sum(p, axis=(0, 1))
        return float(jnp.std(sums) / jnp.mean(sums))

    spreads = [column_spread(i) for i in (0, 1, 3, 10, 100)]
    assert all(a > b for a, b in zip(spreads, spreads[1:])), spreads
    assert spreads[-1] < 1e-3


def test_attention_matrices_are_distributions_with_own_image_masked():
    z = jax.random.normal(jax.random.key(0), (6, 3, 8))
    matrices = bam_jax.attention_matrices(z, num_global_crops=2, top_k=4)
    target = matrices.target.reshape(12, 12)  # rows: image x global view
    source = jnp.exp(matrices.log_source[:, :2]).reshape(12, 12)
    for matrix in (target, source):
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-5)
        assert float(matrix[0, :2].max()) == 0.0 and float(matrix[3, 2:4].max()) == 0.0
    assert int(jnp.max(jnp.sum(target > 0, axis=1))) <= 4  # top-k


def test_loss_is_invariant_to_permuting_images():
    z, zt = _inputs(4, 10, 4, 16, teacher_views=4)
    perm = np.random.default_rng(0).permutation(10)
    kwargs = dict(num_global_crops=2, top_k=6)
    a = bam_jax.bam_loss(jnp.asarray(z), z_teacher=jnp.asarray(zt), **kwargs)
    b = bam_jax.bam_loss(jnp.asarray(z[perm]), z_teacher=jnp.asarray(zt[perm]), **kwargs)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_metrics_see_collapse():
    collapsed = jnp.ones((8, 4, 16)) + 1e-6 * jax.random.normal(jax.random.key(0), (8, 4, 16))
    _, metrics = bam_jax.bam_loss_and_metrics(collapsed, num_global_crops=2)
    assert metrics["mean_similarity"] > 0.999
    np.testing.assert_allclose(metrics["source_entropy"], metrics["uniform_entropy"], rtol=1e-4)
    np.testing.assert_allclose(metrics["uniform_entropy"], np.log(16 - 2), rtol=1e-6)
    spread, _ = _inputs(5, 8, 4, 16)
    _, metrics = bam_jax.bam_loss_and_metrics(jnp.asarray(spread), num_global_crops=2)
    assert metrics["mean_similarity"] < 0.3
    assert metrics["source_entropy"] < metrics["uniform_entropy"]


def test_traced_regularisation_and_temperature_under_jit():
    z, _ = _inputs(6, 8, 4, 16)

    @jax.jit
    def f(x, eps, tau):
        return bam_jax.bam_loss(x, num_global_crops=2, sinkhorn_reg=eps, temperature=tau)

    np.testing.assert_allclose(f(jnp.asarray(z), 0.07, 0.2),
                               reference_loss(z, num_global_crops=2, sinkhorn_reg=0.07,
                                              temperature=0.2), rtol=2e-5)


def test_bfloat16_small_eps_is_finite():
    z = jax.random.normal(jax.random.key(1), (32, 4, 4096), jnp.bfloat16)
    zt = jax.random.normal(jax.random.key(2), (32, 4, 4096), jnp.bfloat16)
    for teacher in (None, zt):
        value, grad = jax.value_and_grad(
            lambda x: bam_jax.bam_loss(x, num_global_crops=2, z_teacher=teacher, sinkhorn_reg=0.01,
                                       temperature=0.1, top_k=16))(z)
        assert value.dtype == jnp.float32
        assert jnp.isfinite(value)
        assert jnp.all(jnp.isfinite(grad.astype(jnp.float32)))
    # Even a target so sharp that exp(S/eps) underflows in float32 stays a distribution.
    p = bam_jax.sinkhorn_target(jnp.asarray([[1.0, 0.0, -1.0], [-1.0, -1.0, 0.5]]),
                                sinkhorn_reg=1e-3)
    assert jnp.all(jnp.isfinite(p))
    np.testing.assert_allclose(jnp.sum(p, axis=-1), 1.0, rtol=1e-6)


def test_invalid_shapes_fail_clearly():
    with pytest.raises(ValueError, match="must be \\[batch, views, dim\\]"):
        bam_jax.bam_loss(jnp.ones((4, 8)), num_global_crops=2)
    with pytest.raises(ValueError, match="num_global_crops=3"):
        bam_jax.bam_loss(jnp.ones((4, 2, 8)), num_global_crops=3)
    with pytest.raises(ValueError, match="at least 2 images"):
        bam_jax.bam_loss(jnp.ones((1, 2, 8)), num_global_crops=2)


# ---------------------------------------------------------------------------------------------
# Sharded forms on 8 simulated CPU devices.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py must simulate 8 devices"
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("teacher", [False, True])
def test_sharded_forms_equal_single_device(mesh, teacher):
    z, zt = _inputs(7, 16, 4, 32, teacher_views=4 if teacher else None)
    kwargs = dict(num_global_crops=2, top_k=5, sinkhorn_iters=3)
    teacher_arr = None if zt is None else jnp.asarray(zt)

    def single(x):
        return bam_jax.bam_loss_and_metrics(x, z_teacher=teacher_arr, **kwargs)

    (expected, expected_metrics), expected_grad = jax.value_and_grad(single, has_aux=True)(
        jnp.asarray(z))

    batch_sharding = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
    z_sharded = jax.device_put(jnp.asarray(z), batch_sharding)
    zt_sharded = None if zt is None else jax.device_put(teacher_arr, batch_sharding)

    # 1) plain jit over a batch-sharded input (axis_name=None).
    jitted = jax.jit(jax.value_and_grad(
        lambda x, t: bam_jax.bam_loss_and_metrics(x, z_teacher=t, **kwargs), has_aux=True))
    (value, _), grad = jitted(z_sharded, zt_sharded)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)

    # 2) shard_map with axis_name: each device its local rows, loss pmean-ed.
    with jax.set_mesh(mesh):
        sharded = jax.jit(jax.value_and_grad(
            lambda x, t: bam_jax.sharded_bam_loss_and_metrics(
                x, z_teacher=t, mesh=mesh, batch_axes=("data", "fsdp"), **kwargs), has_aux=True))
        (value, metrics), grad = sharded(z_sharded, zt_sharded)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    for name in expected_metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_shard_map_materialises_only_local_rows(mesh):
    batch, views, targets, dim = 256, 4, 2, 8
    z = jax.device_put(jnp.zeros((batch, views, dim)),
                       jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(lambda x: bam_jax.sharded_bam_loss_and_metrics(
            x, mesh=mesh, batch_axes=("data", "fsdp"), num_global_crops=2)[0])).lower(z).compile()
    hlo = compiled.as_text()
    columns = batch * targets
    local_rows = batch // 8
    assert f"f32[{local_rows},{views},{columns}]" in hlo
    assert f"f32[{batch},{views},{columns}]" not in hlo
    full_matrix_bytes = batch * views * columns * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < full_matrix_bytes, (temp, full_matrix_bytes)


def test_plain_jit_under_an_explicit_mesh():
    explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    z, _ = _inputs(8, 16, 4, 8)
    expected = bam_jax.bam_loss(jnp.asarray(z), num_global_crops=2, top_k=4)
    with jax.set_mesh(explicit):
        z_sharded = jax.device_put(z, jax.NamedSharding(explicit, jax.P("data")))
        value = jax.jit(lambda x: bam_jax.bam_loss(x, num_global_crops=2, top_k=4))(z_sharded)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
