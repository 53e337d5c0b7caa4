"""notebooks/bam_jax_colab.ipynb runs top to bottom (3 train steps on one CPU device)."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat "
                               "(pip install -r requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient "
                               "(pip install -r requirements-dev.txt)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel "
                    "(pip install -r requirements-dev.txt)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "bam_jax_colab.ipynb")
STEPS = 3


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    # The kernel inherits this environment: a short run, in tmp_path, on one device (as a Colab
    # CPU runtime has).
    monkeypatch.setenv("BAM_NOTEBOOK_STEPS", str(STEPS))
    monkeypatch.setenv("BAM_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" is ipykernel's spec, started with this interpreter; cwd is the repository
    # root, where `bam_jax` imports, so the install cell skips itself.
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=240,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert "git clone" not in text and "Cloning" not in text
    assert len(images) == 2  # the curves and the BAM target/source matrices (no ViT: no CLS map)
    assert "step 4 loss" in text  # the user's own model: five steps of bam_loss
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows if "loss" in row] == [STEPS]
    assert any("knn_top1" in row for row in rows)
    assert (workdir / "target.png").exists()
