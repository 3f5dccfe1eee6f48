"""The notebooks are stored with their outputs (run top to bottom, full size) and run again here with
small settings, as CI's check that they teach working code."""

from pathlib import Path

import pytest
from conftest import require

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _images(book) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", ())
    )


def test_the_five_notebooks_are_stored_run_in_order_with_their_figures():
    nbformat = require("nbformat")
    assert [p.name for p in NOTEBOOKS] == [
        "01_train_lenet5.ipynb",
        "02_explain.ipynb",
        "03_evaluate.ipynb",
        "04_explain_your_own_model.ipynb",
        "05_explain_a_transformer.ipynb",
    ]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        counts = [c.execution_count for c in book.cells if c.cell_type == "code"]
        assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not run top to bottom"
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]  # fmt: skip
        assert not errors and _images(book) >= 2, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch, mnist):
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("LENET_JAX_SMALL", "1")
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    assert _images(book) >= 2, "every notebook draws its figures"
    assert list(tmp_path.iterdir()) == [], "notebooks write into runs/ or a temporary folder only"
