"""Notebooks on disk: deterministic read/write, output stripping, execution and conventions.

Notebooks live in git without outputs (except the answer keys of graded cells), so a
diff shows only what a person changed. `write_notebook` always produces the same bytes
for the same content (nbformat's sorted, one-space JSON), and `strip_outputs` removes
everything an execution adds: outputs, execution counts, timing metadata, widget state.

Conventions of `notebooks/NN_topic.ipynb` (checked by `notebook_problems`):
    cell 1: markdown starting with "# Title"
    cell 2: code starting with "# NBVAL_IGNORE_OUTPUT" (versions, seeds)
    saved without outputs; file name NN_topic.ipynb (two digits, lower-case words)
"""

from __future__ import annotations

import os
import re
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

NAME_PATTERN = re.compile(r"^\d\d_[a-z0-9]+(_[a-z0-9]+)*\.ipynb$")
GRADED_MARKER = "# NBVAL_CHECK_OUTPUT"
IGNORE_MARKER = "# NBVAL_IGNORE_OUTPUT"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# ipywidgets' text/plain: "VBox(children=..."; tqdm's bars print their progress instead
WIDGET_REPR = re.compile(r"^[A-Za-z]\w*\(")
IMAGE_MIMES = ("image/png", "image/svg+xml", "image/jpeg")
# Cell metadata written by Jupyter or nbclient while running; never kept in git.
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


def read_notebook(path: str | Path) -> NotebookNode:
    path = Path(path)
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # not JSON, or not a notebook
        raise ValueError(f"{path} is not a readable Jupyter notebook: {e}") from None


def notebook_text(nb: NotebookNode) -> str:
    """The exact file content `write_notebook` writes (stable across runs)."""
    return nbformat.writes(nb, version=4) + "\n"


def write_notebook(nb: NotebookNode, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(notebook_text(nb), encoding="utf-8")


def first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_graded(cell: NotebookNode) -> bool:
    """A graded cell is a code cell whose first line is `# NBVAL_CHECK_OUTPUT`."""
    return cell.cell_type == "code" and first_line(cell.source).startswith(GRADED_MARKER)


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of the same stream: the kernel may split one
    cell's prints into several messages, differently from run to run."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            out.get("output_type") == "stream"
            and prev is not None
            and prev.get("output_type") == "stream"
            and prev.get("name") == out.get("name")
        ):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(deepcopy(out))
    return merged


def normalize_metadata(nb: NotebookNode) -> None:
    """Keep only the notebook metadata that says how to run it (kernel, language)."""
    kernelspec = nb.metadata.get("kernelspec") or {}
    keep = {
        "kernelspec": {
            "display_name": kernelspec.get("display_name", "Python 3 (ipykernel)"),
            "language": "python",
            "name": kernelspec.get("name", "python3"),
        },
        "language_info": {"name": "python"},
    }
    extra = nb.metadata.get("minillm")
    nb.metadata = nbformat.from_dict(keep | ({"minillm": extra} if extra else {}))
    nb.nbformat, nb.nbformat_minor = 4, 5
    for i, cell in enumerate(nb.cells):
        cell.setdefault("id", f"cell-{i}")
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)


