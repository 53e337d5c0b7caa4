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

`KnnEvaluator` is the trainer's online kNN; run as a module, this file evaluates a finished
pretraining workdir the same way, `python -m bam_jax.evals.knn --workdir=DIR`: the newest readable
checkpoint (student, and teacher when the run has one) is restored onto this machine's mesh.
Options override the run's config.json:

    python -m bam_jax.evals.knn --workdir=DIR --config.knn.k=200 --config.knn.temperature=0.1
    python -m bam_jax.evals.knn --workdir=DIR --random_init   # the same backbone at init

Results are printed and appended to DIR/metrics.jsonl under `offline_*` keys (the online kNN of
training writes `knn_*`), at the checkpoint's step.
"""
from __future__ import annotations

import functools
import math


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bam_jax import checkpoint as checkpoint_lib
from bam_jax import cli, sharding, train
from bam_jax.data import pipeline
from bam_jax.evals import features


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


class KnnEvaluator:
    """Online kNN (k, temperature as DINO) on the student's and the teacher's backbone.

    The bank is a class-balanced `config.knn.train_fraction` of `data.eval_train_split`, chosen
    once; features never leave the devices except for the final per-example votes.
    """

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh):
        self._config = config
        self._mesh = mesh
        self._bank_mask = None

        def embed(params, model_state, images):
            return nnx.merge(graphdef, params, model_state).embed(images).astype(jnp.float32)

        self._embed = jax.jit(embed, out_shardings=sharding.batch_sharding(mesh))

    def _dataset(self, split):
        return pipeline.create_eval_dataset(
            self._config.data, split, global_batch_size=self._config.knn.batch_size)

    def features(self, params, model_state, split):
        with jax.set_mesh(self._mesh):
            return features.extract_features(self._embed, params, model_state,
                                             self._dataset(split), self._mesh)

    def _knn(self, params, model_state) -> dict[str, float]:
        data = self._config.data
        bank, bank_labels, bank_valid = self.features(params, model_state, data.eval_train_split)
        test, test_labels, test_valid = self.features(params, model_state, data.eval_split)
        if self._bank_mask is None:
            labels = np.asarray(jax.device_get(bank_labels))
            valid = np.asarray(jax.device_get(bank_valid)).astype(bool)
            keep = np.zeros(len(labels), bool)
            real = np.flatnonzero(valid)
            keep[real[balanced_subset_indices(labels[real], self._config.knn.train_fraction,
                                             seed=self._config.seed)]] = True
            self._num_classes = int(labels[valid].max()) + 1
            self._bank_mask = jax.device_put(keep, bank_valid.sharding)
        return knn_evaluate(
            bank, bank_labels, test, test_labels, num_classes=self._num_classes,
            k=self._config.knn.k, temperature=self._config.knn.temperature, mesh=self._mesh,
            test_mask=test_valid, train_mask=self._bank_mask)

    def evaluate(self, state) -> dict[str, float]:
        results = {f"knn_{k}": v for k, v in self._knn(state.params, state.model_state).items()}
        if state.teacher_params is not None:
            teacher = self._knn(state.teacher_params, state.teacher_model_state)
            results.update({f"teacher_knn_{k}": v for k, v in teacher.items()})
        return results


def overrides_config() -> ml_collections.ConfigDict:
    """The fields `--config.*` may override; None keeps the value of the run's config.json."""

    def keep(field_type):
        return ml_collections.FieldReference(None, field_type=field_type)

    return ml_collections.ConfigDict(dict(
        knn=dict(k=keep(int), temperature=keep(float), train_fraction=keep(float),
                 batch_size=keep(int)),
        mesh=dict(num_devices=keep(int), fsdp=keep(int)),
        # backbone="pixels" with --random_init: the raw-pixel baseline on the run's data.
        model=dict(backbone=keep(str)),
        data=dict(data_dir=keep(str), folder=keep(str), eval_train_split=keep(str),
                  eval_split=keep(str)),
    ))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for group, fields in overrides.items():
        for name, value in fields.items():
            if value is not None:
                config[group][name] = value
    return config


def knn_eval(workdir: str, overrides: ml_collections.ConfigDict | None = None, *,
             random_init: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 of the student (and teacher) of `workdir`; also appended to metrics.jsonl.

    Returns the logged row: `offline_knn_top1`, ..., `offline_teacher_knn_top1`, ... (with
    `offline_init_` instead of `offline_` for `random_init`), `offline_knn_k` and `step`.
    """
    config = checkpoint_lib.read_run_config(workdir)
    if overrides is not None:
        config = apply_overrides(config, overrides)
    mesh = sharding.make_mesh(config)
    graphdef, state, step = train.restore_run(
        config, workdir, mesh, fsdp_min_size=config.mesh.fsdp_min_size,
        random_init=random_init, random_init_flag="--random_init")
    evaluator = KnnEvaluator(config, graphdef, mesh)
    prefix = "offline_init_" if random_init else "offline_"
    results = {prefix + k: v for k, v in evaluator.evaluate(state).items()}
    results[prefix + "knn_k"] = config.knn.k
    logger = train.MetricsLogger(workdir, total_steps=step, global_batch=config.knn.batch_size)
    logger.write(step, results)
    logger.close()
    print(f"kNN (k={config.knn.k}, T={config.knn.temperature}) of {workdir} at step {step}"
          + (" (random init)" if random_init else "") + ": "
          + "  ".join(f"{k} {v:.2f}" for k, v in results.items() if not k.endswith("_k")),
          flush=True)
    return dict(results, step=step)


def _main(argv, config_flag, workdir_flag, random_init_flag):
    del argv
    cli.run_or_exit("bam_jax.evals.knn", knn_eval, workdir_flag.value, config_flag.value,
                    random_init=random_init_flag.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _config = config_flags.DEFINE_config_dict(
        "config", overrides_config(), "Overrides of the run's config.json, e.g. --config.knn.k=200")
    _workdir = flags.DEFINE_string("workdir", None, "A pretraining workdir (python -m "
                                   "bam_jax.main --workdir).", required=True)
    _random_init = flags.DEFINE_bool("random_init", False, "Evaluate the same backbone at its "
                                     "initialisation instead of the newest checkpoint.")
    app.run(lambda argv: _main(argv, _config, _workdir, _random_init),
            flags_parser=cli.flags_parser("bam_jax.evals.knn"))
