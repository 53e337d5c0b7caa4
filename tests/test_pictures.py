"""The picture command writes real PNG files into the workdir."""

import os

import pytest

from bam_jax.evals import pictures
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
