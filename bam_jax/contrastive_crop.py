"""ContrastiveCrop boxes (Peng et al., CVPR 2022), as the official `contrastive_croping/`.

Every `loc_interval` epochs the teacher looks at each training image, resized to a square, and
its spatial map (a ViT's last-block CLS->patch attention summed over heads; a ConvNet's last
feature map summed over channels, the original paper's choice for convnets) is min-max scaled,
bilinearly upsampled to the image and thresholded: the first and last rows and columns above
the threshold are the image's box. The input pipeline then centres its random-resized crops
inside that box with Beta(alpha, alpha) (`augment.contrastive_crop_windows`).

JAX only: the trainer runs `boxes_from_maps` inside a jitted, sharded pass over the train set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The box every image starts with, and keeps when its map is flat: the whole image.
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's F.interpolate(mode='bilinear', align_corners=False)."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight = source - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - weight)
    np.add.at(matrix, (np.arange(out_size), upper), weight)
    return matrix.astype(np.float32)


def boxes_from_maps(maps: jax.Array, image_size: tuple[int, int], threshold: float) -> jax.Array:
    """Boxes [B, 4] = (h_min, w_min, h_max, w_max) as fractions, from spatial maps [B, h, w].

    As the official `update_box`: min-max scaling (1e-5 in the denominator), bilinear upsampling
    to `image_size`, rows (columns) whose maximum exceeds `threshold`, their first and last index
    divided by the image height (width). A map with nothing above the threshold (a constant map)
    keeps the whole image, where the official code would fail.
    """
    batch, grid_h, grid_w = maps.shape
    height, width = image_size
    flat = maps.reshape(batch, -1).astype(jnp.float32)
    flat = flat - flat.min(axis=1, keepdims=True)
    flat = flat / (flat.max(axis=1, keepdims=True) + 1e-5)
    upsampled = jnp.einsum("hi,bij,wj->bhw", bilinear_matrix(grid_h, height),
                           flat.reshape(batch, grid_h, grid_w), bilinear_matrix(grid_w, width),
                           precision=jax.lax.Precision.HIGHEST)
    rows = upsampled.max(axis=2) > threshold
    cols = upsampled.max(axis=1) > threshold

    def first_and_last(hits):
        first = jnp.argmax(hits, axis=1)
        last = hits.shape[1] - 1 - jnp.argmax(hits[:, ::-1], axis=1)
        return first.astype(jnp.float32) / hits.shape[1], last.astype(jnp.float32) / hits.shape[1]

    h_min, h_max = first_and_last(rows)
    w_min, w_max = first_and_last(cols)
    boxes = jnp.stack([h_min, w_min, h_max, w_max], axis=1)
    found = (rows.any(axis=1) & cols.any(axis=1))[:, None]
    return jnp.where(found, boxes, jnp.asarray(WHOLE_IMAGE, jnp.float32))


def initial_boxes(num_examples: int) -> np.ndarray:
    """The box table before the first update: every image whole (the official init_box)."""
    return np.tile(np.asarray(WHOLE_IMAGE, np.float32), (num_examples, 1))


def box_update_epochs(*, num_epochs: int, warmup_epochs: float, loc_interval: int) -> list[int]:
    """The epochs after which the official loop updates the boxes.

    `main_pretrain.py`: after epoch e (0-based) when e >= warmup_epochs, e is not the last epoch
    and e % loc_interval == 0.
    """
    if loc_interval <= 0:
        return []
    return [e for e in range(num_epochs - 1) if e >= warmup_epochs and e % loc_interval == 0]


def first_box_epoch(*, warmup_epochs: float, loc_interval: int) -> int:
    """The first epoch whose crops use the boxes (official `use_box`: epoch >= max(loc, warmup) + 1)."""
    return int(max(loc_interval, warmup_epochs)) + 1
