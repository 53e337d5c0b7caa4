"""The BAM loss (Balanced self-Attention Matching), in JAX alone.

Shapes follow one convention: `z` is `[batch, views, dim]`, views `0..G-1` are the global crops.
Columns ("targets") are views `0..T-1` of every image of the *global* batch, so every row
attends over `B_global * T` columns, excluding the columns of its own image (positive masking).

The single-device definition is the whole contract. With `axis_name` the function runs inside
`jax.shard_map` on this device's images: columns are all-gathered, the Sinkhorn column sums are
reduced over the axis, and each device only ever holds its local rows x global columns; the
returned loss and metrics are local means whose `jax.lax.pmean` over the axis equals the
single-device values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None


def _normalize(x: jax.Array) -> jax.Array:
    """L2-normalise the last axis in float32 (as torch's F.normalize, eps 1e-12)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _axis_index(axis_name: AxisName) -> jax.Array:
    """This device's position along (possibly several) mesh axes, 0 without an axis."""
    axes = _axis_tuple(axis_name)
    return jax.lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)


def _global_logsumexp_over_rows(log_k: jax.Array, axis_name: AxisName) -> jax.Array:
    """log of every column's sum over all rows on all devices; `log_k` is `[..., C]`."""
    rows = tuple(range(log_k.ndim - 1))
    col_max = jnp.max(log_k, axis=rows)
    axes = _axis_tuple(axis_name)
    if axes:
        col_max = jax.lax.pmax(col_max, axes)
    col_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(col_max), col_max, 0.0))
    col_sum = jnp.sum(jnp.exp(log_k - col_max), axis=rows)
    if axes:
        col_sum = jax.lax.psum(col_sum, axes)
    return col_max + jnp.log(col_sum)


