"""A pytest plugin that ends an nbval run with a grading summary a learner can act on.

nbval turns every code cell of a notebook into a test ("Cell 4") and prints long
tracebacks. This plugin adds, per notebook, which graded cells (`# NBVAL_CHECK_OUTPUT`)
passed and which failed, each named by its label: the first comment line after the
marker (`# Check 2: softmax at temperature 0.5`) or else the notebook's functions it
calls. For a failure it says why in one line: the exception the cell raised, or the
first line where the output differs from the answer key.

The answer key is the official one: when `solutions/<same name>.ipynb` exists under the
project root, every graded cell is graded with the code and saved outputs of the exercise
generated from it, not with what the graded file holds. Running a notebook in JupyterLab
overwrites the outputs under the graded cells with the learner's own; without this, a
saved wrong answer would be its own key.

It is active for notebooks under `exercises/` (through exercises/conftest.py); grade
files elsewhere with `pytest -p minillm.exercises.grading --nbval-lax ...`. Set
MINILLM_GRADING_REPORT=path.json to also get the results as JSON (one entry per cell).
"""

from __future__ import annotations

import json
import os
import re
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from nbformat import NotebookNode

from minillm.exercises.convert import make_exercise
from minillm.exercises.notebooks import (
    coalesce_streams,
    first_line,
    is_graded,
    read_notebook,
    strip_outputs,
)

PLUGIN_NAME = "minillm-grading"
SANITIZE_FILE = Path(__file__).resolve().parents[2] / "exercises" / "sanitize.cfg"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit|Interrupt|Warning))\b.*")


MISMATCH = "[the graded cells of this notebook do not match the official exercise]\n"


def official_exercise(path: Path, root: Path) -> tuple[NotebookNode, str] | None:
    """The pristine exercise generated from root/solutions/<name>, and that solution's
    path; None when there is no such solution or `path` is that solution."""
    solution = root / "solutions" / path.name
    if not solution.exists() or solution.resolve() == path.resolve():
        return None
    rel = f"solutions/{path.name}"
    return make_exercise(strip_outputs(read_notebook(solution), keep_graded=True), rel), rel


def apply_answer_key(cells: list[NotebookNode], official: NotebookNode) -> str | None:
    """Give the graded cells (in order) the official code and saved outputs. If their
    number differs, make each one fail with a clear message; return that problem."""
    keys = [c for c in official.cells if is_graded(c)]
    graded = [c for c in cells if is_graded(c)]
    if len(graded) != len(keys):
        for cell in graded:
            cell.outputs = [{"output_type": "stream", "name": "stdout", "text": MISMATCH}]
            cell.execution_count = 1
        return f"{len(graded)} graded cells where the official exercise has {len(keys)}"
    for cell, key in zip(graded, keys, strict=True):
        cell.source = key.source
        cell.outputs = deepcopy(key.outputs)
        cell.execution_count = key.execution_count
    return None


@dataclass
class CellResult:
    notebook: str
    cell: str  # nbval's name: "Cell 4" (code cells counted from 0)
    label: str
    graded: bool
    passed: bool
    reason: str = ""


def cell_label(source: str, functions: list[str]) -> str:
    """The first comment after the marker, else the notebook functions the cell calls."""
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    if lines and lines[0].startswith("# NBVAL_"):
        lines = lines[1:]
    if lines and lines[0].startswith("#"):
        return lines[0].lstrip("#").strip()
    called = [f for f in functions if re.search(rf"\b{re.escape(f)}\s*\(", source)]
    if called:
        return "checks " + ", ".join(called)
    return first_line(source)[:70]


def _output_text(outputs: list) -> list[str]:
    lines = []
    for out in coalesce_streams(outputs):
        if out.get("output_type") == "stream":
            lines += out.get("text", "").splitlines()
        elif "data" in out and "text/plain" in out["data"]:
            lines += out["data"]["text/plain"].splitlines()
        elif out.get("output_type") == "error":
            lines.append(f"{out.get('ename')}: {out.get('evalue')}")
    return lines


