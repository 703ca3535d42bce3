"""Every notebook in notebooks/ executes top to bottom on a tiny configuration in a real
Jupyter kernel and shows its figures inline; the committed copies hold their figures."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TRAINS = {"quickstart.ipynb", "ics_explorer.ipynb", "landscape_and_gradients.ipynb"}  # the others only read


def images(nb) -> int:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= TRAINS | {"experiment_results.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_copy_shows_figures(path):
    nb = nbformat.read(path, as_version=4)
    assert images(nb) >= 1
    assert path.stat().st_size < 1_000_000  # small outputs: modest dpi


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("BN_RESEARCH_NOTEBOOK_STEPS", "40")
    monkeypatch.setenv("BN_RESEARCH_NOTEBOOK_DEPTH", "2")  # hidden layers: compile time grows with depth
    monkeypatch.setenv("BN_RESEARCH_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend, as for a user
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.outputs = [] if cell.cell_type == "code" else cell.get("outputs")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert images(nb) >= 1  # figures are shown inline: importing the library left the backend alone
    if path.name in TRAINS:
        assert os.listdir(tmp_path)
