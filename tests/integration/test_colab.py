"""launch/colab.ipynb runs top to bottom on CPU (shrunk through environment variables)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.integration import tiny

pytestmark = pytest.mark.slow


def test_colab_notebook_runs_and_shows_the_curve_and_heatmap(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(tiny.ROOT, "launch", "colab.ipynb"), as_version=4)
    overrides = ",".join(f"{k}={v}" for k, v in tiny.OVERRIDES.items()
                         if not k.startswith(("stage", "eval_every")))
    for key, value in {"MTA_JAX_REPO_DIR": tiny.ROOT, "MTA_COLAB_STAGE1_STEPS": "6",
                       "MTA_COLAB_STAGE2_STEPS": "4", "MTA_COLAB_EVAL_EVERY": "4",
                       "MTA_COLAB_OVERRIDES": overrides, "JAX_PLATFORMS": "cpu",
                       "MTA_COLAB_WORKDIR": str(tmp_path / "run")}.items():
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the loss curve and one routing heatmap per stage
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert os.path.exists(tmp_path / "run" / "stage2" / "predictions_4.jsonl")
