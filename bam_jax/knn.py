"""Weighted k-nearest-neighbour evaluation (DINO / official BAM online kNN).

Cosine similarity between L2-normalised features, the k most similar bank
entries vote for their label with weight exp(sim / T). Everything runs in JAX
on the devices holding the features:

* the test set is processed in fixed-size chunks with ``lax.map``, so only a
  [chunk, bank] similarity block exists at a time;
* with a ``mesh`` the bank rows are sharded over all mesh axes: each device
  takes the top-k of its own rows, the k candidates of every device are
  all-gathered (k values per test example per device) and the global top-k is
  taken from them, so the bank never has to live on one device or host.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _local_topk(queries, bank, bank_labels, bank_valid, k):
    """Top-k (similarity, label) of normalised queries against a (local) bank; invalid rows never win."""
    sims = queries @ bank.T
    sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
    vals, idx = jax.lax.top_k(sims, min(k, bank.shape[0]))
    return vals, bank_labels[idx]


def _vote(sims, labels, *, num_classes, temperature, n_ranked):
    """Weighted vote -> the n_ranked best classes per query, best first."""
    weights = jnp.exp(sims / temperature)  # exp(-inf) = 0 for padding rows
    scores = jnp.einsum('qk,qkc->qc', weights, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
    return jax.lax.top_k(scores, n_ranked)[1]


@functools.lru_cache(maxsize=None)
def _build_classifier(mesh, *, num_classes, k, temperature, n_ranked):
    """Jitted fn(bank, bank_labels, bank_valid, queries[n_chunks, chunk, D]) -> [n_chunks*chunk, n_ranked]."""

    def classify(bank, bank_labels, bank_valid, queries):
        bank = _normalize(bank)

        def one_chunk(q):
            sims, labels = _local_topk(_normalize(q), bank, bank_labels, bank_valid, k)
            if mesh is not None:
                axes = mesh.axis_names
                # [devices, chunk, k_local] -> [chunk, devices * k_local], then the global top-k.
                sims = jnp.concatenate(jax.lax.all_gather(sims, axes), axis=-1)
                labels = jnp.concatenate(jax.lax.all_gather(labels, axes), axis=-1)
                sims, pick = jax.lax.top_k(sims, k)
                labels = jnp.take_along_axis(labels, pick, axis=-1)
            return _vote(sims, labels, num_classes=num_classes, temperature=temperature,
                         n_ranked=n_ranked)

        return jax.lax.map(one_chunk, queries).reshape(-1, n_ranked)

    if mesh is not None:
        rows = P(mesh.axis_names)
        # After the all-gather every device holds the same candidates, so the output is replicated;
        # the static varying-axes check cannot see that through all_gather, hence check_vma=False.
        classify = jax.shard_map(classify, mesh=mesh, in_specs=(rows, rows, rows, P()), out_specs=P(),
                                 check_vma=False)
    return jax.jit(classify)


def knn_classify(train_features, train_labels, test_features, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_size: int = 256, mesh: Mesh | None = None,
                 train_mask=None) -> jax.Array:
    """Class ranking [N_test, min(5, num_classes)] (int32, best first) by weighted kNN vote.

    ``train_features`` [N_train, D] / ``train_labels`` [N_train] form the bank;
    with ``mesh`` they are split row-wise over all mesh axes (N_train must be
    divisible by the device count; pad and pass ``train_mask`` = False on the
    padding rows, which then never count as neighbours). Test features are
    used replicated. Features need not be normalised.
    """
    n_train = train_features.shape[0]
    if train_mask is None:
        train_mask = jnp.ones((n_train,), bool)
    n_ranked = min(5, num_classes)
    n_test = test_features.shape[0]
    chunk = max(1, min(chunk_size, n_test))
    n_chunks = math.ceil(n_test / chunk)
    queries = jnp.pad(jnp.asarray(test_features), ((0, n_chunks * chunk - n_test), (0, 0)))
    queries = queries.reshape(n_chunks, chunk, -1)
    bank_labels = jnp.asarray(train_labels).astype(jnp.int32)
    bank_valid = jnp.asarray(train_mask).astype(bool)
    if mesh is not None:
        if n_train % mesh.size:
            raise ValueError(f'bank size {n_train} not divisible by {mesh.size} devices; pad it and '
                             'pass train_mask')
        rows = NamedSharding(mesh, P(mesh.axis_names))
        train_features, bank_labels, bank_valid = jax.device_put(
            (train_features, bank_labels, bank_valid), rows)
        queries = jax.device_put(queries, NamedSharding(mesh, P()))
    fn = _build_classifier(mesh, num_classes=num_classes, k=k, temperature=float(temperature),
                           n_ranked=n_ranked)
    return fn(train_features, bank_labels, bank_valid, queries)[:n_test]


def knn_evaluate(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 k: int = 20, temperature: float = 0.07, mesh: Mesh | None = None, test_mask=None,
                 train_mask=None, chunk_size: int = 256) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy in percent over the test examples where ``test_mask`` is True.

    Like the official evaluation, top-5 looks at the first min(5, k) ranked
    classes (with fewer neighbours the rest of the ranking is arbitrary).
    """
    ranked = knn_classify(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                          temperature=temperature, chunk_size=chunk_size, mesh=mesh,
                          train_mask=train_mask)
    ranked = np.asarray(jax.device_get(ranked))
    labels = np.asarray(jax.device_get(test_labels)).astype(np.int64)
    mask = (np.ones(len(labels), bool) if test_mask is None
            else np.asarray(jax.device_get(test_mask)).astype(bool))
    hits = ranked == labels[:, None]
    total = max(int(mask.sum()), 1)
    top1 = hits[:, 0][mask].sum()
    top5 = hits[:, :min(5, k)].any(axis=1)[mask].sum()
    return {'top1': 100.0 * float(top1) / total, 'top5': 100.0 * float(top5) / total}


def balanced_subset_indices(labels, fraction: float | None, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced random subset holding ~``fraction`` of the data (the kNN bank).

    As in the official ``knn_train_fraction``: floor(N * fraction) samples split
    equally over the classes (floor per class), drawn without replacement and
    shuffled. A fraction outside (0, 1) (or None) means the whole set.
    """
    labels = np.asarray(labels)
    if not fraction or fraction <= 0 or fraction >= 1:
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = math.floor(math.floor(len(labels) * fraction) / len(classes))
    rng = np.random.default_rng(seed)
    picks = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f'class {c} has {len(members)} samples, fewer than the {per_class} requested')
        picks.append(rng.choice(members, per_class, replace=False))
    subset = np.concatenate(picks)
    rng.shuffle(subset)
    return subset
