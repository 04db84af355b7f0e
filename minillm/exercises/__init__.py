"""The teaching surface's tooling: exercises built from solutions, notebooks executed, the book.

    notebooks/NN_topic.ipynb   a concept, run top to bottom (title cell, then a version/seed
                               cell marked `# NBVAL_IGNORE_OUTPUT`; saved without outputs)
    solutions/NN_topic.ipynb   the exercise with its answers between `### BEGIN SOLUTION` and
                               `### END SOLUTION` inside function bodies; graded cells start
                               with `# NBVAL_CHECK_OUTPUT` and print deterministic results
    exercises/NN_topic.ipynb   generated: regions become `raise NotImplementedError` stubs,
                               graded cells keep the solution's outputs as the answer key
    book/                      Jupyter Book 1.x pages and `_toc.yml`; the build adds the
                               executed notebooks and the committed benchmark results

Commands (`python -m minillm.exercises --help`): build, check, strip, notebooks, book.
Grading is plain nbval: `pytest --nbval-lax exercises/NN_topic.ipynb`, with the summary
of `minillm.exercises.grading`.
"""

from minillm.exercises.build import build_one, check
from minillm.exercises.convert import find_regions, make_exercise, put_back_solutions
from minillm.exercises.notebooks import execute_notebook, read_notebook, write_notebook

__all__ = [
    "build_one",
    "check",
    "execute_notebook",
    "find_regions",
    "make_exercise",
    "put_back_solutions",
    "read_notebook",
    "write_notebook",
]
