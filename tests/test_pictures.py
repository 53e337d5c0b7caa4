"""The picture command writes real PNG files into the workdir."""

import os

import pytest

from bam_jax import pictures
from test_knn_eval import shared_pretrained_workdir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return shared_pretrained_workdir(tmp_path_factory)


def test_pictures_are_non_empty_pngs(pretrained):
    paths = pictures.make_pictures(pretrained)
    assert [os.path.basename(p) for p in paths] == ["curves.png", "attention.png", "target.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 1024


def test_target_rows_sum_to_one_and_own_image_is_masked():
    import jax

    z = jax.random.normal(jax.random.key(0), (6, 3, 8))
    target, source = pictures.attention_target_and_source(
        z, None, num_global_crops=2, num_target_crops=2, sinkhorn_reg=0.05, temperature=0.1,
        sinkhorn_iters=3, positive_masking=True)
    assert target.shape == source.shape == (12, 12)
    for matrix in (target, source):
        assert abs(float(matrix.sum(axis=1).min()) - 1.0) < 1e-5
        assert float(matrix[0, :2].max()) == 0.0 and float(matrix[3, 2:4].max()) == 0.0
