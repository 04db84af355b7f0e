"""Solution notebook -> exercise notebook, and back (to prove the grader can pass).

A solution marks the learner's part of a function body with two lines:

    def rms_norm(x, weight, eps):
        \"\"\"The contract the learner implements.\"\"\"
        ### BEGIN SOLUTION
        ...the reference code...
        ### END SOLUTION

The exercise keeps the def line, the docstring and whatever follows END, and replaces
the region with a stub that raises NotImplementedError. Graded cells (first line
`# NBVAL_CHECK_OUTPUT`) keep the outputs of the executed solution: they are the answer
key nbval compares against. Everything else is stripped. The invariant the CI checks:

    exercise == make_exercise(solution)          (byte for byte, see `check`)
    put_back_solutions(exercise, solution)        passes the grader; the exercise fails it
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass

import nbformat
from nbformat import NotebookNode

from minillm.exercises.notebooks import is_graded, strip_outputs

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB_COMMENT = "# Your code here: replace the line below."
STUB_RE = re.compile(
    r"^(?P<indent>[ \t]*)" + re.escape(STUB_COMMENT) + r"\n"
    r"(?P=indent)raise NotImplementedError\(\"[^\"\n]*\"\)\n",
    re.MULTILINE,
)
DEF_RE = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?def[ \t]+(?P<name>\w+)")
GUIDE_CELL_ID = "minillm-exercise-guide"


@dataclass(frozen=True)
class Region:
    """Lines [begin, end] (the marker lines, 0-based) of one learner part of a cell."""

    begin: int
    end: int
    indent: str
    function: str


def find_regions(source: str, where: str = "cell") -> list[Region]:
    """The solution regions of one cell, validated: markers paired, not nested, each
    region inside the body of a `def` (the stub must keep a signature and a docstring)."""
    lines = source.splitlines()
    regions, begin = [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text == BEGIN:
            if begin is not None:
                raise ValueError(f"{where}, line {i + 1}: {BEGIN} inside another region")
            begin = i
        elif text == END:
            if begin is None:
                raise ValueError(f"{where}, line {i + 1}: {END} without a {BEGIN} before it")
            indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
            regions.append(Region(begin, i, indent, _enclosing_function(lines, begin, where)))
            begin = None
        elif BEGIN.lstrip("# ") in text or END.lstrip("# ") in text:
            raise ValueError(
                f"{where}, line {i + 1}: write the marker alone on its line, exactly "
                f"'{BEGIN}' or '{END}'"
            )
    if begin is not None:
        raise ValueError(f"{where}, line {begin + 1}: {BEGIN} without a matching {END}")
    return regions


def _enclosing_function(lines: list[str], begin: int, where: str) -> str:
    threshold = len(lines[begin]) - len(lines[begin].lstrip())
    for line in reversed(lines[:begin]):
        text = line.lstrip()
        indent = len(line) - len(text)
        # blank lines, comments, the tail of a multi-line signature or string: not a block
        if indent >= threshold or not text or text.startswith(("#", ")", "]", "}", '"', "'")):
            continue
        if match := DEF_RE.match(line):
            return match["name"]
        if indent == 0:
            break  # a top-level statement that is not a def: the region is outside any function
        threshold = indent  # an enclosing block (if, for, with...): keep looking for the def
    raise ValueError(
        f"{where}, line {begin + 1}: a solution region must sit inside a function body, "
        "below its def line and docstring (the exercise keeps both as the contract)"
    )


def stub(region: Region) -> list[str]:
    message = f"implement {region.function}() (see its docstring)"
    return [
        region.indent + STUB_COMMENT,
        f'{region.indent}raise NotImplementedError("{message}")',
    ]


def exercise_source(source: str, where: str = "cell") -> str:
    """The cell's source with every solution region replaced by its stub."""
    lines = source.splitlines()
    out, last = [], 0
    for region in find_regions(source, where):
        out += lines[last : region.begin] + stub(region)
        last = region.end + 1
    out += lines[last:]
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def solution_regions(nb: NotebookNode) -> list[list[str]]:
    """The body lines (markers excluded) of every region, in notebook order."""
    bodies = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            lines = cell.source.splitlines()
            for r in find_regions(cell.source, f"cell {i + 1}"):
                bodies.append(lines[r.begin + 1 : r.end])
    return bodies


def guide_cell(solution_path: str) -> NotebookNode:
    exercise_path = solution_path.replace("solutions/", "exercises/", 1)
    cell = nbformat.v4.new_markdown_cell(
        "**How to do this exercise.** Replace each `raise NotImplementedError(...)` with your "
        "code (the docstring above it is the contract), run the notebook top to bottom, then "
        "grade it from the repository root:\n\n"
        "```bash\n"
        f"pytest --nbval-lax --nbval-sanitize-with exercises/sanitize.cfg {exercise_path}\n"
        "```\n\n"
        "The cells that start with `# NBVAL_CHECK_OUTPUT` are graded: the output saved under "
        "each one shows the expected result, and the grader reruns the notebook and compares "
        "with the official answer key. "
        f"(This file is generated from `{solution_path}` by `python -m minillm.exercises "
        "build`.)"
    )
    cell.id = GUIDE_CELL_ID
    return cell


def make_exercise(solution: NotebookNode, solution_path: str) -> NotebookNode:
    """The exercise notebook for a (normalized, executed) solution notebook."""
    nb = strip_outputs(solution, keep_graded=True)
    n_regions = n_graded = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        n_regions += len(find_regions(cell.source, f"{solution_path}, cell {i + 1}"))
        cell.source = exercise_source(cell.source, f"{solution_path}, cell {i + 1}")
        n_graded += is_graded(cell)
    if n_regions == 0:
        raise ValueError(f"{solution_path}: no '{BEGIN}' region: nothing for the learner to write")
    if n_graded == 0:
        raise ValueError(f"{solution_path}: no graded cell (first line '# NBVAL_CHECK_OUTPUT')")
    nb.cells.insert(
        1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, guide_cell(solution_path)
    )
    nb.metadata["minillm"] = {"generated_from": solution_path}
    return nb


def put_back_solutions(exercise: NotebookNode, solution: NotebookNode) -> NotebookNode:
    """The exercise with each stub replaced by the solution's code, as a learner who
    gets everything right would write it (markers gone, answer keys untouched)."""
    bodies = solution_regions(solution)
    nb = deepcopy(exercise)
    k = 0

    def fill(match: re.Match) -> str:
        nonlocal k
        if k >= len(bodies):
            raise ValueError("the exercise has more stubs than its solution has regions")
        body = bodies[k]
        k += 1
        return "".join(line + "\n" for line in body)

    for cell in nb.cells:
        if cell.cell_type == "code":
            source = cell.source if cell.source.endswith("\n") else cell.source + "\n"
            filled = STUB_RE.sub(fill, source)
            cell.source = filled if cell.source.endswith("\n") else filled[:-1]
    if k != len(bodies):
        raise ValueError(f"the exercise has {k} stubs but its solution has {len(bodies)} regions")
    return nb
