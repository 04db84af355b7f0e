"""The book builds offline with warnings as errors, and reads well in a real browser.

The build uses the notebooks executed once for test_notebooks.py. The browser test opens
every page in headless Chromium (the system one, driven by Playwright) served from
127.0.0.1: no console errors, no failed or external requests, internal links and anchors
resolve, math is rendered by the vendored MathJax, each notebook page shows its figures.
Screenshots of a few pages land in build/book-screenshots/ (kept as CI artifacts).
"""

import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
from notebook_runs import ROOT, executed_notebooks, need

from minillm.exercises.book import assemble, book_copy, broken_links, build_html, find_mathjax
from minillm.exercises.notebooks import IMAGE_MIMES

CHROMIUM = Path("/usr/bin/chromium")
# The flags that work on these machines (no sandbox as root; no background networking,
# whose connections the closed network refuses).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "build" / "book-screenshots"
SCREENSHOT_PAGES = ("intro.html", "notebooks/00_tour.html", "exercises.html")


def _require_book_tools() -> None:
    need((Path(sys.executable).parent / "jupyter-book").exists(), "jupyter-book")
    try:
        find_mathjax(ROOT)
    except FileNotFoundError:
        need(False, "MathJax (build/npm)")


@functools.cache
def _built() -> tuple[Path, Path]:
    runs = executed_notebooks()
    failed = [name for name, run in runs.items() if not run.ok]
    assert not failed, f"notebooks failed to execute: {failed}"
    src = assemble(
        ROOT, {name: run.notebook for name, run in runs.items()}, ROOT / "build/book/src"
    )
    return src, build_html(src, ROOT / "build" / "book")


@pytest.fixture(scope="module")
def book():
    _require_book_tools()
    return _built()


@pytest.mark.slow
def test_book_builds_with_every_internal_link_resolving(book):
    _, html = book
    assert (html / "index.html").exists() and (html / "notebooks" / "00_tour.html").exists()
    assert broken_links(html) == []
    for solution in (ROOT / "solutions").glob("*.ipynb"):  # the exercise list is generated
        assert f"exercises/{solution.name}" in (html / "exercises.html").read_text()
    # math is vendored, not fetched: the pages load MathJax from the site itself
    assert 'src="_static/mathjax/tex-chtml.js' in (html / "intro.html").read_text()
    assert (html / "_static" / "mathjax" / "output" / "chtml" / "fonts").is_dir()


@pytest.mark.slow
def test_a_broken_link_fails_the_book(book, tmp_path):
    src, _ = book
    broken = tmp_path / "src"
    shutil.copytree(src, broken)
    with open(broken / "intro.md", "a") as f:
        f.write("\nSee [the missing chapter](missing_chapter.md).\n")
    with pytest.raises(RuntimeError, match="missing_chapter"):
        build_html(broken, tmp_path / "out")


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="sub/page.html#here">ok</a> <a href="sub/page.html#gone">anchor</a>'
        '<img src="_images/none.png"> <a href="https://example.org/x">external</a>'
        '<a href="#top">self</a><span id="top"></span>'
    )
    (tmp_path / "sub" / "page.html").write_text('<h1 id="here">x</h1><a href="../nope.html">x</a>')
    assert sorted(broken_links(tmp_path)) == [
        "index.html: link to a missing anchor: sub/page.html#gone",
        "index.html: link to a missing file: _images/none.png",
        "sub/page.html: link to a missing file: ../nope.html",
    ]


