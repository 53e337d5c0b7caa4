"""kNN evaluator: correctness on toy data, sharding/chunking invariance, masking, balanced bank;
the stand-alone kNN of a workdir (`python -m bam_jax.evals.knn`)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from bam_jax.evals import knn as knn_eval
from bam_jax.evals.knn import balanced_subset_indices, knn_classify, knn_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clusters(n_per_class, num_classes, dim, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    feats = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return feats[perm].astype(np.float32), labels[perm].astype(np.int32)


def _reference_scores(train, train_labels, test, num_classes, k, temperature):
    """Plain numpy weighted kNN, the DINO formula: the class scores [N_test, num_classes]."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    idx = np.argsort(-sims, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
    scores = np.zeros((len(test), num_classes))
    for c in range(num_classes):
        scores[:, c] = (w * (train_labels[idx] == c)).sum(1)
    return scores


def test_separable_clusters_are_perfect():
    train, ytr = _clusters(40, 10, 16, seed=0)
    test, yte = _clusters(10, 10, 16, seed=0)  # same centers (same seed), new noise ordering
    res = knn_evaluate(train, ytr, test, yte, num_classes=10, k=20, temperature=0.07)
    assert res == {'top1': 100.0, 'top5': 100.0}


def test_shuffled_labels_give_chance():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(2000, 32)).astype(np.float32)
    test = rng.normal(size=(1000, 32)).astype(np.float32)
    ytr = rng.integers(0, 10, 2000)
    yte = rng.integers(0, 10, 1000)
    res = knn_evaluate(train, ytr, test, yte, num_classes=10, k=20, temperature=0.07)
    assert 5.0 < res['top1'] < 16.0
    assert 40.0 < res['top5'] < 60.0


