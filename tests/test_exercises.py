"""Exercises are generated from solutions and graded by nbval.

Fast tests: the solution -> exercise transform, and `check` (in sync; fails when not).
Grading tests, for every shipped exercise: the solution passes its own grading, the
exercise as shipped fails every graded cell, and passes once its solution code is put
back. For the warm-up, a wrong answer fails exactly the cells that check it, by name.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from notebook_runs import ROOT

from minillm.exercises.build import check
from minillm.exercises.convert import (
    exercise_source,
    find_regions,
    make_exercise,
    put_back_solutions,
)
from minillm.exercises.notebooks import is_graded, notebook_text, read_notebook, write_notebook

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
NAMES = [p.name for p in SOLUTIONS]
SANITIZE = ROOT / "exercises" / "sanitize.cfg"

FUNCTION = '''import torch


def double(x: torch.Tensor) -> torch.Tensor:
    """Return 2 * x."""
    y = x
    ### BEGIN SOLUTION
    y = 2 * x
    ### END SOLUTION
    return y
'''


# ---------------------------------------------------------------- the transform


def test_stub_keeps_signature_docstring_and_code_after_the_region():
    out = exercise_source(FUNCTION)
    assert "### BEGIN" not in out and "2 * x\n" not in out
    assert 'def double(x: torch.Tensor) -> torch.Tensor:\n    """Return 2 * x."""' in out
    assert "    return y\n" in out
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match=r"implement double\(\)"):
        namespace["double"](1)


def test_regions_inside_nested_blocks_and_multiline_signatures():
    source = (
        "class A:\n"
        "    def f(\n"
        "        self, x\n"
        "    ):\n"
        '        """Doc."""\n'
        "        if x:\n"
        "            ### BEGIN SOLUTION\n"
        "            return 1\n"
        "            ### END SOLUTION\n"
        "        return 0\n"
    )
    (region,) = find_regions(source)
    assert (region.function, region.indent) == ("f", " " * 12)
    assert "            raise NotImplementedError" in exercise_source(source)


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "inside a function body"),
        ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "without a matching"),
        ("def f():\n    return 1\n    ### END SOLUTION\n", "without a ### BEGIN"),
        (
            "def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION\n",
            "inside another region",
        ),
        ("def f():\n    ### BEGIN SOLUTION here\n    return 1\n", "alone on its line"),
    ],
)
def test_malformed_regions_are_rejected_with_the_line(source, message):
    with pytest.raises(ValueError, match=message):
        find_regions(source, "solutions/x.ipynb, code cell 2")


def _solution():
    graded = nbformat.v4.new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n# Check 1: doubling\nprint(double(3))"
    )
    graded.execution_count = 7
    graded.outputs = [nbformat.v4.new_output("stream", name="stdout", text="6\n")]
    demo = nbformat.v4.new_code_cell("print('not graded')")
    demo.execution_count = 8
    demo.outputs = [nbformat.v4.new_output("stream", name="stdout", text="not graded\n")]
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Doubling"),
            nbformat.v4.new_code_cell(FUNCTION),
            graded,
            demo,
        ]
    )
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    return nb


def test_exercise_keeps_the_answer_key_and_strips_the_rest():
    ex = make_exercise(_solution(), "solutions/05_double.ipynb")
    code = [c for c in ex.cells if c.cell_type == "code"]
    assert "raise NotImplementedError" in code[0].source
    assert code[1].outputs[0].text == "6\n" and code[1].execution_count == 7
    assert code[2].outputs == [] and code[2].execution_count is None
    guide = ex.cells[1]
    assert guide.cell_type == "markdown" and "exercises/05_double.ipynb" in guide.source
    assert ex.metadata["minillm"] == {"generated_from": "solutions/05_double.ipynb"}
    # deterministic: the same solution always gives the same bytes
    assert notebook_text(ex) == notebook_text(
        make_exercise(_solution(), "solutions/05_double.ipynb")
    )


def test_put_back_restores_the_solution_code():
    sol = _solution()
    filled = put_back_solutions(make_exercise(sol, "solutions/05_double.ipynb"), sol)
    source = filled.cells[2].source
    assert "NotImplementedError" not in source and "    y = 2 * x\n" in source
    assert "### BEGIN" not in source
    namespace = {}
    exec(source, namespace)
    assert namespace["double"](3) == 6


def test_an_exercise_needs_a_region_and_a_graded_cell():
    sol = _solution()
    no_graded = nbformat.v4.new_notebook(cells=[sol.cells[0], sol.cells[1]])
    with pytest.raises(ValueError, match="no graded cell"):
        make_exercise(no_graded, "solutions/x.ipynb")
    no_region = nbformat.v4.new_notebook(cells=[sol.cells[0], sol.cells[2]])
    with pytest.raises(ValueError, match="nothing for the learner"):
        make_exercise(no_region, "solutions/x.ipynb")


def test_grading_uses_the_official_answer_key():
    """A learner who ran the notebook saved their own outputs under the graded cells (and
    may have edited a check): the grader restores the official code and outputs."""
    from minillm.exercises.grading import MISMATCH, apply_answer_key

    official = make_exercise(_solution(), "solutions/05_double.ipynb")
    submission = nbformat.from_dict(json.loads(json.dumps(official)))
    graded = next(c for c in submission.cells if is_graded(c))
    graded.source = "# NBVAL_CHECK_OUTPUT\nprint(5)"
    graded.outputs[0].text = "5\n"
    assert apply_answer_key(submission.cells, official) is None
    assert "double(3)" in graded.source and graded.outputs[0].text == "6\n"

    extra = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('always right')")
    submission.cells.append(extra)
    assert apply_answer_key(submission.cells, official) == (
        "2 graded cells where the official exercise has 1"
    )
    assert extra.outputs[0]["text"] == MISMATCH and graded.outputs[0]["text"] == MISMATCH


def test_summary_labels_and_reasons():
    from types import SimpleNamespace

    from minillm.exercises.grading import cell_label, failure_reason

    assert cell_label("# NBVAL_CHECK_OUTPUT\n# Check 2: top-p keeps one token\nf()", ["f"]) == (
        "Check 2: top-p keeps one token"
    )
    assert cell_label("# NBVAL_CHECK_OUTPUT\nprint(rms_norm(x), g(1))", ["rms_norm", "h"]) == (
        "checks rms_norm"
    )
    assert cell_label("x = compute()\n", []) == "x = compute()"

    item = SimpleNamespace(
        cell={"outputs": [nbformat.v4.new_output("stream", name="stdout", text="a: 1\nb: True\n")]},
        test_outputs=[nbformat.v4.new_output("stream", name="stdout", text="a: 1\nb: False\n")],
    )
    assert failure_reason(item, "Cell outputs differ") == (
        "output differs from the answer key: expected 'b: True', got 'b: False'"
    )
    traceback = "\x1b[0;31mValueError\x1b[0m: temperature must be > 0, got 0\n"
    assert failure_reason(item, "Cell execution caused an exception\n" + traceback) == (
        "raised ValueError: temperature must be > 0, got 0"
    )


# ---------------------------------------------------------------- check


def test_check_passes_on_the_repository():
    assert check(ROOT) == []


def _copy_teaching_tree(dest: Path) -> None:
    for folder in ("notebooks", "solutions", "exercises"):
        (dest / folder).mkdir()
        for path in (ROOT / folder).glob("*.ipynb"):
            shutil.copy2(path, dest / folder / path.name)
    (dest / "book").mkdir()
    shutil.copy2(ROOT / "book" / "_toc.yml", dest / "book" / "_toc.yml")


def _check_cli(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm.exercises", "--root", str(root), "check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not SOLUTIONS, reason="no exercise shipped yet")
def test_check_fails_when_an_exercise_is_out_of_sync_with_its_solution(tmp_path):
    _copy_teaching_tree(tmp_path)
    assert check(tmp_path) == []
    solution = tmp_path / "solutions" / NAMES[0]
    nb = read_notebook(solution)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source)
    cell.source = cell.source.replace('"""', '"""Changed contract. ', 1)
    write_notebook(nb, solution)
    proc = _check_cli(tmp_path)
    assert proc.returncode == 1
    assert f"exercises/{NAMES[0]} is out of sync with solutions/{NAMES[0]}" in proc.stderr
    assert "python -m minillm.exercises build" in proc.stderr


def test_check_fails_on_hand_edits_stray_exercises_and_unregistered_notebooks(tmp_path):
    _copy_teaching_tree(tmp_path)
    if SOLUTIONS:
        exercise = tmp_path / "exercises" / NAMES[0]
        exercise.write_text(exercise.read_text().replace("NotImplementedError", "RuntimeError", 1))
    shutil.copy2(ROOT / "notebooks" / "00_tour.ipynb", tmp_path / "exercises" / "77_stray.ipynb")
    shutil.copy2(ROOT / "notebooks" / "00_tour.ipynb", tmp_path / "notebooks" / "78_new.ipynb")
    problems = "\n".join(check(tmp_path))
    if SOLUTIONS:
        assert f"exercises/{NAMES[0]} is out of sync" in problems
    assert "exercises/77_stray.ipynb has no solutions/77_stray.ipynb" in problems
    assert "notebooks/78_new.ipynb is not in book/_toc.yml" in problems


# ---------------------------------------------------------------- grading with nbval


def _grade(paths: list[Path], folder: Path, *, plugin: bool):
    """Run the learner's command (`pytest --nbval-lax --nbval-sanitize-with ...`) from the
    repo root; return the process and {notebook: [cell results]} from the summary plugin."""
    report = folder / f"grades-{len(list(folder.glob('grades-*')))}.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--nbval-sanitize-with",
        str(SANITIZE.relative_to(ROOT)),
        "-p",
        "no:cacheprovider",
        "-q",
    ]
    cmd += ["-p", "minillm.exercises.grading"] if plugin else []
    cmd += [str(p.relative_to(ROOT)) for p in paths]
    env = {**os.environ, "MINILLM_GRADING_REPORT": str(report)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    results = {}
    for row in json.loads(report.read_text()) if report.exists() else []:
        results.setdefault(row["notebook"], []).append(row)
    return proc, results


def _wrong_warmup(folder: Path) -> Path | None:
    """The warm-up as a learner saves it after running it in JupyterLab with a softmax that
    ignores the temperature: the wrong outputs are saved under the graded cells too."""
    if "01_warmup.ipynb" not in NAMES:
        return None
    sol = read_notebook(ROOT / "solutions" / "01_warmup.ipynb")
    nb = put_back_solutions(read_notebook(ROOT / "exercises" / "01_warmup.ipynb"), sol)
    for cell in nb.cells:
        cell.source = cell.source.replace("z = logits / temperature", "z = logits / 1.0")
        for out in cell.get("outputs", []):
            if "text" in out:
                out.text = out.text.replace(": True", ": False")
    path = folder / "learner" / "01_warmup.ipynb"  # same name: graded with the official key
    write_notebook(nb, path)
    return path


@pytest.fixture(scope="module")
def graded():
    """Two grader runs for every shipped exercise: the solutions and the exercises with their
    solution code put back (must pass), and the exercises as shipped plus one wrong answer
    (must fail). One pytest process each, so the cost is the kernels, not pytest startups.
    The copies live in build/ so that the repo root stays pytest's rootdir."""
    (ROOT / "build").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=ROOT / "build", prefix="grading-"))
    filled = []
    for path in SOLUTIONS:
        exercise = read_notebook(ROOT / "exercises" / path.name)
        write_notebook(put_back_solutions(exercise, read_notebook(path)), folder / path.name)
        filled.append(folder / path.name)
    passing = _grade(SOLUTIONS + filled, folder, plugin=True)
    shipped = [ROOT / "exercises" / name for name in NAMES]
    wrong = _wrong_warmup(folder)
    # the learner's command: the summary comes from exercises/conftest.py; the copy in
    # build/ needs -p, and with both loaded the plugin must still report once
    failing = _grade(shipped + ([wrong] if wrong else []), folder, plugin=wrong is not None)
    yield {"passing": passing, "failing": failing, "folder": folder.relative_to(ROOT).as_posix()}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_its_own_grading(graded, name):
    proc, results = graded["passing"]
    cells = results[f"solutions/{name}"]
    assert all(c["passed"] for c in cells), (
        proc.stdout[-3000:],
        [c for c in cells if not c["passed"]],
    )
    assert any(c["graded"] for c in cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_exercise_passes_once_its_solution_code_is_put_back(graded, name):
    proc, results = graded["passing"]
    cells = results[f"{graded['folder']}/{name}"]
    assert all(c["passed"] for c in cells), [c for c in cells if not c["passed"]]
    assert proc.returncode == 0 and "all graded cells pass" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_exercise_fails_every_graded_cell_as_shipped(graded, name):
    proc, results = graded["failing"]
    assert proc.returncode == 1
    graded_cells = [c for c in results[f"exercises/{name}"] if c["graded"]]
    assert graded_cells and not any(c["passed"] for c in graded_cells), graded_cells
    assert f"grading: exercises/{name}" in proc.stdout
    assert f"graded cells passed: 0 of {len(graded_cells)}" in proc.stdout
    assert "NotImplementedError" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif("01_warmup.ipynb" not in NAMES, reason="the warm-up is not shipped")
def test_a_wrong_answer_fails_and_the_summary_names_the_cells(graded):
    proc, results = graded["failing"]
    name = f"{graded['folder']}/learner/01_warmup.ipynb"
    cells = results[name]
    failed = [c["label"] for c in cells if c["graded"] and not c["passed"]]
    assert [label.split(":")[0] for label in failed] == ["Check 4", "Check 7"]
    assert all(c["passed"] for c in cells if not c["graded"])
    summary = proc.stdout[proc.stdout.index(f"grading: {name}") :]
    assert "answer key: solutions/01_warmup.ipynb\ngraded cells passed: 5 of 7" in summary
    assert f"FAIL    Cell 7  {failed[0]}" in summary
    assert "output differs from the answer key: expected 'T=0.5: matches torch: True" in summary
    assert proc.stdout.count(f"grading: {name}") == 1  # -p and the conftest: one report
