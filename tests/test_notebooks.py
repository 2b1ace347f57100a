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
    from remap_lib.app.notebooks import _declared_parameters

    assert _declared_parameters(NOTEBOOKS[0]) == {"dataset", "scales", "quick", "engine", "precision"}
    assert {"train_groups", "engine"} <= _declared_parameters(NOTEBOOKS[2])
    assert "precision" not in _declared_parameters(NOTEBOOKS[2])  # `precision: bf16` in a YAML leaves training alone


def _parameter_defaults(path) -> dict:
    """The literal values the `parameters` cell assigns, by name."""
    import ast

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign)}


# the notebooks whose backbone passes take both (03's TrainConfig has an engine, always f32)
DESCRIBING = ("01", "02", "04", "05")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_engine_and_precision_are_parameters_with_the_library_defaults_and_are_used(path):
    defaults = _parameter_defaults(path)
    assert defaults.get("engine") == "auto"
    wanted = {"engine": "auto", "precision": "f32"} if path.name[:2] in DESCRIBING else {"engine": "auto"}
    assert {k: v for k, v in defaults.items() if k in ("engine", "precision")} == wanted
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    for name in wanted:  # declared and passed on, not left unused
        assert f"{name}={name}" in code, f"{path.name} never passes {name}={name}"
