"""Keep each script once per page, and plotly.js and MathJax only on the pages that use them.

Sphinx 7.4 registers an inline script that an extension adds during ``builder-inited``
twice (once as filename None, once as ''), so sphinx-thebe's ``const THEBE_JS_URL`` is
declared twice and every page throws a SyntaxError. A local ``mathjax_path`` is likewise
added twice (once deferred by Sphinx's mathjax extension, once plain), and MathJax loaded
twice throws "Cannot set property Package". This keeps the first of each inline script and
of each file (whatever its attributes).
"""


def _once(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        if not hasattr(script, "attributes"):  # a plain file name
            key = str(script)
        elif script.filename:  # a file: once, whatever its attributes
            key = script.filename
        else:  # None and '' both mean "inline"
            key = ("inline", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


# a page that draws no plotly figure and typesets no formula loads neither library (plotly.js alone is 3.5 MB of
# script: about 0.25 s of a 2-core CPU on every page load; the book's own pages are half of them)
NEEDED = {"plotly.min.js": "plotly-graph-div", "tex-svg.js": "math notranslate"}


def _where_needed(app, pagename, templatename, context, doctree):
    body = context.get("body", "")
    context["script_files"] = [script for script in context.get("script_files", [])
                               if not any(str(getattr(script, "filename", script) or "").endswith(name)
                                          and marker not in body for name, marker in NEEDED.items())]


def setup(app):
    app.connect("html-page-context", _once, priority=900)
    app.connect("html-page-context", _where_needed, priority=901)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