def sinkhorn_target(
    scores: jax.Array,
    *,
    sinkhorn_reg: float | jax.Array,
    sinkhorn_iters: int = 3,
    mask: jax.Array | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Balanced attention target of a score matrix, without gradient.

    `scores` is `[..., C]`: all leading axes are rows (local rows under `axis_name`), the last axis
    the C columns, which every device holds whole. `mask` (broadcastable, True = excluded) marks
    entries whose probability is exactly 0.

    Maths (the official code's, in the log domain so that small eps cannot underflow to 0/0):
    K = exp(S/eps) with masked entries 0; `sinkhorn_iters` times scale every column to the same
    sum (over all rows on all devices) and then every row to the same sum; finally every row is
    scaled to sum 1. Constant factors (the official total-mass normalisation and the marginals
    r, c) cancel in this sequence, so only the shapes of the scalings matter.
    Returns float32 P of the shape of `scores`, rows summing to 1.
    """
    log_k = jax.lax.stop_gradient(scores).astype(jnp.float32) / sinkhorn_reg
    if mask is not None:
        log_k = jnp.where(mask, -jnp.inf, log_k)
    for _ in range(sinkhorn_iters):
        log_k = log_k - _global_logsumexp_over_rows(log_k, axis_name)
        log_k = log_k - jax.nn.logsumexp(log_k, axis=-1, keepdims=True)
    # The last row step already leaves rows summing to 1; with zero iterations this is the
    # official final row normalisation on its own.
    log_k = log_k - jax.nn.logsumexp(log_k, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(jnp.exp(log_k))


def _keep_top_k(p_global: jax.Array, top_k: int) -> jax.Array:
    """Keep, in every global view's row, the top_k columns of the image's view-averaged target."""
    if top_k >= p_global.shape[-1]:
        return p_global
    average = jnp.mean(p_global, axis=1)  # [B, C]
    # A threshold at the k-th largest value instead of a scatter of the top-k indices: equal
    # except for exact ties, which only happen among zeros, and zeros add nothing to the target.
    kth_value = jax.lax.top_k(average, top_k)[0][:, -1:]
    kept = jnp.where((average >= kth_value)[:, None, :], p_global, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def _entropy(p: jax.Array, log_p: jax.Array) -> jax.Array:
    """Mean row entropy in nats, with 0 log 0 = 0."""
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1))


def _explicit_mesh_axes(x: jax.Array) -> tuple[str, ...]:
    """Mesh axes of type Explicit that shard `x` (empty outside such a mesh)."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == jax.sharding.AxisType.Explicit)


def bam_loss_and_metrics(z: jax.Array, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`bam_loss` plus the diagnostics a trainer logs, from the same pass.

    Metrics (float32 scalars; under `axis_name` local means whose pmean is the global value):
      target_entropy   mean entropy of the balanced target rows P (global views)
      source_entropy   mean entropy of the source softmax rows (all views)
      uniform_entropy  ln(#unmasked columns): the source entropy of a collapsed model
      column_balance   coefficient of variation of P's column sums (0 = perfectly balanced)
      mean_similarity  mean cosine of rows to unmasked columns (-> 1 when embeddings collapse)
    """
    explicit_axes = _explicit_mesh_axes(z) if kwargs.get("axis_name") is None else ()
    if explicit_axes:
        # Under Explicit mesh axes every contraction over the sharded batch would need its
        # output sharding spelled out; the loss is a scalar, so let the partitioner choose.
        return jax.sharding.auto_axes(
            lambda x, **kw: _loss_and_metrics(x, **kw), axes=explicit_axes,
            out_sharding=jax.P())(z, **kwargs)
    return _loss_and_metrics(z, **kwargs)


class AttentionMatrices(NamedTuple):
    """What the loss compares, for this device's images (C = global columns)."""

    target: jax.Array  # P [B, G, C]: balanced target of the global views (after top-k)
    log_source: jax.Array  # log A [B, V, C]: log-softmax attention of every view
    scores: jax.Array  # S [B, V, C]: cosine similarities
    mask: jax.Array  # [B, 1, C]: True on the image's own columns (positive masking)


def attention_matrices(
    z: jax.Array,
    *,
    num_global_crops: int,
    num_target_crops: int | None = None,
    z_teacher: jax.Array | None = None,
    sinkhorn_reg: float | jax.Array = 0.05,
    temperature: float | jax.Array = 0.1,
    sinkhorn_iters: int = 3,
    top_k: int = 0,
    positive_masking: bool = True,
    axis_name: AxisName = None,
) -> AttentionMatrices:
    """The balanced target P and the source attention A of `bam_loss` (arguments as there).

    Sinkhorn runs over the rows of *all* views (the teacher's when given), as the official code
    does, and P keeps the global views' rows.
    """
    if z.ndim != 3:
        raise ValueError(f"z must be [batch, views, dim], got shape {z.shape}")
    batch, num_views, _ = z.shape
    num_global = num_global_crops
    num_target = num_global if num_target_crops is None else num_target_crops
    if not 1 <= num_global <= num_views:
        raise ValueError(f"num_global_crops={num_global} must be in [1, {num_views}] (views of z)")
    column_source = z if z_teacher is None else z_teacher
    if not 1 <= num_target <= column_source.shape[1]:
        raise ValueError(
            f"num_target_crops={num_target} must be in [1, {column_source.shape[1]}]")
    if z_teacher is not None and (z_teacher.shape[0] != batch or z_teacher.shape[1] < num_global):
        raise ValueError(
            f"z_teacher {z_teacher.shape} must hold the same images as z {z.shape} and at least "
            f"the {num_global} global views")

    z = _normalize(z)
    z_t = None if z_teacher is None else _normalize(jax.lax.stop_gradient(z_teacher))
    columns = (z if z_t is None else z_t)[:, :num_target]  # [B, T, D]
    axes = _axis_tuple(axis_name)
    if axes:
        columns = jax.lax.all_gather(columns, axes, axis=0, tiled=True)
    global_batch = columns.shape[0]
    columns = columns.reshape(global_batch * num_target, -1)  # column c = image c // T
    num_columns = columns.shape[0]
    if positive_masking and global_batch < 2:
        raise ValueError("positive masking needs at least 2 images in the global batch")

    scores = jnp.einsum("bvd,cd->bvc", z, columns)
    if positive_masking:
        row_image = _axis_index(axis_name) * batch + jnp.arange(batch)
        column_image = jnp.arange(num_columns) // num_target
        mask = (row_image[:, None] == column_image[None, :])[:, None, :]  # [B, 1, C]
    else:
        mask = jnp.zeros((1, 1, num_columns), bool)

    target_scores = scores if z_t is None else jnp.einsum("bvd,cd->bvc", z_t, columns)
    p = sinkhorn_target(target_scores, sinkhorn_reg=sinkhorn_reg, sinkhorn_iters=sinkhorn_iters,
                        mask=mask, axis_name=axis_name)[:, :num_global]  # [B, G, C]
    if top_k > 0:
        p = _keep_top_k(p, top_k)
    log_a = jax.nn.log_softmax(jnp.where(mask, -jnp.inf, scores / temperature), axis=-1)
    return AttentionMatrices(jax.lax.stop_gradient(p), log_a, scores, mask)


def _loss_and_metrics(z: jax.Array, *, axis_name: AxisName = None,
                      **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    p, log_a, scores, mask = attention_matrices(z, axis_name=axis_name, **kwargs)
    batch, num_views, num_columns = scores.shape
    num_global = p.shape[1]
    # Cross-entropy of every (target global view g, source view v) pair, averaged over images.
    # Masked entries carry P = 0 exactly and log A = -inf; zeroing log A there avoids 0 * inf.
    log_a_finite = jnp.where(mask, 0.0, log_a)
    cross_entropy = -jnp.einsum("bgc,bvc->gv", p, log_a_finite) / batch  # [G, V]
    if num_views > 1:
        pair_weight = 1.0 - jnp.eye(num_global, num_views)
        pair_weight = pair_weight / (num_views - 1)
    else:
        pair_weight = jnp.ones((num_global, num_views))
    loss = jnp.sum(cross_entropy * pair_weight) / num_global

    column_sums = jnp.sum(p, axis=(0, 1))
    axes = _axis_tuple(axis_name)
    if axes:
        column_sums = jax.lax.psum(column_sums, axes)
    unmasked = ~jnp.broadcast_to(mask, scores.shape)
    # Each row masks exactly its own image's T columns.
    num_target = kwargs.get("num_target_crops") or kwargs["num_global_crops"]
    num_unmasked = num_columns - (num_target if kwargs.get("positive_masking", True) else 0)
    metrics = {
        "target_entropy": _entropy(p, jnp.log(jnp.where(p > 0, p, 1.0))),
        "source_entropy": _entropy(jnp.exp(log_a), log_a),
        "uniform_entropy": jnp.log(jnp.float32(num_unmasked)),
        "column_balance": jnp.std(column_sums) / jnp.mean(column_sums),
        "mean_similarity": jnp.sum(jnp.where(unmasked, scores, 0.0)) / jnp.sum(unmasked),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def bam_loss(
    z: jax.Array,
    *,
    num_global_crops: int,
    num_target_crops: int | None = None,
    z_teacher: jax.Array | None = None,
    sinkhorn_reg: float | jax.Array = 0.05,
    temperature: float | jax.Array = 0.1,
    sinkhorn_iters: int = 3,
    top_k: int = 0,
    positive_masking: bool = True,
    axis_name: AxisName = None,
) -> jax.Array:
    """BAM loss of projector outputs `z` `[batch, views, dim]` (any float dtype; float32 maths).

    The cross-entropy between each global view's balanced (Sinkhorn) self-attention target and
    every other view's softmax self-attention, over the global views of all images in the batch.
    `z_teacher` (`[batch, views_t, dim]`, e.g. an EMA teacher's outputs) supplies the columns and
    the target rows when given. `sinkhorn_reg` (eps) and `temperature` (tau) may be traced.
    `axis_name`: call inside `jax.shard_map` with `z` holding this device's images; then
    `jax.lax.pmean(loss, axis_name)` is the single-device loss of the gathered batch.
    """
    loss, _ = bam_loss_and_metrics(
        z, num_global_crops=num_global_crops, num_target_crops=num_target_crops,
        z_teacher=z_teacher, sinkhorn_reg=sinkhorn_reg, temperature=temperature,
        sinkhorn_iters=sinkhorn_iters, top_k=top_k, positive_masking=positive_masking,
        axis_name=axis_name)
    return loss


def sharded_bam_loss_and_metrics(
    z: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: AxisName = "data",
    z_teacher: jax.Array | None = None,
    **loss_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`bam_loss_and_metrics` on a batch sharded over `batch_axes` of `mesh`, via shard_map.

    Each device materialises only its local rows x global columns (plain jit over the global
    matrix would replicate it). Returns the global loss and metrics (replicated scalars).
    """
    spec = jax.sharding.PartitionSpec(batch_axes)
    replicated = jax.sharding.PartitionSpec()

    def local(z_local, *teacher_local):
        loss, metrics = bam_loss_and_metrics(
            z_local, z_teacher=teacher_local[0] if teacher_local else None,
            axis_name=batch_axes, **loss_kwargs)
        return jax.lax.pmean((loss, metrics), batch_axes)

    args = (z,) if z_teacher is None else (z, z_teacher)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args),
                         out_specs=(replicated, replicated))(*args)
