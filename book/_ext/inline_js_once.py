"""Keep each script once per page.

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


def setup(app):
    app.connect("html-page-context", _once, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
