"""Video object segmentation: DAVIS metrics, label propagation against the official PyTorch code,
the DAVIS folder format, and the command on a workdir."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bam_jax import checkpoint
from bam_jax.data import video
from bam_jax.evals import video_segmentation as vs

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _square(size, top, left, side):
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_region_similarity_is_iou_outside_void_and_one_for_two_empty_masks():
    a, b = _square(20, 0, 0, 10), _square(20, 5, 5, 10)  # overlap 25, union 175
    assert vs.region_similarity(a, b) == pytest.approx(25 / 175)
    void = np.zeros((20, 20), bool)
    void[10:, :] = True  # hides b's rows 10..14: b keeps 50 pixels, overlap 25, union 100 + 25
    assert vs.region_similarity(a, b, void) == pytest.approx(25 / 125)
    empty = np.zeros((20, 20), bool)
    assert vs.region_similarity(empty, empty) == 1.0
    assert vs.region_similarity(a, empty) == 0.0


def test_boundary_f_measure_tolerance_and_empty_masks():
    truth = _square(100, 30, 30, 40)  # tolerance: ceil(0.008 * 141.4) = 2 pixels
    assert vs.boundary_f_measure(truth, truth) == 1.0
    assert vs.boundary_f_measure(_square(100, 32, 30, 40), truth) == 1.0  # 2 px down: matched
    shifted = vs.boundary_f_measure(_square(100, 36, 36, 40), truth)
    assert 0.0 < shifted < 0.5  # 6 px off: only where the two outlines cross
    empty = np.zeros((100, 100), bool)
    assert vs.boundary_f_measure(empty, empty) == 1.0
    assert vs.boundary_f_measure(empty, truth) == 0.0
    assert vs.boundary_f_measure(truth, empty) == 0.0
    # The toolkit's boundary (seg2bmap): one pixel wide, offset half a pixel towards the origin,
    # so a 3x3 square at (1, 1) has a 4x4 ring from (0, 0) to (3, 3).
    ring = np.zeros((6, 6), bool)
    ring[0:4, 0:4] = True
    ring[1:3, 1:3] = False
    np.testing.assert_array_equal(vs._boundary(_square(6, 1, 1, 3)), ring)


def test_sequence_scores_skip_the_first_and_last_frames():
    truths = np.zeros((4, 10, 10), np.uint8)
    truths[:, 2:6, 2:6] = 1
    predictions = truths.copy()
    predictions[0] = predictions[3] = 0  # wrong on the frames the benchmark ignores
    predictions[2, 2:6, 2:4] = 0  # half of the object on frame 2
    j, f = vs.sequence_scores(predictions, truths, num_objects=1)
    assert j[0] == pytest.approx((1.0 + 0.5) / 2)
    assert f[0] < 1.0
    with pytest.raises(ValueError, match="at least 3 frames"):
        vs.sequence_scores(predictions[:2], truths[:2], 1)


# --- The official propagation, transcribed from eval_video_segmentation.py (torch, CPU). ---

def _official_mask(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h:
                        continue
                    if j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def _official_propagation(feat_tar, feats, segs, h, w, t, size, topk):
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    sources = F.normalize(torch.stack([f.T for f in feats]), dim=1, p=2)
    n = len(feats)
    aff = torch.exp(torch.bmm(feat_tar.unsqueeze(0).repeat(n, 1, 1), sources) / t)
    aff *= _official_mask(h, w, size).unsqueeze(0).repeat(n, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(segs)
    c = segs.shape[1]
    segs = segs.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T
    return torch.mm(segs, aff).reshape(1, c, h, w)


def _official_upsample_argmax(seg, stride):
    up = F.interpolate(seg, scale_factor=stride, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    for cnt in range(up.shape[0]):
        if up[cnt].max() > 0:
            up[cnt] = up[cnt] - up[cnt].min()
            up[cnt] = up[cnt] / up[cnt].max()
    return torch.max(up, dim=0)[1].numpy()


@pytest.mark.xla_optimized  # against a reference at tight tolerances
def test_propagation_matches_the_official_code():
    rng = np.random.default_rng(0)
    h, w, d, c, n_last, size, topk, stride = 5, 6, 8, 3, 3, 2, 5, 4
    target = rng.normal(size=(h * w, d)).astype(np.float32)
    context = rng.normal(size=(1 + n_last, h * w, d)).astype(np.float32)
    labels = rng.dirichlet(np.ones(c), size=(1 + n_last, h * w)).astype(np.float32)
    for used in (1, 3, 4):  # the first frame alone, a filling queue, a full one
        expected = _official_propagation(
            torch.from_numpy(target), [torch.from_numpy(f) for f in context[:used]],
            [torch.from_numpy(l.T.reshape(1, c, h, w)) for l in labels[:used]],
            h, w, 0.1, size, topk)
        got = vs.propagate(target, context, labels, np.arange(1 + n_last) < used,
                           vs.neighbourhood_mask(h, w, size), temperature=0.1, topk=topk)
        np.testing.assert_allclose(np.asarray(got).T.reshape(1, c, h, w), expected.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            np.asarray(vs.labels_to_mask(np.asarray(got).reshape(h, w, c), stride)),
            _official_upsample_argmax(expected, stride))
    np.testing.assert_array_equal(vs.neighbourhood_mask(h, w, size),
                                  _official_mask(h, w, size).numpy().astype(bool))


def test_nearest_resize_is_pils():
    from PIL import Image

    mask = np.random.default_rng(1).integers(0, 4, (7, 9)).astype(np.uint8)
    for height, width in ((30, 17), (4, 5), (7, 9)):
        expected = np.asarray(Image.fromarray(mask).resize((width, height), 0))
        np.testing.assert_array_equal(vs.resize_nearest(mask, height, width), expected)


def test_perfect_features_propagate_every_object_exactly():
    """Features that are the objects' identity (one-hot of the true mask) give J = F = 1."""
    sequence = video.synthetic_digit_videos(num_sequences=1, num_frames=8, size=32)[0]
    num_labels = sequence.num_objects + 1

    class IdentityFeatures:
        stride = 1

        def __call__(self, frames):
            return np.eye(num_labels, dtype=np.float32)[sequence.masks]

    config = vs.overrides_config()
    config.video.size_mask_neighborhood = 3
    predictions = vs.segment_sequence(sequence, IdentityFeatures(), config, 1, (0.5,), (0.5,))
    np.testing.assert_array_equal(predictions, sequence.masks)
    j, f = vs.sequence_scores(predictions, sequence.masks, sequence.num_objects)
    assert j.tolist() == [1.0] * sequence.num_objects and f.tolist() == j.tolist()


