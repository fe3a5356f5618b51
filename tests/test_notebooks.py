"""The example notebooks run top to bottom in a real kernel."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_analysis.ipynb", "03_train.ipynb", "04_features.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MISTUDIO_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    warnings = [o.text for o in outputs if o.output_type == "stream" and "Warning" in o.text]
    assert not warnings, warnings  # e.g. "RuntimeWarning: invalid value encountered in divide"
    titles = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert titles[0].startswith("# ") and not [t for t in titles if t.startswith("md")]  # rendered as headings
    if name.startswith("01"):
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert os.listdir(tmp_path / "ws" / "extractions")
