"""Putting things on the page: the one way a chapter shows a figure, a table or an image.

``show`` labels every figure made with random weights, and in a book build (``run.book_build``)
emits plain HTML (plotly.js is served once by the book itself), since myst-nb drops plotly's own
output type; ``save`` writes PNG and SVG copies into the run's ``figures/`` folder (in a book build,
``defer`` keeps the figure and the build's ``save_deferred`` writes them all with one browser). ``run`` is
anything with ``random_weights``, ``book_build`` and ``run_dir`` (the run layer's ``Run``).
"""

from __future__ import annotations

import html

import plotly.graph_objects as go

from helpers.show.composites import stamp
from helpers.show.style import NOT_A_RESULT


def show(fig: go.Figure, ctx=None, save_as: str | None = None) -> None:
    """Display ``fig``, watermarked when ``ctx`` says the weights are random; with ``save_as``,
    also write it as PNG and SVG into the run's ``figures/`` folder (watermark included)."""
    from IPython.display import display

    if ctx is not None and ctx.random_weights and not any(a.text == NOT_A_RESULT for a in fig.layout.annotations):
        fig.add_annotation(text=NOT_A_RESULT, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=28, color="rgba(200,0,0,0.25)"), textangle=-15)
    if save_as and ctx is not None:
        (defer if ctx.book_build else save)(fig, ctx.run_dir / "figures", save_as)
    if ctx is not None and ctx.book_build:
        import json

        display({"text/html": figure_html(fig), "application/vnd.plotly.v1+json": json.loads(fig.to_json())}, raw=True)
    else:
        fig.show()


PLOTLY_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"
# On a phone (a figure narrower than 600 px): the legend under the plot instead of beside it (it took 40% of figures
# 5-10), titles wrapped and smaller (they were cut), axis titles and subplot titles smaller, so that those of panels
# side by side do not run together; the figure grows by the legend's height instead of squeezing the plot.
NARROW_JS = (
    "function narrow(div, l) { if (!div || div.clientWidth >= 600) return;"
    " var wrap = function (t) { return t.replace(/(.{1,34})(\\s+|$)/g, '$1<br>').replace(/(<br>)+$/, ''); };"
    " var small = function (o, size) { o = (typeof o === 'string') ? {text: o} : (o || {}); o.font = Object.assign({}, o.font, {size: size}); return o; };"
    " if (l.title) { l.title = small(l.title, 13); if (l.title.text) l.title.text = wrap(l.title.text); }"
    " var extra = 0;"
    " if (l.showlegend !== false) { l.legend = Object.assign({}, l.legend, {orientation: 'h', x: 0, xanchor: 'left',"
    " yref: 'container', y: 0, yanchor: 'bottom', font: {size: 10}}); extra = 110; }"
    " Object.keys(l).filter(function (k) { return /^[xy]axis\\d*$/.test(k); }).forEach(function (k) {"
    " if (l[k].title) l[k].title = small(l[k].title, 10); l[k].tickfont = Object.assign({}, l[k].tickfont, {size: 9}); });"
    " (l.annotations || []).forEach(function (a) { a.font = Object.assign({}, a.font, {size: Math.min((a.font || {}).size || 12, 11)}); });"
    " var m = l.margin || {}; l.margin = Object.assign({}, m, {l: 40, r: 8, t: Math.max(m.t || 60, 70), b: (m.b || 60) + extra});"
    " l.height = (l.height || 450) + extra; div.style.height = l.height + 'px'; }"
)


def figure_html(fig: go.Figure) -> str:
    """The figure as an HTML output that draws itself wherever it is opened: in the book with the book's
    own plotly.js (offline: it waits for the page's scripts, which load it); in a notebook opened
    elsewhere (the book's downloadable .ipynb on Colab, say), where no plotly.js is loaded, with
    plotly.js from its CDN. (JupyterLab renders the plotly mimetype beside it instead.)"""
    import json
    import uuid

    from plotly.offline import get_plotlyjs_version

    div = f"fig-{uuid.uuid4().hex[:12]}"
    spec = json.loads(fig.to_json())  # plotly's own encoding (typed arrays included), read back to add the config
    spec["config"] = {"displaylogo": False, "responsive": True}
    spec = json.dumps(spec).replace("</", "<\\/")  # no "</script>" can end the script early
    cdn = PLOTLY_CDN.format(version=get_plotlyjs_version())
    return (f'<div id="{div}" class="plotly-graph-div" style="height:{fig.layout.height or 450}px; width:100%;"></div>\n'
            f"<script>(function () {{\n"
            f"  var spec = {spec};\n"
            f'  function draw() {{ narrow(document.getElementById("{div}"), spec.layout); '
            f'Plotly.newPlot("{div}", spec.data, spec.layout, spec.config); }}\n'
            f"  {NARROW_JS}\n"
            f"  function go() {{\n"
            f"    if (window.Plotly) {{ draw(); return; }}\n"
            f'    var s = document.createElement("script"); s.src = "{cdn}"; s.onload = draw; document.head.appendChild(s);\n'
            f"  }}\n"
            f'  if (document.readyState === "complete") go(); else window.addEventListener("load", go);\n'
            f"}})();</script>")


