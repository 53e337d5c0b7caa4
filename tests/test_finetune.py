"""Fine-tuning and the frozen logistic regression: layer-wise lr decay, the labelled subset,
the solver against PyTorch's L-BFGS, and runs on a pretrained workdir (resume, errors)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bam_jax.data import pipeline
from bam_jax.evals import finetune
from configs import finetune_default


def tiny_finetune_config(pretrained_workdir, steps=4):
    """10 % of the digits (400), 40 a step, evaluated every 2 steps on the 1,000 held out."""
    config = finetune_default.get_config()
    config.pretrained_workdir = pretrained_workdir
    config.label_fraction = 0.1
    config.num_train_steps = steps
    config.optimizer.warmup_epochs = 0
    config.eval_batch_size = 200
    config.eval_every_epochs = 0.2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
    return config


def _classifier(depth=2):
    from bam_jax.models import vit  # noqa: PLC0415

    backbone = vit.VisionTransformer(image_size=28, patch_size=4, in_channels=1, width=16,
                                     depth=depth, num_heads=2, freeze_patch_embed=False,
                                     rngs=nnx.Rngs(0))
    return finetune.Classifier(backbone, 10, rngs=nnx.Rngs(0))


def test_layer_decay_scales_each_parameters_update_by_its_depth():
    decay = 0.5
    model = _classifier(depth=2)
    params = nnx.state(model, nnx.Param)
    config = finetune_default.get_config()
    config.optimizer.update(weight_decay=0.0, weight_decay_final=0.0, clip_grad=0.0)

    def first_update(layer_decay):
        config.layer_decay = layer_decay
        optimizer = finetune.make_optimizer(config, params)
        state = finetune.set_hyperparams(config, optimizer.init(params), 0.1, 0.0)
        grads = jax.tree.map(jnp.ones_like, params)
        return nnx.to_flat_state(optimizer.update(grads, state, params)[0])

    scaled, plain = first_update(decay), first_update(1.0)
    ratios = {"/".join(map(str, path)): float(jnp.mean(a.get_value() / b.get_value()))
              for (path, a), (_, b) in zip(scaled, plain)}
    # BEiT's factors for 2 blocks (num_layers 3): embedding decay^3, block i decay^(2 - i),
    # the final norm and the head 1.
    expected = {"backbone/patch_kernel": decay ** 3, "backbone/cls_token": decay ** 3,
                "backbone/blocks/0/attn/qkv/kernel": decay ** 2,
                "backbone/blocks/1/mlp/fc2/bias": decay, "backbone/norm/scale": 1.0,
                "head/kernel": 1.0, "head/bias": 1.0}
    for name, factor in expected.items():
        assert ratios[name] == pytest.approx(factor, rel=1e-5), (name, ratios[name])
    assert set(np.round(list(ratios.values()), 6)) == {1.0, 0.5, 0.25, 0.125}


def test_label_fraction_is_a_class_balanced_subset_fixed_by_the_seed():
    config = finetune_default.get_config()
    labels = pipeline.labels(config.data, config.data.eval_train_split)
    subsets = {}
    for fraction, seed in ((0.01, 0), (0.01, 1), (0.1, 0)):
        config.label_fraction, config.seed = fraction, seed
        subsets[fraction, seed] = finetune.labelled_examples(config)
        picked = labels[subsets[fraction, seed]]
        assert len(np.unique(subsets[fraction, seed])) == int(len(labels) * fraction)
        assert np.all(np.bincount(picked, minlength=10) == int(len(labels) * fraction) // 10)
    config.label_fraction, config.seed = 0.01, 0
    assert np.array_equal(finetune.labelled_examples(config), subsets[0.01, 0])
    assert not np.array_equal(subsets[0.01, 0], subsets[0.01, 1])
    config.label_fraction = 1.0
    assert finetune.labelled_examples(config) is None


@pytest.mark.xla_optimized
def test_logistic_regression_reaches_pytorch_lbfgs_optimum():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n, dim, classes, l2 = 300, 12, 4, 1e-2
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    features = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    mask = np.ones(n, bool)
    mask[-20:] = False  # padding rows must not count
    weights, bias = jax.jit(lambda x, y, m: finetune.fit_logistic_regression(
        x, y, m, num_classes=classes, l2=l2, steps=100))(features, labels, mask)

    x, y = torch.tensor(features[mask], dtype=torch.float64), torch.tensor(labels[mask])
    w = torch.zeros(dim, classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12,
                               tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w ** 2).sum()
        loss.backward()
        return loss

    solver.step(closure)
    np.testing.assert_allclose(weights, w.detach().numpy(), atol=2e-4)
    np.testing.assert_allclose(bias, b.detach().numpy(), atol=2e-4)


def test_finetuning_learns_resumes_exactly_and_reports(pretrained, tmp_path, capsys, resume_from,
                                                       read_state, assert_trees_close):
    workdir = str(tmp_path / "finetune")
    result = finetune.finetune(tiny_finetune_config(pretrained), workdir)
    out = capsys.readouterr().out
    assert "fine-tuning the teacher of step 2" in out and "on 400 labelled examples" in out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "finetune_top1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and result["step"] == 4
    # The head starts at ~0 (truncated normal 2e-5): about chance on the 1,000 held-out digits.
    assert evals[0]["finetune_top1"] < 13.0 and result["finetune_top1"] > 17.0, evals
    assert evals[-1]["finetune_best_top1"] == max(r["finetune_top1"] for r in evals)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]

    resumed = str(tmp_path / "resumed")
    resume_from(workdir, resumed, 2)
    again = finetune.finetune(tiny_finetune_config(pretrained), resumed)
    assert "resumed from the checkpoint of step 2" in capsys.readouterr().out
    assert again["finetune_top1"] == result["finetune_top1"]
    assert_trees_close(read_state(workdir, 4)["params"], read_state(resumed, 4)["params"],
                       rtol=1e-6, atol=1e-7)


def test_frozen_logistic_regression_on_a_pretrained_backbone(pretrained, tmp_path):
    config = tiny_finetune_config(pretrained)
    config.protocol = "logistic_regression"
    config.logreg.steps = 50
    workdir = str(tmp_path / "logreg")
    result = finetune.finetune(config, workdir)
    assert result["logreg_top1"] > 30.0 and result["logreg_top5"] > result["logreg_top1"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readline())["logreg_top1"] == result["logreg_top1"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def _tfds_cifar10(config):
    config.data.update(source="tfds", tfds_name="cifar10")


@pytest.mark.parametrize("change,message", [
    (lambda config: config.update(protocol="linear"), "config.protocol 'linear': use 'finetune'"),
    (_tfds_cifar10, "label_fraction 0.1 on tfds 'cifar10': only imagenet2012 with 0.01 or 0.1"),
])
def test_bad_settings_are_one_clear_error(pretrained, tmp_path, change, message):
    config = tiny_finetune_config(pretrained)
    change(config)
    with pytest.raises(ValueError, match=message):
        finetune.finetune(config, str(tmp_path / "out"))


def test_a_workdir_without_a_checkpoint_is_refused(config_only_workdir, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        finetune.finetune(tiny_finetune_config(config_only_workdir), str(tmp_path / "out"))


def test_unknown_tfds_dataset_is_refused(pretrained, tmp_path):
    config = tiny_finetune_config(pretrained)
    config.label_fraction = 1.0
    config.data.update(source="tfds", tfds_name="no_such_dataset", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no_such_dataset"):
        finetune.finetune(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset", ["cifar100", "oxford_flowers102"])
def test_transfer_config_reads_the_named_tfds_dataset(dataset, tmp_path):
    from configs import finetune_transfer  # noqa: PLC0415

    config = finetune_transfer.get_config(dataset)
    config.update(random_init=True)
    config.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match=f"tfds dataset '{dataset}' is not prepared in"):
        finetune.finetune(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown transfer dataset 'mnist'"):
        finetune_transfer.get_config("mnist")