def strip_outputs(nb: NotebookNode, keep_graded: bool = False) -> NotebookNode:
    """A copy without outputs and execution counts; graded cells keep theirs if asked
    (nbval compares only cells that have an execution count)."""
    nb = deepcopy(nb)
    normalize_metadata(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if keep_graded and is_graded(cell) and cell.get("execution_count") is not None:
            cell.outputs = coalesce_streams(cell.outputs)
        else:
            cell.execution_count = None
            cell.outputs = []
    return nb


def has_outputs(nb: NotebookNode) -> bool:
    return any(
        cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
        for cell in nb.cells
    )


def notebook_problems(path: Path, nb: NotebookNode) -> list[str]:
    """What breaks the conventions of notebooks/NN_topic.ipynb (empty list: none)."""
    problems = []
    if not NAME_PATTERN.match(path.name):
        problems.append(f"{path}: name it NN_topic.ipynb (two digits, lower-case words)")
    cells = nb.cells
    if (
        not cells
        or cells[0].cell_type != "markdown"
        or not first_line(cells[0].source).startswith("# ")
    ):
        problems.append(f"{path}: the first cell must be markdown starting with '# Title'")
    if (
        len(cells) < 2
        or cells[1].cell_type != "code"
        or not first_line(cells[1].source).startswith(IGNORE_MARKER)
    ):
        problems.append(
            f"{path}: the second cell must be code starting with '{IGNORE_MARKER}' "
            "(print versions, set seeds)"
        )
    if has_outputs(nb):
        problems.append(
            f"{path}: saved with outputs; strip them (python -m minillm.exercises strip)"
        )
    return problems


def count_outputs(nb: NotebookNode) -> tuple[int, int]:
    """(image outputs, widget outputs) of an executed notebook."""
    images = widgets = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            images += any(m in data for m in IMAGE_MIMES)
            widgets += WIDGET_MIME in data and bool(
                WIDGET_REPR.match(data.get("text/plain", "Widget("))
            )
    return images, widgets


@dataclass
class Execution:
    """One notebook run: the executed copy, its wall time, and the error if it raised."""

    path: Path
    seconds: float
    notebook: NotebookNode
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# Notebook kernels run torch on one thread. With two or more OpenMP threads, a kernel
# process on a small, busy machine (CI's 2 cores) was measured 10-100x slower than the same
# code in a plain script: the OpenMP workers and the kernel's own threads fight for the
# cores. Notebooks are small and seeded; one thread gives the same results.
KERNEL_THREADS = "1"


def kernel_env() -> dict[str, str]:
    """The environment notebook kernels start with (MINILLM_NOTEBOOK_THREADS overrides)."""
    threads = os.environ.get("MINILLM_NOTEBOOK_THREADS", KERNEL_THREADS)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


# A notebook's cells take seconds (each notebook < 60 s on 2 cores). On a loaded 2-core
# machine a kernel was seen, a few times, to stall for ~600 s inside a notebook that runs
# in 6 s alone, for no cause found in the notebook; a cell that outlives CELL_TIMEOUT_S is
# therefore retried once, in a fresh kernel, and the retry is reported on stderr.
CELL_TIMEOUT_S = 180


def execute_notebook(
    path: str | Path, timeout: int = CELL_TIMEOUT_S, retries: int = 1
) -> Execution:
    """Run every cell of `path` top to bottom in a fresh kernel of this Python, with the
    notebook's folder as working directory. Never raises for a failing cell: the error
    (cell number and the exception line) is in `Execution.error`. A cell that runs longer
    than `timeout` seconds is an error; before reporting it, the whole notebook is run
    again in a new kernel up to `retries` times."""
    for attempt in range(retries + 1):
        run, timed_out = _execute_once(Path(path), timeout)
        if not timed_out or attempt == retries:
            return run
        print(f"{path}: a cell ran past {timeout} s ({run.error}); running the notebook again "
              "in a fresh kernel", file=sys.stderr)  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover


def _execute_once(path: Path, timeout: int) -> tuple[Execution, bool]:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = read_notebook(path)
    client = NotebookClient(
        nb,
        timeout=timeout,
        # quiet the kernel's own log (its notice about local TCP sockets on every start)
        # no IPython history database: kernels started side by side share one SQLite file
        extra_arguments=["--IPKernelApp.log_level=ERROR", "--HistoryManager.enabled=False"],
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
        record_timing=False,
    )
    start = time.perf_counter()
    error, timed_out = None, False
    try:
        client.execute(env=kernel_env())
    except CellTimeoutError as e:
        error, timed_out = f"timed out: {_error_summary(nb, e)}", True
    except CellExecutionError as e:
        error = _error_summary(nb, e)
    except Exception as e:  # the kernel died or could not start
        error = f"{type(e).__name__}: {e}"
    return Execution(path, time.perf_counter() - start, nb, error), timed_out


def _error_summary(nb: NotebookNode, exc: Exception) -> str:
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                line = first_line(cell.source)
                return f"code cell {i + 1} ({line[:60]!r}) raised {out.ename}: {out.evalue}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def execution_problems(run: Execution) -> list[str]:
    """Why an executed notebook fails CI: it raised, or it shows a widget without a
    static figure beside it (the book cannot run widgets)."""
    if not run.ok:
        return [f"{run.path}: {run.error}"]
    images, widgets = count_outputs(run.notebook)
    interactive = sum(
        "ipywidgets" in c.source or "interact" in c.source
        for c in run.notebook.cells
        if c.cell_type == "code"
    )
    if interactive and images == 0:
        return [f"{run.path}: uses ipywidgets but shows no static figure (the book needs one)"]
    if widgets > images:
        return [f"{run.path}: {widgets} widgets but only {images} static figures"]
    return []


def execute_all(paths: list[Path], out_dir: Path | None = None, log=print) -> list[Execution]:
    """Execute notebooks one after the other, logging each one's time; write the executed
    copies to `out_dir` if given."""
    runs = []
    for path in paths:
        run = execute_notebook(path)
        status = "ok" if run.ok else f"FAILED: {run.error}"
        log(f"{Path(path).as_posix()}: {run.seconds:.1f} s {status}")
        if out_dir is not None:
            write_notebook(run.notebook, Path(out_dir) / Path(path).name)
        runs.append(run)
    if runs:
        log(f"{len(runs)} notebooks in {sum(r.seconds for r in runs):.1f} s")
    return runs