def test_synthetic_videos_are_seeded_occluding_moving_digits_and_roundtrip_davis_folders(
        tmp_path):
    first = video.synthetic_digit_videos(num_sequences=2, num_frames=6, size=48, seed=3)
    again = video.synthetic_digit_videos(num_sequences=2, num_frames=6, size=48, seed=3)
    other = video.synthetic_digit_videos(num_sequences=2, num_frames=6, size=48, seed=4)
    np.testing.assert_array_equal(first[1].frames, again[1].frames)
    assert not np.array_equal(first[0].masks, other[0].masks)
    assert [s.num_objects for s in first] == [2, 3]
    masks = first[0].masks
    assert not np.array_equal(masks[0], masks[-1])  # the digits move
    assert first[0].frames.shape == (6, 48, 48, 1) and masks.max() == 2

    video.write_davis_folder(first, str(tmp_path))
    read = list(video.read_davis_folder(str(tmp_path), "val"))
    assert [s.name for s in read] == ["digits00", "digits01"]
    np.testing.assert_array_equal(read[1].masks, first[1].masks)  # indexed PNGs are lossless
    assert read[1].frames.shape == (6, 48, 48, 3)  # DAVIS frames are read as RGB JPEGs
    assert np.abs(read[1].frames[..., 0].astype(int) - first[1].frames[..., 0]).mean() < 2
    only = list(video.read_davis_folder(str(tmp_path), "val", ("digits01",)))
    assert [s.name for s in only] == ["digits01"]
    with pytest.raises(ValueError, match="not in"):
        list(video.read_davis_folder(str(tmp_path), "val", ("nope",)))
    with pytest.raises(ValueError, match="must be a DAVIS-2017 root"):
        list(video.read_davis_folder(str(tmp_path / "missing"), "val"))
    os.remove(tmp_path / "Annotations" / "480p" / "digits00" / "00003.png")
    with pytest.raises(ValueError, match="lacks the annotations"):
        list(video.read_davis_folder(str(tmp_path), "val"))


