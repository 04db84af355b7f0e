"""Grading summary for `pytest --nbval-lax exercises/NN_topic.ipynb`: which graded cells
failed and why (see minillm/exercises/grading.py). Also uses exercises/sanitize.cfg when
no --nbval-sanitize-with is given."""

from minillm.exercises.grading import pytest_configure

__all__ = ["pytest_configure"]
