"""`build` and `check`: keep exercises/ equal to what the solutions generate.

build: execute each solution, store its graded outputs (the answer key) in it and strip
       the rest, then write the exercise generated from it.
check: without executing anything, verify that every solution is normalized, every
       exercise is exactly what `build` would write, no exercise lacks its solution, and
       every notebook follows the conventions. CI runs it; it is fast.
"""

from __future__ import annotations

import re
from pathlib import Path

from minillm.exercises.convert import find_regions, make_exercise
from minillm.exercises.notebooks import (
    execute_notebook,
    is_graded,
    notebook_problems,
    notebook_text,
    read_notebook,
    strip_outputs,
    write_notebook,
)

# "- file: notebooks/10_sampling" entries of the table of contents (comments excluded)
TOC_FILE = re.compile(r"^\s*-?\s*file:\s*([\w/.-]+)", re.MULTILINE)
BUILD_HINT = "run `python -m minillm.exercises build` (exercises are generated, never edited)"


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _validate_regions(nb, where: str) -> None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            find_regions(cell.source, f"{where}, cell {i + 1}")


def answer_key_problems(nb, where: str) -> list[str]:
    """Graded cells must have been run and print text: an empty key grades nothing,
    and nbval does not compare images."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if not is_graded(cell):
            continue
        texts = [
            o
            for o in cell.get("outputs", [])
            if o.get("output_type") == "stream" or "text/plain" in o.get("data", {})
        ]
        if cell.get("execution_count") is None or not texts:
            problems.append(
                f"{where}, cell {i + 1}: graded cell without a printed answer key; "
                "make it print a deterministic result and run build"
            )
    return problems


def build_one(solution_path: Path, root: Path) -> Path:
    """Execute one solution, normalize it in place, write its exercise; return the latter."""
    rel = _rel(solution_path, root)
    nb = read_notebook(solution_path)
    _validate_regions(nb, rel)
    run = execute_notebook(solution_path)
    if not run.ok:
        raise RuntimeError(f"{rel}: the solution does not run: {run.error}")
    solution = strip_outputs(run.notebook, keep_graded=True)
    problems = answer_key_problems(solution, rel)
    if problems:
        raise ValueError("\n".join(problems))
    write_notebook(solution, solution_path)
    exercise_path = root / "exercises" / solution_path.name
    write_notebook(make_exercise(solution, rel), exercise_path)
    print(f"{rel} -> {_rel(exercise_path, root)} ({run.seconds:.1f} s)")
    return exercise_path


def solution_paths(root: Path) -> list[Path]:
    return sorted((root / "solutions").glob("*.ipynb"))


def check(root: Path) -> list[str]:
    """Every reason CI should fail for the teaching surface, without executing anything."""
    problems: list[str] = []
    toc = root / "book" / "_toc.yml"
    toc_entries = set(TOC_FILE.findall(toc.read_text())) if toc.exists() else None
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        problems += notebook_problems(Path(_rel(path, root)), read_notebook(path))
        if toc_entries is not None and f"notebooks/{path.stem}" not in toc_entries:
            problems.append(
                f"notebooks/{path.name} is not in book/_toc.yml: add `- file: "
                f"notebooks/{path.stem}` to its concept's chapter (see the comment at the top)"
            )
    for path in solution_paths(root):
        rel = _rel(path, root)
        nb = read_notebook(path)
        if (
            not nb.cells
            or nb.cells[0].cell_type != "markdown"
            or not nb.cells[0].source.startswith("# ")
        ):
            problems.append(f"{rel}: the first cell must be markdown starting with '# Title'")
        try:
            normalized = strip_outputs(nb, keep_graded=True)
            expected = notebook_text(make_exercise(normalized, rel))
        except ValueError as e:
            problems.append(str(e))
            continue
        key_problems = answer_key_problems(nb, rel)
        problems += key_problems
        if not key_problems and notebook_text(normalized) != path.read_text(encoding="utf-8"):
            problems.append(
                f"{rel}: has outputs outside its graded cells or stray metadata; " + BUILD_HINT
            )
        exercise = root / "exercises" / path.name
        if not exercise.exists():
            problems.append(f"{rel}: exercises/{path.name} is missing; {BUILD_HINT}")
        elif exercise.read_text(encoding="utf-8") != expected:
            problems.append(
                f"exercises/{path.name} is out of sync with {rel} "
                f"({_differing_cells(exercise, expected)}); {BUILD_HINT}"
            )
    solutions = {p.name for p in solution_paths(root)}
    for path in sorted((root / "exercises").glob("*.ipynb")):
        if path.name not in solutions:
            problems.append(
                f"exercises/{path.name} has no solutions/{path.name}: write the solution "
                "and build the exercise from it (or delete the stray exercise)"
            )
    return problems


def _differing_cells(path: Path, expected_text: str) -> str:
    import nbformat

    try:
        have = read_notebook(path).cells
    except ValueError:
        return "not a readable notebook"
    want = nbformat.reads(expected_text, as_version=4).cells
    if len(have) != len(want):
        return f"{len(have)} cells instead of {len(want)}"
    diff = [
        str(i + 1)
        for i, (a, b) in enumerate(zip(have, want, strict=True))
        if a.source != b.source or a.get("outputs") != b.get("outputs")
    ]
    return f"cells {', '.join(diff)} differ" if diff else "formatting or metadata differ"
