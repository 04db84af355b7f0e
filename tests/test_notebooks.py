"""Every notebook in notebooks/ runs top to bottom on CPU and follows the conventions;
a notebook that raises fails the check (shown once, on a notebook made to fail)."""

import subprocess
import sys

import nbformat
import pytest
from notebook_runs import NOTEBOOKS, ROOT, executed_notebooks

from minillm.exercises.notebooks import (
    Execution,
    execution_problems,
    notebook_problems,
    read_notebook,
    strip_outputs,
)

# The budget is ~60 s per notebook on a 2-core CPU; fail only far beyond it (a shared or
# slow machine must not turn CI red), so that one notebook cannot eat the CI budget unseen.
HARD_LIMIT_S = 240


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_on_cpu(path, capsys):
    run = executed_notebooks()[path.name]
    with capsys.disabled():  # the time of each notebook shows in every CI log
        print(f"\n[notebook] {path.relative_to(ROOT)} executed in {run.seconds:.1f} s", end=" ")
    assert run.ok, f"{path.name} failed: {run.error}"
    assert execution_problems(run) == []
    assert run.seconds < HARD_LIMIT_S, f"{path.name} took {run.seconds:.0f} s (budget ~60 s)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_follows_the_conventions(path):
    assert notebook_problems(path, read_notebook(path)) == []


def _notebook(*cells):
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _md(text):
    return nbformat.v4.new_markdown_cell(text)


def _code(text):
    return nbformat.v4.new_code_cell(text)


def test_a_notebook_that_raises_fails_the_notebook_check(tmp_path):
    """The command CI's check is built on exits 1 and names the cell and the exception."""
    (tmp_path / "notebooks").mkdir()
    nb = _notebook(
        _md("# Broken"),
        _code("# NBVAL_IGNORE_OUTPUT\nprint('versions')"),
        _code("x = 1"),
        _code("raise ValueError('this notebook is broken')"),
    )
    nbformat.write(nb, tmp_path / "notebooks" / "99_broken.ipynb")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.exercises",
            "--root",
            str(tmp_path),
            "notebooks",
            "--out",
            str(tmp_path / "executed"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "99_broken.ipynb" in proc.stderr
    assert "code cell 3" in proc.stderr and "ValueError: this notebook is broken" in proc.stderr
    assert "99_broken.ipynb:" in proc.stdout and " s " in proc.stdout  # its time is printed


def test_convention_problems_are_reported(tmp_path):
    good = _notebook(_md("# Title"), _code("# NBVAL_IGNORE_OUTPUT\nimport torch"), _code("1"))
    assert notebook_problems(tmp_path / "10_topic.ipynb", good) == []

    assert "name it NN_topic" in notebook_problems(tmp_path / "Topic.ipynb", good)[0]
    no_title = _notebook(_md("Some text"), _code("# NBVAL_IGNORE_OUTPUT"))
    assert "first cell" in notebook_problems(tmp_path / "10_a.ipynb", no_title)[0]
    no_version_cell = _notebook(_md("# Title"), _code("import torch"))
    assert "second cell" in notebook_problems(tmp_path / "10_a.ipynb", no_version_cell)[0]
    saved = _notebook(_md("# Title"), _code("# NBVAL_IGNORE_OUTPUT"), _code("1"))
    saved.cells[2].execution_count = 1
    saved.cells[2].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"})]
    assert "saved with outputs" in notebook_problems(tmp_path / "10_a.ipynb", saved)[0]
    assert notebook_problems(tmp_path / "10_a.ipynb", strip_outputs(saved)) == []


def test_a_widget_needs_a_static_figure_beside_it(tmp_path):
    widget = nbformat.v4.new_output(
        "display_data",
        {
            "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2},
            "text/plain": "VBox(children=(Text(value='def'),))",
        },
    )
    figure = nbformat.v4.new_output(
        "display_data", {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}
    )
    progress = nbformat.v4.new_output(
        "display_data",
        {
            "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2},
            "text/plain": "100%|##########| 8/8 [00:01<00:00,  5.01it/s]",
        },
    )
    cell = _code("import ipywidgets\ndisplay(w)")
    cell.outputs = [widget, progress]
    run = Execution(tmp_path / "10_a.ipynb", 1.0, _notebook(_md("# T"), cell))
    assert "no static figure" in execution_problems(run)[0]
    cell.outputs = [widget, progress, figure]  # a tqdm bar is not a widget to draw
    assert execution_problems(run) == []


def test_a_stalled_cell_is_retried_once_in_a_fresh_kernel(tmp_path, capsys):
    """A cell past the timeout runs the notebook again (here the first run stalls and
    leaves a marker; the second finds it and finishes); a cell that stalls every time is
    reported as timed out."""
    from minillm.exercises.notebooks import execute_notebook

    marker = tmp_path / "first-run"
    flaky = _notebook(
        _md("# Flaky"),
        _code(
            "import pathlib, time\n"
            f"m = pathlib.Path({str(marker)!r})\n"
            "if not m.exists():\n    m.touch()\n    time.sleep(60)\n"
            "print('done')"
        ),
    )
    nbformat.write(flaky, tmp_path / "flaky.ipynb")
    run = execute_notebook(tmp_path / "flaky.ipynb", timeout=3)
    assert run.ok, run.error
    assert "running the notebook again" in capsys.readouterr().err
    stuck = _notebook(_md("# Stuck"), _code("import time\ntime.sleep(60)"))
    nbformat.write(stuck, tmp_path / "stuck.ipynb")
    run = execute_notebook(tmp_path / "stuck.ipynb", timeout=3, retries=1)
    assert not run.ok and run.error.startswith("timed out")
