"""The README's Python examples run as written."""

import os
import re

import pytest

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


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_example_runs(index, capsys):
    exec(compile(runnable_blocks()[index], f"README.md example {index}", "exec"), {})
    assert "loss" in capsys.readouterr().out
