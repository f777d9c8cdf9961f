"""What a reader sees of the figures, drawn by plotly.js in a real headless Chromium and read back
from the page (legend swatches, label boxes), and the images' watermark and size."""

import colorsys
import time
import re
from pathlib import Path

import numpy as np
import plotly
import plotly.offline
import pytest

from browser import chromium, js_errors, screenshot
from helpers.show import composites, page, plots, style
from helpers.analysis.branches import analyse_branches
from helpers.data.inception import architecture_slices
from helpers.analysis.labels import HUES, hue_name

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def analysis():
    rng = np.random.default_rng(0)
    decoder = rng.normal(size=(400, 512)).astype(np.float32)
    return analyse_branches("mixed4c", decoder, architecture_slices("mixed4c"), np.ones(400))


def render(browser, fig, tmp_path: Path, name: str) -> None:
    page = tmp_path / f"{name}.html"
    fig.write_html(page, include_plotlyjs="directory", full_html=True)  # plotly.min.js beside it, offline
    (tmp_path / "plotly.min.js").write_bytes(PLOTLY_JS.read_bytes())
    browser.get(page.as_uri())
    browser.execute_script("return 1")
    assert js_errors(browser) == []


def legend(browser) -> dict[str, tuple[int, int, int]]:
    """{legend entry text: the fill colour of its swatch, as drawn}."""
    entries = browser.execute_script("""
        return [...document.querySelectorAll('.legend .traces')].map(t => [
            t.querySelector('.legendtext').textContent,
            (s => s.fill !== 'none' ? s.fill : s.stroke)(getComputedStyle(
                t.querySelector('.legendpoints path') || t.querySelector('.legendlines path')))]);""")
    return {text: tuple(int(v) for v in re.findall(r"\d+", fill)[:3]) for text, fill in entries}


def boxes(browser, selector: str) -> list[dict]:
    return browser.execute_script(
        f"return [...document.querySelectorAll('{selector}')].map(e => e.getBoundingClientRect().toJSON())")


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def test_colour_sets_are_drawn_in_the_colour_they_name(browser, analysis, tmp_path):
    sets = {"animal": [1, 2, 3], "colour: blue": [4, 5], "colour: orange": [6, 7], "colour: green": [8],
            "colour: red": [9], "dog": [10]}
    render(browser, plots.branch_fraction_figure(analysis, "5x5", sets), tmp_path, "fractions")
    drawn = legend(browser)
    for name in ("blue", "orange", "green", "red"):  # the labeller names the drawn colour as the set
        assert hue_name(drawn[f"colour: {name}"])[0] == name, (name, drawn[f"colour: {name}"])
    for name in {n for n, _ in HUES}:
        assert hue_name(tuple(int(style.HUE_COLOURS[name][i:i + 2], 16) for i in (1, 3, 5)))[0] == name
    for name in ("animal", "dog"):  # sets that name no colour are drawn in no saturated hue
        assert colorsys.rgb_to_hsv(*(np.asarray(drawn[name]) / 255))[1] < 0.6, (name, drawn[name])


def test_a_highlight_that_holds_most_features_says_it_singles_nothing_out(browser, analysis, tmp_path):
    sets = {"animal": list(range(300)), "dog": [1, 2]}  # 300 of the 400 live features
    render(browser, plots.branch_fraction_figure(analysis, "5x5", sets), tmp_path, "most")
    drawn = legend(browser)
    assert "animal (300 of 400: most features, singles nothing out)" in drawn and "dog" in drawn, drawn


def test_the_two_baseline_labels_never_print_over_each_other(browser, analysis, tmp_path):
    b = 2  # the 5x5 branch; the worst case: both baselines at the same height
    analysis.gaussian.threshold[b] = analysis.shuffled.threshold[b]
    render(browser, plots.branch_fraction_figure(analysis, "5x5"), tmp_path, "baselines")
    labels = boxes(browser, ".annotation")
    assert len(labels) == 2
    assert not overlap(*labels), labels


def test_the_umap_colour_bar_does_not_cover_the_legend(browser, analysis, tmp_path):
    coords = np.random.default_rng(1).normal(size=(400, 2))
    fig = plots.umap_figure(coords, analysis, "5x5", {"animal-labelled": [1, 2, 3], "most 5x5-specialised": [4, 5]})
    render(browser, fig, tmp_path, "umap")
    legend_box, bar = boxes(browser, ".legend")[0], boxes(browser, ".colorbar")[0]
    assert not overlap(legend_box, bar), (legend_box, bar)
    assert set(legend(browser)) >= {"animal-labelled", "most 5x5-specialised"}
    screenshot(browser, "figure-umap-legend.png")


def test_the_watermark_is_translucent_and_hides_nothing():
    from PIL import Image

    base = (np.indices((300, 600)).sum(0)[..., None] % 7 * 30 + np.array([10, 60, 110])).astype(np.uint8)
    img = Image.fromarray(base.copy())
    composites.stamp(img, style.NOT_A_RESULT)
    after = np.asarray(img).astype(int)
    changed = (after != base).any(-1)
    assert 0.01 < changed.mean() < 0.2  # text across the figure, not a box over it
    assert not (after == 255).all(-1).any()  # no white box
    ys, xs = np.nonzero(changed)
    assert np.ptp(ys) > 0.6 * 300 and np.ptp(xs) > 0.6 * 600  # along the diagonal
    # where the text is, the figure still shows through: the change is partial
    diff = np.abs(after - base)[changed]
    assert np.median(diff.max(-1)) < 120


