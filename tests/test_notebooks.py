"""The committed notebooks: outputs stripped, a tagged parameters cell, logic imported from remap_lib."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_five_notebooks_are_there_in_reading_order():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped_and_parameters_tagged(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "quick" in tagged[0].source
    assert any("remap_lib" in c.source for c in code)
    assert max(len(c.source.splitlines()) for c in code) <= 40  # a longer cell belongs in the library
    # papermill/nbclient can wait forever on interact's Output widget (papermill#723): draw into W.Image
    assert not any(w in c.source for c in code for w in ("interact(", "W.Output(", "widgets.Output("))


def test_runner_passes_each_notebook_only_its_declared_parameters():
    from remap_lib.notebooks import _declared_parameters

    assert _declared_parameters(NOTEBOOKS[0]) == {"dataset", "scales", "quick"}
    assert "train_groups" in _declared_parameters(NOTEBOOKS[2])
