"""Passes of a frozen backbone over a dataset: kNN on eval features, ContrastiveCrop boxes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bam_jax import contrastive_crop, input_pipeline, knn


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


class BoxUpdater:
    """ContrastiveCrop's box pass: every training image, resized to a square, through the
    teacher (the student without one) in eval mode, sharded over the mesh with each process
    reading its own shard; the boxes are then gathered so every process holds the whole table.
    """

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, num_examples: int, batch_axes=("data", "fsdp")):
        self._config = config
        self._mesh = mesh
        self._batch_axes = batch_axes
        self._num_examples = num_examples
        self.image_size = config.ccrop.image_size or config.data.global_crop_size

        def boxes(params, model_state, images):
            maps = nnx.merge(graphdef, params, model_state).spatial_map(images)
            return contrastive_crop.boxes_from_maps(
                maps, (self.image_size, self.image_size), config.ccrop.box_thresh)

        self._boxes = jax.jit(boxes, out_shardings=jax.NamedSharding(mesh, jax.P(batch_axes)))

    def update(self, state) -> np.ndarray:
        """The new [num_examples, 4] box table (h_min, w_min, h_max, w_max as fractions)."""
        if state.teacher_params is not None:
            params, model_state = state.teacher_params, state.teacher_model_state
        else:
            params, model_state = state.params, state.model_state
        dataset = input_pipeline.create_box_dataset(
            self._config.data, image_size=self.image_size,
            global_batch_size=self._config.ccrop.batch_size)
        boxes, indices, masks = [], [], []
        with jax.set_mesh(self._mesh):
            for batch in input_pipeline.device_iterator(dataset, self._mesh, self._batch_axes):
                boxes.append(self._boxes(params, model_state, batch["image"]))
                indices.append(batch["index"])
                masks.append(batch["mask"])
            concat = jax.jit(lambda xs: jnp.concatenate(xs, axis=0))
            boxes, indices, masks = (multihost_utils.process_allgather(concat(x), tiled=True)
                                     for x in (boxes, indices, masks))
        table = contrastive_crop.initial_boxes(self._num_examples)
        masks = np.asarray(masks, bool)
        table[np.asarray(indices)[masks]] = np.asarray(boxes)[masks]
        return table