def test_figure_1_panels_stay_legible_at_page_width():
    crops = [np.zeros((100, 100, 3), np.uint8)] * 3
    entries = [(f"feature {i}: 5x5 fraction 0.50", np.zeros((224, 224, 3), np.uint8), crops) for i in range(6)]
    img = composites.figure1_layer_image("Figure 1, mixed4c", entries, random_weights=True)
    assert img.width <= 1100  # shown at about 780 px: its 15 px labels at 10.6 px or more


def test_figure_2_draws_every_layer_and_says_where_no_edge_arrives(browser, analysis, tmp_path):
    analyses = {layer: analysis for layer in ("mixed4b", "mixed4c", "mixed4d")}
    graph = {"nodes": [("mixed4b", 1), ("mixed4b", 2), ("mixed4c", 3)],
             "edges": [(("mixed4b", 1), ("mixed4c", 3), 0.5), (("mixed4b", 2), ("mixed4c", 3), 0.2)]}
    thumbs = {node: np.full((100, 100, 3), 40 * k, np.uint8) for k, node in enumerate(graph["nodes"])}
    render(browser, plots.circuit_figure(graph, analyses, "two seeds", ["mixed4b", "mixed4c", "mixed4d"], thumbs),
           tmp_path, "circuit")
    ticks = browser.execute_script("return [...document.querySelectorAll('.xtick text')].map(t => t.textContent)")
    assert ticks == ["mixed4b", "mixed4c", "mixed4d"]
    notes = browser.execute_script("return [...document.querySelectorAll('.annotation')].map(a => a.textContent)")
    assert notes == ["no positive edgeinto mixed4d"]
    assert browser.execute_script("return document.querySelectorAll('.layer-above image').length") == 3
    screenshot(browser, "figure-2-circuit.png")


def test_figures_5_to_10_draw_the_untrained_control_beside_the_features(browser, analysis, tmp_path):
    rng = np.random.default_rng(3)
    control = analyse_branches("mixed4c", rng.normal(size=(300, 512)).astype(np.float32),
                               architecture_slices("mixed4c"), np.ones(300))
    render(browser, plots.branch_fraction_figure(analysis, "5x5", {"animal": [1, 2]}, control=control),
           tmp_path, "control")
    assert "same pipeline, untrained network" in legend(browser)
    xs = browser.execute_script("return Array.from(document.querySelector('.plotly-graph-div')._fullData[1].x)")
    assert len(xs) == 300 and xs[0] == 0 and xs[-1] == pytest.approx(399)  # stretched over the 400 features


def test_a_figure_output_draws_itself_in_the_book_and_outside_it(browser, analysis, tmp_path):
    """In the book, plotly.js is the book's own (loaded deferred, so after the output's script): the
    figure waits for it and fetches nothing. Opened elsewhere with no plotly.js (the downloadable .ipynb
    on Colab), the output loads plotly.js from its CDN itself (offline here: only the request is checked)."""
    html = page.figure_html(plots.branch_fraction_figure(analysis, "5x5"))
    (tmp_path / "plotly.min.js").write_bytes(PLOTLY_JS.read_bytes())
    book = tmp_path / "book.html"
    book.write_text(f'<html><head><script defer src="plotly.min.js"></script></head><body>{html}</body></html>')
    browser.get(book.as_uri())
    for _ in range(50):
        if browser.execute_script("return document.querySelector('.plotly-graph-div .main-svg') !== null"):
            break
        time.sleep(0.1)
    assert browser.execute_script("return document.querySelector('.plotly-graph-div .main-svg') !== null")
    assert not browser.execute_script("return [...document.scripts].filter(s => s.src.startsWith('http')).length")
    assert js_errors(browser) == []
    bare = tmp_path / "notebook.html"
    bare.write_text(f"<html><head></head><body>{html}</body></html>")
    browser.get(bare.as_uri())
    time.sleep(0.3)
    cdn = browser.execute_script("return [...document.scripts].map(s => s.src).filter(s => s.startsWith('http'))")
    assert cdn == [page.PLOTLY_CDN.format(version=plotly.offline.get_plotlyjs_version())]


def test_a_markdown_table_keeps_its_columns_and_shows_text_as_text():
    """'|' inside a header or a value does not split the row (chapter 03's "max |x_hat - fast x_hat|"), and a
    class name that is markup stays text."""
    text = page.table([{"max |x_hat - x|": 0.5, "class": '<img src=x onerror="alert(1)">'}])
    header, rule, row = text.splitlines()
    assert header == "| max \\|x_hat - x\\| | class |" and rule == "|---|---|"
    assert row == '| 0.5 | &lt;img src=x onerror="alert(1)"&gt; |'
    assert "&lt;b&gt;" in page.moves_table([{"name": "<b>", "before": 0.5, "after": 0.25, "change": -0.25}])
