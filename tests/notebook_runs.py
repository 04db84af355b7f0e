"""The notebooks execute once per test session, shared by test_notebooks.py (which checks
them) and test_book.py (which builds the book from the executed copies)."""

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# `make test` sets this: there, a missing browser or MathJax is a failure, not a skip.
REQUIRE_BOOK = os.environ.get("MINILLM_REQUIRE_BOOK") == "1"


def need(condition: bool, what: str) -> None:
    """Skip (or fail, under `make test`) when a tool of the book tests is missing."""
    if not condition:
        message = f"{what} is missing: run `make book-deps browser-deps` (make test does)"
        if REQUIRE_BOOK:
            pytest.fail(message)
        pytest.skip(message)


@functools.cache
def executed_notebooks() -> dict:
    """{file name: Execution} of every notebook in notebooks/, run top to bottom once;
    the executed copies also land in build/notebooks/."""
    from minillm.exercises.notebooks import execute_all

    lines = []
    runs = execute_all(NOTEBOOKS, ROOT / "build" / "notebooks", log=lines.append)
    executed_notebooks.log = lines
    return {run.path.name: run for run in runs}
