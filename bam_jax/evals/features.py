"""Passes of a frozen network over a whole dataset, sharded over the mesh: eval features (kNN, the
linear probe) and ContrastiveCrop's box pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bam_jax import contrastive_crop, sharding
from bam_jax.data import pipeline


def extract_features(embed_fn, params, model_state, dataset, mesh):
    """Backbone features of one pass over `dataset`, as batch-sharded global arrays.

    Returns (features [N, D], labels [N], mask [N]); N includes the padding of the last batch,
    which `mask` marks False.
    """
    features, labels, masks = [], [], []
    for batch in sharding.device_iterator(dataset, mesh):
        features.append(embed_fn(params, model_state, batch["image"]))
        labels.append(batch["label"])
        masks.append(batch["mask"])
    concat = jax.jit(lambda xs: jnp.concatenate(xs, axis=0))
    return concat(features), concat(labels), concat(masks)


class BoxUpdater:
    """ContrastiveCrop's box pass: every training image, resized to a square, through the
    teacher (the student without one) in eval mode, sharded over the mesh with each process
    reading its own shard; the boxes are then gathered so every process holds the whole table.
    """

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, num_examples: int):
        self._config = config
        self._mesh = mesh
        self._num_examples = num_examples
        self.image_size = config.ccrop.image_size or config.data.global_crop_size

        def boxes(params, model_state, images):
            maps = nnx.merge(graphdef, params, model_state, copy=True).spatial_map(images)
            return contrastive_crop.boxes_from_maps(
                maps, (self.image_size, self.image_size), config.ccrop.box_thresh)

        self._boxes = jax.jit(boxes, out_shardings=sharding.batch_sharding(mesh))

    def update(self, state) -> np.ndarray:
        """The new [num_examples, 4] box table (h_min, w_min, h_max, w_max as fractions)."""
        if state.teacher_params is not None:
            params, model_state = state.teacher_params, state.teacher_model_state
        else:
            params, model_state = state.params, state.model_state
        dataset = pipeline.create_box_dataset(
            self._config.data, image_size=self.image_size,
            global_batch_size=self._config.ccrop.batch_size)
        boxes, indices, masks = [], [], []
        with jax.set_mesh(self._mesh):
            for batch in sharding.device_iterator(dataset, self._mesh):
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
