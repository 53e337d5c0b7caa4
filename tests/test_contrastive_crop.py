"""ContrastiveCrop boxes against the official update_box (PyTorch) and by construction."""

import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax import contrastive_crop

# Compared with PyTorch references at tight tolerances: the optimized programs users run.
pytestmark = pytest.mark.xla_optimized


def official_update_box(attn_cls, image_size, t):
    """contrastive_croping_vit.update_box on CLS->patch attention [B, heads, h*w] (square)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    attn = torch.tensor(attn_cls)
    b, nh, n = attn.shape
    side = int(round(n ** 0.5))
    scaled = attn.reshape(b, nh, side, side).sum(1).view(b, -1)
    scaled = scaled - scaled.min(1, keepdim=True)[0]
    scaled = scaled / (scaled.max(1, keepdim=True)[0] + 1e-5)
    scaled = F.interpolate(scaled.view(b, 1, side, side), size=(image_size, image_size),
                           mode="bilinear")
    boxes = []
    for hmap in scaled:
        hmap = hmap.squeeze(0)
        h_filter = (hmap.max(1)[0] > t).int()
        w_filter = (hmap.max(0)[0] > t).int()
        h_min, h_max = torch.nonzero(h_filter).view(-1)[[0, -1]] / image_size
        w_min, w_max = torch.nonzero(w_filter).view(-1)[[0, -1]] / image_size
        boxes.append(torch.tensor([h_min, w_min, h_max, w_max]))
    return torch.stack(boxes).numpy()


def test_bilinear_matrix_is_torchs_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(1, 1, 5, 7)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=(23, 16), mode="bilinear")
    ours = (contrastive_crop.bilinear_matrix(5, 23) @ x[0, 0]
            @ contrastive_crop.bilinear_matrix(7, 16).T)
    np.testing.assert_allclose(ours, expected.numpy()[0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_boxes_equal_the_official_update_box(threshold):
    rng = np.random.default_rng(1)
    heads, side, image = 3, 6, 48
    # Peaked maps (a blob at a random place over a noise floor), so boxes differ between images.
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    maps = []
    for _ in range(16):
        centre = rng.uniform(0, side - 1, size=2)
        blob = np.exp(-((grid - centre) ** 2).sum(-1) / rng.uniform(0.5, 4.0))
        maps.append(blob[None] * rng.uniform(0.5, 1.0, size=(heads, 1, 1))
                    + 0.05 * rng.uniform(size=(heads, side, side)))
    attn = np.stack(maps).reshape(16, heads, side * side).astype(np.float32)
    expected = official_update_box(attn, image, threshold)
    ours = contrastive_crop.boxes_from_maps(
        jnp.asarray(attn.sum(1).reshape(16, side, side)), (image, image), threshold)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-7)
    assert len({tuple(b) for b in expected}) > 8  # the comparison sees many different boxes


def test_a_hot_patch_gives_a_box_around_it_and_a_flat_map_the_whole_image():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 2] = 1.0  # patch row 1, column 2 of a 4x4 grid over 32 px: pixels 8..15, 16..23
    boxes = np.asarray(contrastive_crop.boxes_from_maps(jnp.asarray(maps), (32, 32), 0.1))
    h_min, w_min, h_max, w_max = boxes[0] * 32
    assert 3 <= h_min <= 8 and 15 <= h_max <= 20
    assert 11 <= w_min <= 16 and 23 <= w_max <= 28
    np.testing.assert_array_equal(boxes[1], contrastive_crop.WHOLE_IMAGE)


def test_update_and_use_epochs_follow_the_official_loop():
    # vit_*.slurm: 400 epochs, warmup 40, loc_interval 40.
    epochs = contrastive_crop.box_update_epochs(num_epochs=400, warmup_epochs=40, loc_interval=40)
    assert epochs == list(range(40, 400, 40))
    assert contrastive_crop.first_box_epoch(warmup_epochs=40, loc_interval=40) == 41
    assert contrastive_crop.box_update_epochs(num_epochs=81, warmup_epochs=10,
                                              loc_interval=40) == [40]
