"""The notebooks run top to bottom (small settings), as CI's check that they teach working code."""

from pathlib import Path

import pytest
from conftest import require

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_train_lenet5.ipynb",
        "02_explain.ipynb",
        "03_evaluate.ipynb",
        "04_explain_your_own_model.ipynb",
        "05_explain_a_transformer.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch, mnist):
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), (
        "notebooks are stored without outputs"
    )
    monkeypatch.setenv("LENET_JAX_SMALL", "1")
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    images = sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert images >= 2, "every notebook draws its figures"
    assert list(tmp_path.iterdir()) == [], "notebooks write into runs/ or a temporary folder only"
