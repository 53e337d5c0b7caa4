"""The README's Python examples run as written, and do what they say."""

import math
import os
import re

import jax
import numpy as np
import pytest

import bam_jax

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks():
    with open(README) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def runnable_blocks():
    # The signature block is documentation, not a program.
    return [block for block in python_blocks() if not block.startswith("bam_jax.bam_loss(")]


def test_readme_has_examples():
    assert len(runnable_blocks()) >= 2


def _check_train_step(namespace, loss):
    """The printed loss is that of the initial model; the step moved the model's weights."""
    from flax import nnx  # noqa: PLC0415

    model, views = namespace["model"], namespace["views"]
    initial = type(model)(nnx.Rngs(0))
    expected = bam_jax.bam_loss(initial(views), num_global_crops=2, sinkhorn_reg=0.05,
                                temperature=0.1)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
    before, after = nnx.state(initial, nnx.Param), nnx.state(model, nnx.Param)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         before, after)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated


def _check_sharded_loss(namespace, loss):
    """The shard_map loss equals the whole-batch loss on one device."""
    z = np.asarray(jax.device_get(namespace["z"]), np.float32)
    expected = bam_jax.bam_loss(jax.numpy.asarray(z), num_global_crops=2, top_k=8)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_example_runs(index, capsys):
    namespace = {}
    exec(compile(runnable_blocks()[index], f"README.md example {index}", "exec"), namespace)
    printed = [line.split() for line in capsys.readouterr().out.splitlines()
               if line.startswith("loss ")]
    assert len(printed) == 1 and len(printed[0]) == 2, printed
    loss = float(printed[0][1])
    assert math.isfinite(loss) and loss > 0
    checked = False
    if "train_step" in namespace and "views" in namespace:
        _check_train_step(namespace, loss)
        checked = True
    if "sharded_loss" in namespace and "z" in namespace:
        _check_sharded_loss(namespace, loss)
        checked = True
    assert checked, "an example the test does not know how to check: add its check here"