def test_palette_is_pascal_vocs():
    palette = video.davis_palette()
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[255].tolist() == [224, 224, 192]


@pytest.fixture
def default_workdir(tmp_path):
    """The embedded default's config.json without a checkpoint (evaluated at --random_init)."""
    from configs import default

    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoint.save_config(default.get_config(), str(workdir))
    return str(workdir)


def test_evaluation_writes_masks_csv_pictures_and_metrics(default_workdir, tmp_path):
    overrides = vs.overrides_config()
    overrides.video.synthetic_sequences = 2
    overrides.video.synthetic_frames = 5
    result = vs.evaluate(default_workdir, overrides, random_init=True)
    assert result["step"] == 0
    assert 0.0 < result["davis_init_j_mean"] <= 1.0 and 0.0 < result["davis_init_f_mean"] <= 1.0
    out = os.path.join(default_workdir, "video_segmentation_init")
    masks = video.read_indexed_png(video.epath.Path(out) / "digits01" / "00004.png")
    assert masks.shape == (64, 64) and set(np.unique(masks)) <= {0, 1, 2, 3}
    with open(os.path.join(out, "per_sequence.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["sequence"], r["object"]) for r in rows] == [
        ("digits00", "1"), ("digits00", "2"), ("digits01", "1"), ("digits01", "2"),
        ("digits01", "3")]
    mean_j = np.mean([float(r["j_mean"]) for r in rows])
    assert mean_j == pytest.approx(result["davis_init_j_mean"], abs=1e-3)
    from PIL import Image

    assert Image.open(os.path.join(out, "digits00.png")).size == (5 * 64, 2 * 64)
    with open(os.path.join(default_workdir, "metrics.jsonl")) as f:
        logged = json.loads(f.readlines()[-1])
    assert logged["davis_init_jf_mean"] == pytest.approx(result["davis_init_jf_mean"])


@pytest.mark.slow
def test_cli_error_lines(default_workdir, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "bam_jax.evals.video_segmentation", *args],
            capture_output=True, text=True,
            cwd=os.path.join(os.path.dirname(__file__), os.pardir),
            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)

    missing = run(f"--workdir={tmp_path / 'nothing'}")
    no_data = run(f"--workdir={default_workdir}", "--random_init",
                  "--config.video.source=folder", f"--config.video.folder={tmp_path / 'davis'}")
    for result, expected in ((missing, "config.json does not exist"),
                             (no_data, "must be a DAVIS-2017 root")):
        errors = [line for line in result.stderr.splitlines()
                  if "bam_jax.evals.video_segmentation: error:" in line]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], \
            result.stderr[-2000:]


def test_vit_patch_features_are_the_normed_last_block_patch_tokens():
    """Their mean over the grid is the average-pool part of the linear-probe features."""
    import jax
    from flax import nnx

    from bam_jax.models import vit

    model = vit.VisionTransformer(image_size=32, patch_size=8, in_channels=1, width=32, depth=2,
                                  num_heads=2, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 48, 32, 1))  # another size than built for
    patches = model.patch_features(images)
    assert patches.shape == (2, 6, 4, 32) and model.feature_stride == 8
    pooled = model.features(images, avgpool=True)[:, 32:]
    np.testing.assert_allclose(patches.mean(axis=(1, 2)), pooled, rtol=1e-5, atol=1e-5)


def test_tfds_davis_reader(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        sequences = list(video.read_davis_tfds("davis/480p", "validation", None))
        assert len(sequences) == 2 and sequences[0].name != sequences[1].name
        assert sequences[0].frames.ndim == 4 and sequences[0].frames.shape[-1] == 3
        assert sequences[0].masks.ndim == 3 and sequences[0].masks.dtype == np.uint8
        named = list(video.read_davis_tfds("davis/480p", "validation", None,
                                           (sequences[1].name,)))
        assert [s.name for s in named] == [sequences[1].name]
    with pytest.raises(ValueError, match="is not prepared in .*tfds build davis/480p"):
        list(video.read_davis_tfds("davis/480p", "validation", str(tmp_path)))