def markdown(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def cell(value) -> str:
    """A value as the text of one Markdown table cell: floats to 4 significant digits; '|' escaped (a header
    such as "max |x_hat - x|" would otherwise split the row) and HTML's special characters written as
    entities (a class name from a downloaded file is text, never markup)."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    """A Markdown table from a list of dicts with the same keys."""
    if not rows:
        return "*(nothing)*"
    keys = list(rows[0])
    lines = ["| " + " | ".join(cell(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def moves_table(rows: list[dict]) -> str:
    """Chapter 08's ``class_moves`` rows as a Markdown table: each class's probability before and after, the change."""
    return table([{"class": r["name"], "probability before": float(f"{r['before']:.3g}"),
                   "after": float(f"{r['after']:.3g}"), "change": float(f"{r['change']:.3g}")} for r in rows])


def banner(ctx) -> None:
    """The profile banner: a MyST admonition in the book, a coloured box in a live notebook."""
    from IPython.display import HTML, Markdown, display

    text = ctx.banner()
    if ctx.book_build:
        display(Markdown(text))
        return
    import re

    kind = "warning" if text.startswith(":::{warning}") else "note"
    paragraphs = text.split("\n", 1)[1].rsplit(":::", 1)[0].strip().split("\n\n")
    body = "".join(p if p.startswith(("<details", "</details")) else  # the folded part stays folded
                   "<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(p)) + "</p>" for p in paragraphs)
    colour = "#fdecea" if kind == "warning" else "#e8f0fe"
    display(HTML(f'<div style="background:{colour};padding:8px 12px;border-radius:4px">{body}</div>'))


SAVE_TIMEOUT = 120  # seconds a figure's PNG and SVG may take before saving gives up (a browser that never answers)
_BROWSER: dict = {}  # "state": "kept" (kaleido's one browser for this process), "one-shot" or "failed"


def _browser() -> str:
    """Kaleido's browser for this process's figures: one kept open (about 0.15 s a file after the first, against
    about 1 s for a browser started per figure), once Chrome is known to be there; else one browser per call."""
    if "state" not in _BROWSER:
        import kaleido

        try:
            kaleido.Kaleido()  # finds Chrome without starting it (ChromeNotFoundError where there is none)
            kaleido.start_sync_server(silence_warnings=True)  # closed by kaleido at exit
            _BROWSER["state"] = "kept"
        except Exception:  # no Chrome: each save says so (the interactive figure still stands)
            _BROWSER["state"] = "one-shot"
    return _BROWSER["state"]


def _render(fig: go.Figure, formats: tuple[str, ...], height: int) -> list[bytes]:
    """The figure as bytes in each format, in a thread watched for ``SAVE_TIMEOUT`` seconds."""
    import threading
    import warnings

    import plotly.io as pio

    out: dict = {}

    def render():
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                out["images"] = [pio.to_image(fig, format=f, width=900, height=height) for f in formats]
        except Exception as e:
            out["error"] = e

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(SAVE_TIMEOUT)
    if worker.is_alive():
        _BROWSER["state"] = "failed"
        raise TimeoutError(f"kaleido did not answer in {SAVE_TIMEOUT} s; no more figures are saved in this process")
    if "error" in out:
        raise out["error"]
    return out["images"]


def save(fig: go.Figure, folder, stem: str) -> list:
    """Write ``stem``.png and .svg (needs kaleido and a Chrome/Chromium); returns the files written."""
    import logging
    from pathlib import Path

    from helpers.files import atomic_write

    folder = Path(folder)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    quiet = logging.getLogger("choreographer")  # kaleido's browser channel logs harmless decoding errors
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if _browser() == "failed":
            raise RuntimeError("an earlier figure's browser never answered")
        images = _render(fig, ("png", "svg"), fig.layout.height or 450)
    except Exception as e:  # no kaleido or no browser: the interactive figure still stands
        logging.getLogger(__name__).warning("could not write %s.png/.svg: %s", stem, e)
        return []
    finally:
        quiet.setLevel(level)
    for path, data in zip(paths, images):
        atomic_write(path, lambda f, data=data: f.write(data))
    return paths


DEFERRED = "deferred"  # the sub-folder of figures/ where a book build's kernels leave their figures to save


def defer(fig: go.Figure, folder, stem: str) -> None:
    """Keep ``fig`` as ``folder``/deferred/``stem``.json for ``save_deferred``: in a book build each chapter's
    kernel would otherwise start a browser of its own for its PNGs and SVGs (about 2 s of CPU each)."""
    from pathlib import Path

    from helpers.files import atomic_write

    atomic_write(Path(folder) / DEFERRED / f"{stem}.json", lambda f: f.write(fig.to_json()), mode="w")


def save_deferred(folder) -> list:
    """Write the PNG and SVG of every figure ``defer`` kept in ``folder``, with one browser (``save``; a figure
    that cannot be written is warned about, as there), and forget them; returns the files written."""
    from pathlib import Path

    import plotly.io as pio

    kept, written = Path(folder) / DEFERRED, []
    for path in sorted(kept.glob("*.json")):
        written += save(pio.from_json(path.read_text()), folder, path.stem)
        path.unlink()
    if kept.is_dir() and not any(kept.iterdir()):
        kept.rmdir()
    return written


def show_image(img, ctx=None, save_as: str | None = None) -> None:
    """Display a PIL image (PNG); with ``save_as``, also write it into the run's ``figures/``."""
    from IPython.display import Image as IPImage, display

    from helpers.files import atomic_write

    if save_as and ctx is not None:
        path = ctx.run_dir / "figures" / f"{save_as}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    display(IPImage(data=buf.getvalue(), format="png"))


def stamped(img, ctx):
    """``img`` with the random-weights stamp when ``ctx`` says so."""
    if ctx is not None and ctx.random_weights:
        stamp(img, NOT_A_RESULT)
    return img
