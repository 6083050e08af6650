"""The notebooks run top to bottom (01 and 03 on tiny models, 02 on the committed results/)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["01_atq_demo", "02_ablation_results", "03_layer_analysis"])
def test_notebook_executes(name, monkeypatch):
    monkeypatch.delenv("ATQ_NOTEBOOK_MODEL", raising=False)
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "Error" not in outputs
    assert outputs.strip()
