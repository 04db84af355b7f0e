"""The book: assemble its sources, build the HTML offline, check every internal link.

`book/` holds the hand-written pages and `_toc.yml`; the notebooks come from
`notebooks/`, executed once by the build (the notebook check in CI and the book share
that one execution), and the committed benchmark results from `benchmarks/results/`.

    assemble:  book/* + executed notebooks/ + benchmarks/results/ + vendored MathJax
               -> build/book/src          (a Jupyter Book 1.x source folder)
    build:     jupyter-book build -W      -> build/book/_build/html   (warnings are errors)
    links:     every href/src inside the site resolves, with its #fragment

Widgets need a live kernel, so the book shows the static figure beside each one and
replaces the widget itself by a one-line note.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
from copy import deepcopy
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nbformat import NotebookNode

from minillm.exercises.notebooks import (
    WIDGET_MIME,
    WIDGET_REPR,
    first_line,
    is_graded,
    read_notebook,
    write_notebook,
)

WIDGET_NOTE = "[interactive widget: open this notebook in JupyterLab to use it]"
# What the default MathJax component (tex-chtml) loads: itself, its extensions and fonts.
MATHJAX_PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts", "a11y", "ui", "sre")
RESULT_SUFFIXES = (".png", ".svg", ".json")


def find_mathjax(root: Path) -> Path:
    path = Path(os.environ.get("MINILLM_MATHJAX_DIR", root / "build/npm/node_modules/mathjax/es5"))
    if not (path / "tex-chtml.js").exists():
        raise FileNotFoundError(
            f"MathJax not found in {path}: run `make book-deps` "
            "(npm install mathjax@3.2.2), or set MINILLM_MATHJAX_DIR to its es5 folder"
        )
    return path


def book_copy(nb: NotebookNode) -> NotebookNode:
    """The executed notebook as the book shows it: widgets replaced by a note, progress
    bars dropped."""
    nb = deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data is not None and WIDGET_MIME in data:
                text = data.get("text/plain", "")
                if text and not WIDGET_REPR.match(text):
                    continue  # a tqdm progress bar: its text froze at 0%, drop it
                out.data = {"text/plain": WIDGET_NOTE}
            outputs.append(out)
        if cell.cell_type == "code":
            cell.outputs = outputs
    return nb


def benchmark_page(results: Path) -> str | None:
    """A page with every committed benchmark: its plot, device, and headline numbers."""
    jsons = sorted(results.glob("*.json"))
    if not jsons:
        return None
    parts = [
        "# Benchmark results\n",
        "Measured by the scripts in `benchmarks/` (`python -m benchmarks.<name>`), which time "
        "each fast path against its baseline in the same run.\n",
    ]
    for path in jsons:
        data = json.loads(path.read_text())
        env = data.get("environment", {})
        parts.append(f"## {data.get('benchmark', path.stem)}\n")
        parts.append(
            f"{env.get('device', 'unknown device')}; torch {env.get('torch', '?')}; "
            f"{env.get('date', '')}\n"
        )
        if path.with_suffix(".png").exists():
            parts.append(f"![{path.stem}](benchmarks/results/{path.stem}.png)\n")
        scalars = {
            k: v
            for k, v in data.items()
            if k not in ("benchmark", "environment") and isinstance(v, (int, float, str, bool))
        }
        if scalars:
            rows = [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
            parts.append("| quantity | value |\n|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def exercise_list(root: Path) -> str:
    """A table of the shipped exercises (from solutions/, which exercises/ mirrors)."""
    rows = []
    for path in sorted((root / "solutions").glob("*.ipynb")):
        nb = read_notebook(path)
        title = first_line(nb.cells[0].source).lstrip("# ") if nb.cells else path.stem
        checks = sum(is_graded(c) for c in nb.cells)
        rows.append(f"| `exercises/{path.name}` | {title} | {checks} |")
    if not rows:
        return "No exercise has been published yet.\n"
    return "| notebook | topic | graded checks |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def assemble(root: Path, executed: dict[str, NotebookNode], out: Path) -> Path:
    """Write the book's source folder; `executed` maps notebook file names to executed
    notebooks. Returns `out`."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(root / "book", out)
    (out / "exercise_list.md").write_text(exercise_list(root))
    for name, nb in executed.items():
        write_notebook(book_copy(nb), out / "notebooks" / name)
    results = root / "benchmarks" / "results"
    page = benchmark_page(results) if results.is_dir() else None
    if page:
        dest = out / "benchmarks" / "results"
        dest.mkdir(parents=True)
        for f in results.iterdir():
            if f.suffix in RESULT_SUFFIXES:
                shutil.copy2(f, dest / f.name)
        (out / "benchmarks.md").write_text(page)
        with open(out / "_toc.yml", "a") as toc:
            toc.write("  - caption: Benchmarks\n    chapters:\n      - file: benchmarks\n")
    mathjax = find_mathjax(root)
    for part in MATHJAX_PARTS:
        src, dst = mathjax / part, out / "_vendor" / "mathjax" / part
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return out


def build_html(src: Path, out: Path) -> Path:
    """Run Jupyter Book on `src` with warnings as errors; return the HTML folder."""
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        raise FileNotFoundError("jupyter-book is not installed: pip install -e '.[book]'")
    cmd = [str(jb), "build", str(src), "--path-output", str(out), "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr).strip().splitlines()
        warnings = [line for line in log if "WARNING" in line or "ERROR" in line]
        raise RuntimeError(
            "the book build failed (warnings are errors):\n" + "\n".join(warnings or log[-30:])
        )
    return out / "_build" / "html"


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag != "meta" else ():
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) and tag in ("a", "img", "link", "script", "source", "iframe"):
                self.refs.append(attrs[key])


def _parse(path: Path) -> _Refs:
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def broken_links(html_dir: Path) -> list[str]:
    """Every internal link or resource of the site that points nowhere: a missing file,
    or a #fragment that no element of the target page has."""
    html_dir = html_dir.resolve()
    pages = {  # the site's pages; _static/ holds theme templates, not pages
        p: _parse(p)
        for p in sorted(html_dir.rglob("*.html"))
        if "_static" not in p.relative_to(html_dir).parts
    }
    broken = []
    for page, parsed in pages.items():
        for ref in parsed.refs:
            url = urlsplit(ref)
            if url.scheme or ref.startswith(("//", "mailto:", "javascript:", "data:")):
                continue
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            where = page.relative_to(html_dir).as_posix()
            if not target.exists():
                broken.append(f"{where}: link to a missing file: {ref}")
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(url.fragment) not in ids:
                    broken.append(f"{where}: link to a missing anchor: {ref}")
    return broken