def failure_reason(item, longrepr: str) -> str:
    text = ANSI.sub("", longrepr)
    if "Cell outputs differ" in text:
        expected = _output_text(item.cell.get("outputs", []))
        got = _output_text(item.test_outputs or [])
        for i in range(max(len(expected), len(got))):
            want = expected[i] if i < len(expected) else "(nothing)"
            have = got[i] if i < len(got) else "(nothing)"
            if want != have:
                return f"output differs from the answer key: expected {want!r}, got {have!r}"
        return "output differs from the answer key"
    errors = [m.group(0) for m in map(EXCEPTION_LINE.match, text.splitlines()) if m]
    if errors:
        return "raised " + errors[-1].strip()[:160]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


class GradingReporter:
    def __init__(self) -> None:
        self.results: list[CellResult] = []
        self.keys: dict[str, str] = {}  # notebook -> where its answer key came from

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        files = {id(i.parent): i.parent for i in items if hasattr(i, "cell_num")}
        for parent in files.values():
            name = _rel(parent.path, config.rootpath)
            found = official_exercise(parent.path, config.rootpath)
            if found is None:
                self.keys[name] = "the outputs saved in the notebook"
                continue
            official, source = found
            cells = [i.cell for i in items if getattr(i, "parent", None) is parent]
            problem = apply_answer_key(cells, official)
            self.keys[name] = f"{source} ({problem})" if problem else source

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        cell = getattr(item, "cell", None)
        if cell is None or not hasattr(item, "cell_num") or call.when != "call":
            return
        nb = getattr(item.parent, "nb", None)
        functions = []
        if nb is not None:
            for c in nb.cells:
                if c.cell_type == "code":
                    functions += re.findall(r"^\s*def\s+(\w+)", c.source, re.MULTILINE)
        graded = is_graded(cell)
        reason = "" if report.passed else failure_reason(item, str(report.longrepr))
        if report.skipped:
            reason = "skipped"
        self.results.append(
            CellResult(
                notebook=_rel(item.path, item.config.rootpath),
                cell=item.name,
                label=cell_label(cell.source, functions),
                graded=graded,
                passed=report.passed,
                reason=reason,
            )
        )

    def pytest_terminal_summary(self, terminalreporter):
        if not self.results:
            return
        tr = terminalreporter
        for notebook in dict.fromkeys(r.notebook for r in self.results):
            rows = [r for r in self.results if r.notebook == notebook]
            graded = [r for r in rows if r.graded]
            n_pass = sum(r.passed for r in graded)
            tr.write_sep("=", f"grading: {notebook}")
            if notebook in self.keys:
                tr.write_line(f"answer key: {self.keys[notebook]}")
            tr.write_line(f"graded cells passed: {n_pass} of {len(graded)}")
            for r in graded:
                mark = "pass" if r.passed else "FAIL"
                tr.write_line(f"  {mark}  {r.cell:>8}  {r.label}", red=not r.passed)
                if not r.passed:
                    tr.write_line(f"          {'':>8}  -> {r.reason}")
            raised = [r for r in rows if not r.graded and not r.passed]
            if raised:
                tr.write_line("other cells that failed (later cells may depend on them):")
                for r in raised:
                    tr.write_line(f"  ERROR {r.cell:>8}  {r.label}  -> {r.reason}")
            if graded and n_pass == len(graded) and not raised:
                tr.write_line("all graded cells pass. Well done!", green=True)
            elif graded:
                tr.write_line(
                    "fix the functions these cells check, save the notebook, grade again."
                )
        report_path = os.environ.get("MINILLM_GRADING_REPORT")
        if report_path:
            Path(report_path).write_text(
                json.dumps([asdict(r) for r in self.results], indent=1) + "\n"
            )


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def pytest_configure(config) -> None:
    """Register the reporter once (this module may be loaded by -p and by a conftest),
    default to the project's sanitize file when grading without one, and start the
    graded kernels with the thread settings of every executed notebook (see
    `minillm.exercises.notebooks.kernel_env`)."""
    from minillm.exercises.notebooks import kernel_env

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, kernel_env()[name])
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(GradingReporter(), PLUGIN_NAME)
    option = config.option
    if getattr(option, "nbval_sanitize_with", "unset") is None and SANITIZE_FILE.exists():
        option.nbval_sanitize_with = str(SANITIZE_FILE)
