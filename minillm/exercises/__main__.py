"""python -m minillm.exercises {build,check,strip,notebooks,book}: run from the repo root."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minillm.exercises.build import build_one, check, solution_paths
from minillm.exercises.notebooks import (
    Execution,
    execute_all,
    execution_problems,
    read_notebook,
    strip_outputs,
    write_notebook,
)


def _notebooks(root: Path, given: list[Path]) -> list[Path]:
    return given or sorted((root / "notebooks").glob("*.ipynb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.exercises", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="execute solutions, store answer keys, write exercises/")
    p.add_argument("solutions", nargs="*", type=Path, help="default: solutions/*.ipynb")
    sub.add_parser("check", help="exercises in sync, notebooks follow the conventions")
    p = sub.add_parser("strip", help="strip outputs of notebooks in place")
    p.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    p = sub.add_parser("notebooks", help="execute notebooks on CPU, print each one's time")
    p.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    p.add_argument("--out", type=Path, default=Path("build/notebooks"), help="executed copies")
    p = sub.add_parser("book", help="execute the notebooks and build the book (-W)")
    p.add_argument("--out", type=Path, default=Path("build/book"))
    p.add_argument(
        "--executed",
        type=Path,
        help="use the executed notebooks in this folder (from the `notebooks` command) "
        "instead of executing them again",
    )
    args = parser.parse_args(argv)
    root = args.root
    if not any((root / d).is_dir() for d in ("solutions", "notebooks")):
        parser.error(f"{root.resolve()} has no notebooks/ or solutions/: run from the repo root")

    if args.command == "build":
        for path in args.solutions or solution_paths(root):
            try:
                build_one(path, root)
            except (ValueError, RuntimeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        return 0
    if args.command == "check":
        problems = check(root)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"check: {len(problems)} problem(s)" if problems else "check: ok")
        return 1 if problems else 0
    if args.command == "strip":
        for path in _notebooks(root, args.notebooks):
            write_notebook(strip_outputs(read_notebook(path)), path)
        return 0
    if args.command == "book" and args.executed:
        runs = [
            Execution(path, 0.0, read_notebook(args.executed / path.name))
            for path in _notebooks(root, [])
        ]
    else:
        runs = execute_all(
            _notebooks(root, getattr(args, "notebooks", [])),
            args.out if args.command == "notebooks" else None,
        )
    problems = [p for run in runs for p in execution_problems(run)]
    if args.command == "book" and not problems:
        from minillm.exercises.book import assemble, broken_links, build_html

        try:
            src = assemble(root, {r.path.name: r.notebook for r in runs}, args.out / "src")
            html = build_html(src, args.out)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        problems = broken_links(html)
        if not problems:
            print(f"book: {(html / 'index.html').resolve()}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
