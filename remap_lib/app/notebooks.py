"""Run the guided-tour notebooks end to end (papermill), as `make demo` and the nightly job do.

``run_notebooks()`` executes ``notebooks/NN_*.ipynb`` in order with papermill,
injecting parameters (each notebook has a cell tagged ``parameters``; a YAML
file can override them for all notebooks, e.g. ``quick: false`` for the full
version on other data), and writes each executed notebook and its HTML
rendering to a dated folder under ``runs/``.  A notebook that fails is
reported with its error and the run continues; the return value (and the
exit code of ``remap notebooks``) says whether all succeeded.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path

__all__ = ["notebook_paths", "run_notebooks"]

log = logging.getLogger(__name__)
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def notebook_paths(folder: str | os.PathLike = NOTEBOOKS) -> list[Path]:
    paths = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {folder}")
    return paths


def _declared_parameters(path: Path) -> set[str]:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    names = set()
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            for line in cell.source.splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    names.add(line.split("=", 1)[0].strip())
    return names


def run_notebooks(out_dir: str | os.PathLike | None = None, parameters: dict | None = None,
                  folder: str | os.PathLike = NOTEBOOKS, only: list[str] | None = None,
                  kernel: str = "python3", cell_timeout: int = 1200) -> bool:
    """Execute the notebooks; returns True when every one ran without error."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    out = Path(out_dir) if out_dir is not None else Path("runs") / time.strftime("notebooks-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    ok = True
    for path in notebook_paths(folder):
        if only and not any(o in path.name for o in only):
            continue
        # each notebook gets the overrides it declares (unknown names would only add noise)
        params = {k: v for k, v in parameters.items() if k in _declared_parameters(path)}
        target = out / path.name
        t = time.perf_counter()
        print(f"running {path.name} {params or ''}", flush=True)
        try:
            kwargs = {"kernel_name": kernel, "parameters": params, "cwd": str(path.parent), "progress_bar": False,
                      # a nightly run must fail, not hang: a kernel that never starts or a cell that never
                      # returns (e.g. nbclient waiting forever on an `interact` widget, papermill#723) ends the notebook
                      "start_timeout": 120, "execution_timeout": cell_timeout}
            if "log_output" in inspect.signature(papermill.execute_notebook).parameters:
                kwargs["log_output"] = False
            papermill.execute_notebook(str(path), str(target), **kwargs)
            status = "ok"
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            ok = False
            status = f"FAILED: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
        if target.exists():
            html, _ = HTMLExporter().from_notebook_node(nbformat.read(target, as_version=4))
            target.with_suffix(".html").write_text(html)
        print(f"  {status} ({time.perf_counter() - t:.0f} s) -> {target}", flush=True)
    print(f"\nexecuted notebooks and HTML in {out}: {'all succeeded' if ok else 'SOME FAILED'}")
    return ok