def test_matches_numpy_reference_and_chunking_is_invisible():
    train, ytr = _clusters(30, 7, 8, seed=2, noise=0.8)
    test, _ = _clusters(9, 7, 8, seed=3, noise=0.8)
    scores = _reference_scores(train, ytr, test, 7, 10, 0.1)
    outs = [np.asarray(knn_classify(train, ytr, test, num_classes=7, k=10, temperature=0.1, chunk_size=c))
            for c in (1, 7, 16, 1000)]
    # The whole top-5 ranking: every rank whose reference score is positive and differs from its
    # neighbours' (classes without a vote tie at 0, in any order) names the reference's class.
    order = np.argsort(-scores, axis=1, kind='stable')
    ranked = np.take_along_axis(scores, order, 1)[:, :6]
    gap_above = np.concatenate([np.full((len(ranked), 1), np.inf), ranked[:, :4] - ranked[:, 1:5]], 1)
    gap_below = ranked[:, :5] - ranked[:, 1:6]
    determined = (ranked[:, :5] > 0) & (gap_above > 1e-6) & (gap_below > 1e-6)
    assert determined.sum() >= 0.5 * determined.size and determined[:, 1:].any()
    np.testing.assert_array_equal(outs[0][determined], order[:, :5][determined])
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_sharded_bank_equals_single_device():
    assert jax.device_count() == 8
    train, ytr = _clusters(40, 12, 16, seed=4, noise=0.7)  # 480 rows -> 60 per device
    test, yte = _clusters(5, 12, 16, seed=5, noise=0.7)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))
    single = knn_classify(train, ytr, test, num_classes=12, k=20, chunk_size=16)
    sharded = knn_classify(train, ytr, test, num_classes=12, k=20, chunk_size=16, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
    r1 = knn_evaluate(train, ytr, test, yte, num_classes=12, k=20, temperature=0.07)
    r2 = knn_evaluate(train, ytr, test, yte, num_classes=12, k=20, temperature=0.07, mesh=mesh)
    assert r1 == r2


def test_sharded_with_fewer_local_rows_than_k():
    train, ytr = _clusters(8, 4, 8, seed=6)  # 32 rows -> 4 per device < k
    test, yte = _clusters(4, 4, 8, seed=6)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    single = knn_classify(train, ytr, test, num_classes=4, k=10)
    sharded = knn_classify(train, ytr, test, num_classes=4, k=10, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_masked_padding_is_excluded():
    train, ytr = _clusters(20, 5, 8, seed=7, noise=0.6)
    test, yte = _clusters(6, 5, 8, seed=8, noise=0.6)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    base = knn_evaluate(train, ytr, test, yte, num_classes=5, k=5, temperature=0.07)

    # Test padding: garbage rows with wrong labels must not count.
    pad_test = np.concatenate([test, test[:5]])
    pad_yte = np.concatenate([yte, (yte[:5] + 1) % 5])
    tmask = np.arange(len(pad_test)) < len(test)
    assert knn_evaluate(train, ytr, pad_test, pad_yte, num_classes=5, k=5, temperature=0.07,
                        test_mask=tmask) == base

    # Bank padding (to a multiple of the device count): exact copies of test points with wrong
    # labels would be the nearest neighbours if they were not masked out.
    n_pad = 8 - len(train) % 8 + 8
    pad_rows = np.resize(test, (n_pad, test.shape[1]))
    pad_train = np.concatenate([train, pad_rows])
    pad_ytr = np.concatenate([ytr, np.zeros(n_pad, np.int32)])
    bmask = np.arange(len(pad_train)) < len(train)
    assert knn_evaluate(pad_train, pad_ytr, test, yte, num_classes=5, k=5, temperature=0.07,
                        train_mask=bmask, mesh=mesh) == base


def test_sharded_bank_size_must_divide_devices():
    train, ytr = _clusters(3, 3, 4, seed=9)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    with pytest.raises(ValueError, match='divisible'):
        knn_classify(train, ytr, train, num_classes=3, k=2, mesh=mesh)


def test_balanced_subset():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([100, 300, 50, 80])])
    rng.shuffle(labels)
    idx = balanced_subset_indices(labels, 0.2, seed=0)
    assert len(np.unique(idx)) == len(idx)
    counts = np.bincount(labels[idx], minlength=4)
    assert (counts == (530 * 0.2) // 4).all()
    np.testing.assert_array_equal(idx, balanced_subset_indices(labels, 0.2, seed=0))
    assert not np.array_equal(idx, balanced_subset_indices(labels, 0.2, seed=1))
    np.testing.assert_array_equal(balanced_subset_indices(labels, 1.0, 0), np.arange(len(labels)))
    np.testing.assert_array_equal(balanced_subset_indices(labels, None, 0), np.arange(len(labels)))
    with pytest.raises(ValueError):
        balanced_subset_indices(labels, 0.9, 0)  # class 2 has only 50 < 119 samples


# ---------------------------------------------------------------------------------------------
# The stand-alone kNN of a workdir: conftest's `pretrained` run (2 steps of a tiny ViT).


def test_knn_eval_restores_student_and_teacher_and_logs(pretrained_copy, capsys):
    overrides = knn_eval.overrides_config()
    overrides.knn.k = 10
    result = knn_eval.knn_eval(pretrained_copy, overrides)
    assert result["step"] == 2 and result["offline_knn_k"] == 10
    for key in ("offline_knn_top1", "offline_knn_top5", "offline_teacher_knn_top1"):
        assert 10.0 < result[key] <= 100.0  # above chance on 10 digits even after 2 steps
    assert result["offline_knn_top1"] <= result["offline_knn_top5"]
    assert "offline_knn_top1" in capsys.readouterr().out
    with open(os.path.join(pretrained_copy, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 2 and rows[-1]["offline_knn_top1"] == result["offline_knn_top1"]


def test_no_checkpoint_is_one_clear_error_and_random_init_needs_none(config_only_workdir):
    workdir = config_only_workdir
    with pytest.raises(ValueError, match="no checkpoint in .*--random_init"):
        knn_eval.knn_eval(workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    result = knn_eval.knn_eval(workdir, random_init=True)
    assert result["step"] == 0 and 0.0 < result["offline_init_knn_top1"] <= 100.0


@pytest.mark.slow
def test_cli_prints_one_error_line(tmp_path, subprocess_env):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "bam_jax.evals.knn", f"--workdir={tmp_path / 'empty'}"],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "bam_jax.evals.knn: error:" in line]
    assert len(errors) == 1 and "config.json does not exist" in errors[0]
