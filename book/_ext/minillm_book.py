"""Sphinx tweaks for the minillm book (loaded from _config.yml as a local extension).

The book never runs code in the browser, so it drops the scripts of sphinx-thebe, which
Jupyter Book 1.x always adds (twice, which throws "THEBE_JS_URL has already been declared"
in the console, and points at a CDN the offline book cannot reach).
"""


def _drop_thebe(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    context["script_files"] = [
        js
        for js in scripts
        if "thebe" not in str(getattr(js, "filename", "") or "")
        and "THEBE_JS_URL" not in str(getattr(js, "attributes", {}).get("body", ""))
    ]


def setup(app):
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
