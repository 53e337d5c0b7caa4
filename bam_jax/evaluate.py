"""Evaluation of a frozen backbone: features of eval splits, kept on devices, and kNN on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bam_jax import input_pipeline
from bam_jax import knn


def extract_features(embed_fn, params, model_state, dataset, mesh, batch_axes):
    """Backbone features of one pass over `dataset`, as batch-sharded global arrays.

    Returns (features [N, D], labels [N], mask [N]); N includes the padding of the last batch,
    which `mask` marks False.
    """
    features, labels, masks = [], [], []
    for batch in input_pipeline.device_iterator(dataset, mesh, batch_axes):
        features.append(embed_fn(params, model_state, batch["image"]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    concat = jax.jit(lambda xs: jnp.concatenate(xs, axis=0))
    return concat(features), concat(labels), concat(masks)


class KnnEvaluator:
    """Online kNN (k, temperature as DINO) on the student's and the teacher's backbone.

    The bank is a class-balanced `config.knn.train_fraction` of `data.eval_train_split`, chosen
    once; features never leave the devices except for the final per-example votes.
    """

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, batch_axes=("data", "fsdp")):
        self._config = config
        self._mesh = mesh
        self._batch_axes = batch_axes
        self._bank_mask = None

        def embed(params, model_state, images):
            return nnx.merge(graphdef, params, model_state).embed(images).astype(jnp.float32)

        sharding = jax.NamedSharding(mesh, jax.P(batch_axes))
        self._embed = jax.jit(embed, out_shardings=sharding)

    def _dataset(self, split):
        return input_pipeline.create_eval_dataset(
            self._config.data, split, global_batch_size=self._config.knn.batch_size)

    def features(self, params, model_state, split):
        with jax.set_mesh(self._mesh):
            return extract_features(self._embed, params, model_state, self._dataset(split),
                                    self._mesh, self._batch_axes)

    def _knn(self, params, model_state) -> dict[str, float]:
        data = self._config.data
        bank, bank_labels, bank_valid = self.features(params, model_state, data.eval_train_split)
        test, test_labels, test_valid = self.features(params, model_state, data.eval_split)
        if self._bank_mask is None:
            labels = np.asarray(jax.device_get(bank_labels))
            valid = np.asarray(jax.device_get(bank_valid)).astype(bool)
            keep = np.zeros(len(labels), bool)
            real = np.flatnonzero(valid)
            keep[real[knn.balanced_subset_indices(labels[real], self._config.knn.train_fraction,
                                                  seed=self._config.seed)]] = True
            self._num_classes = int(labels[valid].max()) + 1
            self._bank_mask = jax.device_put(keep, bank_valid.sharding)
        return knn.knn_evaluate(
            bank, bank_labels, test, test_labels, num_classes=self._num_classes,
            k=self._config.knn.k, temperature=self._config.knn.temperature, mesh=self._mesh,
            test_mask=test_valid, train_mask=self._bank_mask)

    def evaluate(self, state) -> dict[str, float]:
        results = {f"knn_{k}": v for k, v in self._knn(state.params, state.model_state).items()}
        if state.teacher_params is not None:
            teacher = self._knn(state.teacher_params, state.teacher_model_state)
            results.update({f"teacher_knn_{k}": v for k, v in teacher.items()})
        return results
