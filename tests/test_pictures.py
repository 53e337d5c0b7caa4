"""The picture command writes real PNG files into the workdir."""

import os

import numpy as np
from PIL import Image

from bam_jax.evals import pictures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_pictures_are_non_empty_pngs(pretrained_copy):
    paths = pictures.make_pictures(pretrained_copy)
    assert [os.path.basename(p) for p in paths] == ["curves.png", "attention.png", "target.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 1024
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        # A drawn picture: a real size, and more than a blank canvas (many distinct colours).
        assert min(pixels.shape[:2]) >= 100, (path, pixels.shape)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, path