def test_the_book_shows_a_note_instead_of_a_widget_and_drops_progress_bars():
    import nbformat

    widget = {"application/vnd.jupyter.widget-view+json": {"model_id": "a"}, "text/plain": "VBox()"}
    bar = {
        "application/vnd.jupyter.widget-view+json": {"model_id": "b"},
        "text/plain": "  0%|  | 0/1",
    }
    cell = nbformat.v4.new_code_cell("w")
    cell.outputs = [nbformat.v4.new_output("display_data", d) for d in (widget, bar)]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["widgets"] = {"state": {}}
    out = book_copy(nb)
    assert "widgets" not in out.metadata
    assert [o.data for o in out.cells[0].outputs] == [
        {"text/plain": "[interactive widget: open this notebook in JupyterLab to use it]"}
    ]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(book):
    _, html = book
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(html))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield html, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def _image_outputs(notebook_name: str) -> int:
    nb = book_copy(executed_notebooks()[notebook_name].notebook)
    return sum(
        any(m in out.get("data", {}) for m in IMAGE_MIMES)
        for cell in nb.cells
        for out in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_every_page_in_a_headless_browser(site):
    need(CHROMIUM.exists(), "/usr/bin/chromium")
    sync_api = _playwright()
    html, base = site
    pages = sorted(
        p.relative_to(html).as_posix()
        for p in html.rglob("*.html")
        if "_static" not in p.relative_to(html).parts
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        current = {"name": ""}

        def problem(text: str) -> None:
            problems.append(f"{current['name']}: {text}")

        page.on("console", lambda m: m.type == "error" and problem(f"console error: {m.text}"))
        page.on("pageerror", lambda e: problem(f"page error: {e}"))
        page.on("requestfailed", lambda r: problem(f"request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and problem(f"HTTP {r.status}: {r.url}"))
        page.on(
            "request",
            lambda r: (
                not r.url.startswith((base, "data:", "blob:"))
                and problem(f"external request: {r.url}")
            ),
        )
        ids_of: dict[str, set[str]] = {}
        links: dict[str, list[str]] = {}
        for name in pages:
            current["name"] = name
            page.goto(base + name, wait_until="networkidle")
            _check_math(page, problem)
            ids_of[name] = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
            links[name] = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
            if name.startswith("notebooks/"):
                expected = _image_outputs(Path(name).with_suffix(".ipynb").name)
                shown = page.evaluate(
                    "Array.from(document.querySelectorAll('.cell_output img'))"
                    ".filter(i => i.complete && i.naturalWidth > 0).length"
                )
                if shown < expected:
                    problem(f"shows {shown} figures, the notebook has {expected}")
            if name in SCREENSHOT_PAGES:
                page.screenshot(
                    path=str(SCREENSHOTS / name.replace("/", "_").replace(".html", ".png")),
                    full_page=True,
                )
        browser.close()
    for name, hrefs in links.items():
        for href in hrefs:
            url, fragment = urldefrag(href)
            if not url.startswith(base):
                continue
            target = urlsplit(url).path.lstrip("/") or "index.html"
            if target.endswith("/"):
                target += "index.html"
            if not (html / target).exists():
                problems.append(f"{name}: broken link {href}")
            elif fragment and target in ids_of and fragment not in ids_of[target]:
                problems.append(f"{name}: broken anchor {href}")
    assert problems == [], "\n".join(problems)
    assert {p.name for p in SCREENSHOTS.glob("*.png")} >= {"intro.png", "notebooks_00_tour.png"}


def _playwright():
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        need(False, "playwright (pip install -e '.[dev]')")
    return sync_api


def _check_math(page, problem) -> None:
    """Math is typeset (MathJax replaced every math node) and no raw TeX delimiter shows."""
    page.wait_for_function("() => !window.MathJax || !MathJax.startup || MathJax.startup.promise")
    page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
    n_math = page.locator(".math").count()
    n_typeset = page.locator("mjx-container").count()
    if n_math and n_typeset < n_math:
        problem(f"{n_math - n_typeset} of {n_math} math expressions not rendered")
    text = page.inner_text("main") if page.locator("main").count() else ""
    for raw in ("$$", "\\(", "\\["):
        if raw in text.replace("`$$`", ""):
            problem(f"raw math delimiter {raw!r} in the page text")


def test_committed_benchmark_results_get_a_page(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "kv_cache.json").write_text(
        '{"benchmark": "kv_cache", "environment": {"device": "NVIDIA H200", "torch": "2.11",'
        ' "date": "2026-11-28"}, "speedup": 12.3456, "rows": [{"T": 1}], "note": "a|b"}'
    )
    (results / "kv_cache.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (results / "README.txt").write_text("not a result")
    shutil.copytree(ROOT / "book", tmp_path / "book")
    try:
        monkeypatch.setenv("MINILLM_MATHJAX_DIR", str(find_mathjax(ROOT)))
    except FileNotFoundError:
        (tmp_path / "mj").mkdir()
        (tmp_path / "mj" / "tex-chtml.js").write_text("")
        monkeypatch.setenv("MINILLM_MATHJAX_DIR", str(tmp_path / "mj"))
        monkeypatch.setattr("minillm.exercises.book.MATHJAX_PARTS", ("tex-chtml.js",))
    src = assemble(tmp_path, {}, tmp_path / "src")
    page = (src / "benchmarks.md").read_text()
    assert "## kv_cache" in page and "NVIDIA H200; torch 2.11; 2026-11-28" in page
    assert "![kv_cache](benchmarks/results/kv_cache.png)" in page
    assert "| speedup | 12.35 |" in page and "| note | a\\|b |" in page and "rows" not in page
    assert (src / "benchmarks" / "results" / "kv_cache.png").exists()
    assert not (src / "benchmarks" / "results" / "README.txt").exists()
    assert "- file: benchmarks" in (src / "_toc.yml").read_text()
    assert (src / "_vendor" / "mathjax" / "tex-chtml.js").exists()
    assert (src / "exercise_list.md").read_text() == "No exercise has been published yet.\n"


def test_without_benchmark_results_there_is_no_empty_page(tmp_path):
    from minillm.exercises.book import benchmark_page

    (tmp_path / "results").mkdir()
    assert benchmark_page(tmp_path / "results") is None
