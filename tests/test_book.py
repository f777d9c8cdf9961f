"""The built book, opened in a real headless Chromium."""

import json
import re
import time

import numpy as np
import pytest
import yaml

from browser import chromium, js_errors, screenshot
from helpers.run.profiles import ROOT

MATH = {"nbs/03_training": 3, "nbs/04_branch_specialization": 3}  # at least this many typeset formulas
FIGURES = {"nbs/01_inceptionv1_branches": 1, "nbs/02_harvesting": 2, "nbs/03_training": 3,
           "nbs/04_branch_specialization": 6, "nbs/05_circuits": 2, "nbs/06_umap": 4, "nbs/08_feature_explorer": 1,
           "nbs/09_comparing_saes": 2}


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_every_page_is_built_with_the_profile_banner(smoke_book):
    html = smoke_book["html"]
    for page in toc_pages():
        text = (html / f"{page}.html").read_text()
        if page != "book/references":
            assert "Not a result" in text and "smoke" in text, page
        assert "plotly.js v" not in text and len(text) < 5_000_000, f"{page}: plotly.js inlined?"
        # plotly.js loaded by the pages that draw a figure, and only by them (3.5 MB of script on every load)
        assert ("_static/plotly.min.js" in text) == (FIGURES.get(page, 0) > 0), page
    assert (html / "_static" / "plotly.min.js").stat().st_size > 1_000_000
    assert (html / "book" / "references.html").read_text().count("Bozoukov") >= 1


def test_the_reference_list_labels_works_as_the_text_cites_them(smoke_book):
    html = smoke_book["html"]
    intro, references = (html / "book" / "intro.html").read_text(), (html / "book" / "references.html").read_text()
    assert "Voss" in intro and "2021" in intro
    assert "Voss et al., 2021" in references and "Bozoukov, 2025" in references
    assert "VGC+21" not in references and "Boz25" not in references


def test_a_downloaded_chapter_says_its_figures_need_the_internet_once(smoke_book):
    """The book's download button serves the staged notebook: it carries the note, the page does not."""
    html = smoke_book["html"]
    downloaded = json.loads((html / "_sources" / "nbs" / "04_branch_specialization.ipynb").read_text())
    note = [c for c in downloaded["cells"] if "fetched from the internet the first time" in "".join(c["source"])]
    assert len(note) == 1 and downloaded["cells"].index(note[0]) == 1
    assert "fetched from the internet the first time" not in (html / "nbs" / "04_branch_specialization.html").read_text()


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def test_pages_load_and_draw_their_figures_without_js_errors(smoke_book, browser):
    html = smoke_book["html"]
    for page in toc_pages():
        browser.get((html / f"{page}.html").as_uri())
        deadline = time.time() + 10
        while time.time() < deadline:
            drawn = browser.execute_script(
                "return [...document.querySelectorAll('.plotly-graph-div')].filter(d => d.querySelector('.main-svg')).length")
            if drawn >= FIGURES.get(page, 0):
                break
            time.sleep(0.2)
        divs = browser.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
        assert drawn == divs == FIGURES.get(page, 0), f"{page}: {drawn} of {divs} figures drawn"
        broken = browser.execute_script(
            "return [...document.images].filter(i => i.src.startsWith('file:') && !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.src)")
        assert broken == [], f"{page}: images not loaded {broken}"
        assert js_errors(browser) == [], page
        assert browser.execute_script("return document.querySelector('h1') !== null"), page
        assert "default_exp" not in browser.execute_script("return document.querySelector('main').innerText"), page
        if page in MATH:  # MathJax from the book's own files has typeset the formulas: no raw TeX left
            deadline = time.time() + 10
            while time.time() < deadline and not browser.execute_script(
                    "return document.querySelectorAll('mjx-container svg').length"):
                time.sleep(0.2)
            assert browser.execute_script("return document.querySelectorAll('mjx-container svg').length") >= MATH[page]
            assert "$$" not in browser.execute_script("return document.querySelector('main').innerText"), page
        scripts = browser.execute_script("return [...document.scripts].map(s => s.src).filter(s => s)")
        assert page not in MATH or [s for s in scripts if "_static/mathjax/tex-svg.js" in s], page
        assert not [s for s in scripts if s.startswith("http")], f"{page} loads scripts from the network: {scripts}"
        if page != "book/references":  # the offline banner's command line copies as typed: no en dash
            text = browser.execute_script("return document.querySelector('main').textContent")  # the folded part too
            assert "--weights PATH.pth" in text and "\u2013weights" not in text, page
        if page == "book/intro":
            screenshot(browser, "book-intro.png")
        if page == "nbs/04_branch_specialization":
            screenshot(browser, "book-04-branch-specialization.png")


def test_the_banner_says_what_a_reader_needs_and_folds_the_rest(smoke_book, browser):
    """Random weights, and how to get the real ones, in a few lines; the build machine's error and paths folded
    away (on a phone the banner once filled more than a screen)."""
    browser.set_window_size(390, 844)
    try:
        browser.get((smoke_book["html"] / "nbs" / "01_inceptionv1_branches.html").as_uri())  # a light page: 0.5 s
        box = browser.find_element("css selector", ".admonition.warning")
        shown = box.text  # what is rendered: the folded part is not
        assert "Not a result" in shown and "make book PROFILE=cpu" in shown
        assert "inception5h.pth" not in shown and "could not download" not in shown
        assert box.size["height"] < 500, box.size
        browser.find_element("css selector", ".admonition.warning details summary").click()
        assert "could not download the pretrained InceptionV1 weights" in box.text
    finally:
        browser.set_window_size(1300, 2400)


def test_the_atlas_page_of_the_book_leads_to_each_layer_and_back(smoke_book, browser):
    """Its five links once pointed at '#../atlas/...' (a cross-reference MyST could not resolve), so a click stayed
    on the page; the atlas's index had no way back to the book, and no viewport for a phone."""
    html = smoke_book["html"]
    browser.get((html / "book" / "atlas.html").as_uri())
    links = browser.find_elements("css selector", "ul.atlas-links a")
    assert [a.text for a in links] == ["mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"]
    links[2].click()
    assert browser.title == "mixed4c: feature atlas"
    assert browser.find_element("css selector", "meta[name=viewport]").get_attribute("content").startswith("width=device-width")
    browser.get((html / "atlas" / "index.html").as_uri())
    browser.find_element("id", "book").click()
    deadline = time.time() + 10  # the book's index.html redirects to its first page
    while time.time() < deadline and not browser.find_elements("css selector", "nav, .bd-sidebar, #site-navigation"):
        time.sleep(0.2)
    assert "/atlas/" not in browser.current_url and browser.current_url.endswith(".html")  # the book (its intro)
    assert browser.find_elements("css selector", "nav, .bd-sidebar, #site-navigation")  # the book's page
    assert js_errors(browser) == []


@pytest.mark.parametrize("width", [1280, 390])
def test_wide_figures_fit_the_page_from_a_phone_to_a_desktop(smoke_book, browser, width):
    """Chapter 08's image-features figure was fixed at 1100 px (its maps scrolled sideways inside the output);
    figure 1's all-branch grid was 1722 px shown at 688 (labels about 4 px)."""
    browser.set_window_size(width, 1600)
    try:
        browser.get((smoke_book["html"] / "nbs" / "08_feature_explorer.html").as_uri())
        deadline = time.time() + 10
        while time.time() < deadline and not browser.execute_script(
                "return document.querySelectorAll('.plotly-graph-div .main-svg').length"):
            time.sleep(0.2)
        sizes = browser.execute_script("""return [...document.querySelectorAll('.plotly-graph-div')].map(d => [
            d.querySelector('.main-svg').getBoundingClientRect().width, d.parentElement.clientWidth,
            d.getBoundingClientRect().right, document.documentElement.clientWidth])""")
        assert sizes and all(svg <= box + 1 and right <= page + 1 for svg, box, right, page in sizes), sizes
        browser.get((smoke_book["html"] / "nbs" / "07_feature_visualization.html").as_uri())
        shown = browser.execute_script("""return [...document.images].filter(i => i.naturalWidth > 0 &&
            i.naturalHeight > 2 * i.naturalWidth).map(i => [i.getBoundingClientRect().width, i.naturalWidth])""")
        assert shown, "figure 1's all-branch image (taller than wide) is on the page"
        if width >= 1280:
            assert all(w / natural >= 0.7 for w, natural in shown), shown  # labels of 14 px stay at 10 px or more
    finally:
        browser.set_window_size(1300, 2400)


def test_the_contents_open_on_a_phone_and_a_desktop_has_one_search_box(smoke_book, browser):
    """The toggle a reader sees on a phone or tablet once opened nothing (the theme wired only a hidden one); a
    desktop showed two search boxes and an empty band above the page."""
    page = (smoke_book["html"] / "nbs" / "01_inceptionv1_branches.html").as_uri()  # every page's contents; 0.5 s
    try:
        for width in (390, 800):
            browser.set_window_size(width, 900)
            browser.get(page)
            [toggle] = [b for b in browser.find_elements("css selector", ".primary-toggle") if b.is_displayed()]
            toggle.click()
            deadline = time.time() + 5
            while time.time() < deadline and not browser.execute_script(
                    "return document.getElementById('pst-primary-sidebar-modal').open"):
                time.sleep(0.1)
            links = [a.text for a in browser.find_elements("css selector", "#pst-primary-sidebar-modal a") if a.is_displayed()]
            assert "What holds" in links and "Circuits between layers" in links, (width, links)
            assert js_errors(browser) == []
        browser.set_window_size(1280, 900)
        browser.get(page)
        boxes = [b for b in browser.find_elements("css selector", ".search-button-field") if b.is_displayed()]
        assert len(boxes) == 1
        assert browser.execute_script("return document.querySelector('.bd-header').getBoundingClientRect().height") == 0
    finally:
        browser.set_window_size(1300, 2400)


def test_figures_on_a_phone_keep_legends_off_the_plot_and_titles_whole(smoke_book, browser):
    """At 390 px the legend took 40% of figures 5-10, titles were cut and chapter 03's side-by-side x-axis titles
    ran together: on a phone every figure's legend sits under its plot, its title inside the figure, and no two
    axis titles overlap."""
    overlap = ("(a, b) => a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1")
    browser.set_window_size(390, 844)
    try:
        for chapter in ("03_training", "04_branch_specialization", "05_circuits", "06_umap"):
            browser.get((smoke_book["html"] / "nbs" / f"{chapter}.html").as_uri())
            deadline = time.time() + 10
            while time.time() < deadline and browser.execute_script(
                    "return [...document.querySelectorAll('.plotly-graph-div')].some(d => !d.querySelector('.main-svg'))"):
                time.sleep(0.2)
            found = browser.execute_script(f"""const overlap = {overlap};
                return [...document.querySelectorAll('.plotly-graph-div')].map(d => {{
                  const box = e => e.getBoundingClientRect(), svg = box(d.querySelector('.main-svg'));
                  const plots = [...d.querySelectorAll('.nsewdrag')].map(box);
                  const legend = d.querySelector('.legend'), title = d.querySelector('.gtitle');
                  const axes = [...d.querySelectorAll('.g-xtitle text, [class^="g-x"][class$="title"] text')].map(box)
                                 .filter(b => b.width > 0);
                  return {{legend_on_plot: !!legend && plots.some(p => overlap(box(legend), p)),
                          title_cut: !!title && (box(title).left < svg.left - 1 || box(title).right > svg.right + 1),
                          axes_overlap: axes.some((a, i) => axes.some((b, j) => i < j && overlap(a, b)))}};
                }});""")
            bad = [(i, f) for i, f in enumerate(found) if any(f.values())]
            assert found and not bad, (chapter, bad)
    finally:
        browser.set_window_size(1300, 2400)


def test_chapter_03s_table_of_the_fast_sae_renders_as_a_table(smoke_book, browser):
    """Its header holds '|' characters ("max |x_hat - fast x_hat|"), which once split the Markdown row so the
    whole table printed as raw text."""
    browser.get((smoke_book["html"] / "nbs" / "03_training.html").as_uri())
    headers = browser.execute_script("return [...document.querySelectorAll('table th')].map(t => t.textContent.trim())")
    assert "max |x_hat - fast x_hat|" in headers and "same winners" in headers
    text = browser.execute_script("return document.body.innerText")
    assert "| layer |" not in text


def test_the_atlas_shows_every_feature_and_opens_a_detail_view(smoke_book, browser):
    html = smoke_book["html"]
    assert (html / "atlas" / "index.html").exists()
    for layer in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"):
        page = html / "atlas" / layer / "index.html"
        text = page.read_text()
        assert "RANDOM WEIGHTS: NOT A RESULT" in text and "http" not in text.split("<script>")[0]  # no CDN
    browser.get((html / "atlas" / "mixed4c" / "index.html").as_uri())
    # the layer header says how much of the network the SAE keeps: chapter 03's spliced-in row, as recorded
    spliced = json.loads(smoke_book["run"].joinpath("saes", "mixed4c", "spliced.json").read_text())["rows"][0]
    header = browser.execute_script("return document.querySelector('.note').innerText")
    assert f"top-1 agreement with the network {spliced['top-1 agreement']:.2f}" in header
    assert f"KL recovered {spliced['KL recovered']:.2f}" in header
    assert "This layer's SAE: trained here." in header  # whose SAE the page shows (the author's, where had)
    cells = browser.find_elements("css selector", "#groups .f")
    alive = int(smoke_book["run"].joinpath("saes", "mixed4c", "cfg.json").exists())
    assert len(cells) > 100 and alive
    sprite = browser.execute_script(
        "const i = new Image(); i.src = 'thumbs.jpg';"
        "return new Promise(r => { i.onload = () => r(i.naturalWidth); i.onerror = () => r(-1); })")
    assert sprite > 0
    cells[3].click()
    title = browser.execute_script("return document.getElementById('detail-title').textContent")
    assert title.startswith("mixed4c feature ")  # the title names the layer
    assert "not shares" in browser.execute_script("return document.getElementById('detail').innerText")
    crops = browser.execute_script("const c = document.querySelector('#detail .crops'); "
                                   "return [c.offsetWidth, c.offsetHeight]")
    assert crops[1] >= 96 and crops[0] >= 3 * 96  # large enough to see
    assert browser.execute_script("return document.querySelectorAll('#detail .bar').length") == 4
    assert js_errors(browser) == []
    screenshot(browser, "atlas-mixed4c.png")
    link = browser.find_elements("css selector", "#detail a")[0]
    link.click()  # a neighbour in the adjacent layer's atlas
    time.sleep(0.3)
    assert "/atlas/mixed4" in browser.current_url and "#f" in browser.current_url
    assert " feature " in browser.execute_script("return document.getElementById('detail-title').textContent")
    assert js_errors(browser) == []
    browser.get((html / "atlas" / "mixed4c" / "index.html").as_uri())
    browser.find_element("id", "back").click()  # every atlas page leads back to the book
    time.sleep(0.5)  # the book's index.html redirects to its first page
    assert "/atlas/" not in browser.current_url and browser.execute_script("return document.querySelector('h1') !== null")
    browser.get((html / "book" / "intro.html").as_uri())  # the atlas is in the sidebar and the intro
    sidebar = browser.execute_script("return [...document.querySelectorAll('nav a')].map(a => a.textContent.trim())")
    assert "The feature atlas" in sidebar
    browser.get((html / "book" / "atlas.html").as_uri())
    browser.find_element("link text", "mixed4c").click()
    assert browser.current_url.endswith("/atlas/mixed4c/index.html") and js_errors(browser) == []


def test_the_atlas_searches_filters_shares_a_url_and_shows_histograms(smoke_book, browser):
    from selenium.webdriver.support.ui import Select

    from helpers.run.artifacts import open_run

    run = open_run("smoke", run_dir=str(smoke_book["run"]))
    a, ex = run.branches("mixed4c"), run.examples("mixed4c")
    labels = run.labels("mixed4c")
    five = a.alive & (a.dominant() == 2)
    page = smoke_book["html"] / "atlas" / "mixed4c" / "index.html"
    browser.get(page.as_uri())
    density = browser.execute_script("return document.getElementById('density').innerText")
    assert f"{int(a.alive.sum())} live, {int((~a.alive).sum())} dead" in density
    visible = lambda: browser.execute_script(
        "return [...document.querySelectorAll('#groups .f')].filter(e => e.style.display !== 'none').map(e => +e.id.slice(1))")
    assert len(visible()) == int(a.alive.sum())
    Select(browser.find_element("id", "q-branch")).select_by_value("5x5")
    assert sorted(visible()) == sorted(int(f) for f in np.flatnonzero(five))  # the filter changes what is shown
    browser.find_element("id", "q-label").send_keys("animal")
    animal = [int(f) for f in np.flatnonzero(five) if "animal" in labels[f].get("labels", {})]
    assert sorted(visible()) == animal
    url = browser.current_url
    assert "branch=5x5" in url and "label=animal" in url
    browser.get("about:blank")
    browser.get(url)  # the URL carries the filter
    assert sorted(visible()) == animal
    f = int(np.flatnonzero(a.alive & (ex.sample_image >= 0).any(1))[0])
    box = browser.find_element("id", "q-id")
    box.send_keys(str(f))
    box.send_keys("\n")
    browser.execute_script("document.getElementById('q-id').dispatchEvent(new Event('change'))")
    assert browser.execute_script("return document.getElementById('detail-title').textContent") == f"mixed4c feature {f}"
    assert browser.current_url.endswith(f"#f{f}")
    counts = browser.execute_script("return [...document.querySelectorAll('#hist .hbar')].map(b => +b.title.split(' ')[0])")
    assert len(counts) == 10 and sum(counts) == int((ex.sample_image[f] >= 0).sum())
    assert js_errors(browser) == []
    screenshot(browser, "atlas-filtered.png")


def test_the_atlas_reads_fractions_against_chance(smoke_book, browser):
    """A feature's bars carry the chance level of each branch and its excess (a "5x5-dominant" feature whose largest
    bar was 3x3 at 0.69 read as a contradiction); the filter is by excess over chance; a hash change on the page
    opens that feature; ?branch=5X5 means 5x5 and an unknown branch is said; the histogram has axes and the UMAP
    fits its column."""
    from helpers.analysis.branches import BRANCHES
    from helpers.run.artifacts import open_run

    run = open_run("smoke", run_dir=str(smoke_book["run"]))
    a = run.branches("mixed4c")
    chance = a.shuffled.mean
    excess = a.fractions - chance
    alive = np.flatnonzero(a.alive)
    # a feature whose largest raw fraction is not its group (where one exists), else any live one
    odd = [int(f) for f in alive if a.fractions[f].argmax() != excess[f].argmax()]
    f = odd[0] if odd else int(alive[0])
    page = smoke_book["html"] / "atlas" / "mixed4c" / "index.html"
    browser.get(page.as_uri() + f"#f{f}")
    rows = browser.execute_script("return [...document.querySelectorAll('#detail .branch-row')].map(r => r.textContent)")
    assert len(rows) == 4
    for b, row in zip(BRANCHES, rows):
        i = BRANCHES.index(b)
        shown = re.search(r"chance ([0-9.]+), excess ([+-][0-9.]+)", row)
        assert shown, row  # two decimals, the excess from the page's rounded fraction and chance: within 0.01
        assert abs(float(shown[1]) - chance[i]) <= 0.0051 and abs(float(shown[2]) - excess[f, i]) <= 0.0101, row
    group = BRANCHES[int(excess[f].argmax())]
    assert "its group" in rows[BRANCHES.index(group)]
    ticks = browser.execute_script("return [...document.querySelectorAll('#detail .chance')].map(t => t.offsetLeft)")
    assert ticks == [round(200 * float(f"{c:.3f}")) for c in chance]
    other = int(alive[-1])
    browser.execute_script(f"location.hash = '#f{other}'")  # the same page, another feature
    time.sleep(0.2)
    assert browser.execute_script("return document.getElementById('detail-title').textContent") == f"mixed4c feature {other}"
    box = browser.execute_script("return document.getElementById('umap').getBoundingClientRect().right")
    column = browser.execute_script("return document.getElementById('detail').getBoundingClientRect().right")
    assert box <= column + 1
    assert browser.execute_script("return document.getElementById('hist-axis').textContent").startswith("0activation")
    visible = lambda: browser.execute_script(
        "return [...document.querySelectorAll('#groups .f')].filter(e => e.style.display !== 'none').map(e => +e.id.slice(1))")
    threshold = 0.05
    browser.get(page.as_uri() + f"?excess={threshold}")
    want = sorted(int(g) for g in alive if excess[g, excess[g].argmax()] >= threshold - 5e-4)
    assert sorted(visible()) == want
    browser.get(page.as_uri() + "?branch=5X5")
    five = sorted(int(g) for g in alive if a.dominant()[g] == 2)
    assert sorted(visible()) == five
    browser.get(page.as_uri() + "?branch=7x7")
    assert 'no branch "7x7"' in browser.execute_script("return document.getElementById('shown').textContent")
    assert js_errors(browser) == []


def test_the_atlas_looks_into_an_image_and_switches_features_off(smoke_book, browser):
    """The atlas's image view against the run's own probe: every cell is coloured by the dominant branch of the
    features the SAE finds there, hovering a cell lists exactly them (a click opens one), and each precomputed
    switch shows its class moves."""
    import torch

    from helpers.run.artifacts import open_run
    from helpers.show.atlas import ATLAS_IMAGES
    from helpers.show.style import BRANCH_COLOURS
    from helpers.data.inception import BRANCHES

    run = open_run("smoke", run_dir=str(smoke_book["run"]))
    probe = run.probe("mixed4c")
    images = run.first_images(ATLAS_IMAGES)
    # the second image's features, from the SAE's equation on the network's own activations (not the probe's code)
    from helpers.analysis.image_features import ImageFeatures
    from helpers.data.inception import LayerCapture
    from helpers.sae.loss import topk_sae

    sae = probe.sae
    with torch.no_grad():
        acts = LayerCapture(probe.model, ["mixed4c"])(probe.input(images[1:2]))["mixed4c"][0]
        _, z = topk_sae(acts.permute(1, 2, 0).reshape(196, -1), sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k)
    values, ids = z.reshape(14, 14, -1).topk(5, dim=-1)
    found = ImageFeatures("mixed4c", torch.where(values > 0, ids, -1).numpy(), values.numpy(), None,
                          [(int(z.sum(dim=0).argmax()), None)], None)  # what the page should show
    records = run.view("mixed4c").image_records
    browser.get((smoke_book["html"] / "atlas" / "mixed4c" / "index.html").as_uri())
    assert len(browser.find_elements("css selector", "#image-strip .pick")) == len(images) == len(records)
    browser.find_element("id", "img1").click()
    colour = lambda b: "rgba({}, {}, {}, 1)".format(*(int(BRANCH_COLOURS[b][i:i + 2], 16) for i in (1, 3, 5)))
    fired = [(y, x) for y in range(14) for x in range(14) if found.ids[y, x, 0] >= 0]
    assert fired
    for y, x in fired[:: max(1, len(fired) // 6)]:
        cell = browser.find_element("id", f"cell-{y}-{x}")
        assert cell.value_of_css_property("background-color") == colour(BRANCHES[probe.dominant[found.ids[y, x, 0]]])
        browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseover'))", cell)
        listed = browser.execute_script("return [...document.querySelectorAll('#at a')].map(a => +a.dataset.id)")
        assert listed == [f for f, _ in found.features_at(y, x)]
    y, x = fired[-1]
    browser.find_element("id", f"cell-{y}-{x}").click()  # keeps the cell's list while the pointer moves to it
    browser.find_element("css selector", "#at a").click()  # a listed feature opens its detail
    assert browser.execute_script("return document.getElementById('detail-title').textContent") == \
        f"mixed4c feature {found.features_at(y, x)[0][0]}"
    switches = records[1]["switches"]
    assert switches and switches[0]["what"] == f"feature {found.strongest[0][0]} off"
    from selenium.webdriver.support.ui import Select

    for j, sw in enumerate(switches):
        Select(browser.find_element("id", "switch")).select_by_value(str(j))
        shown = browser.execute_script("return [...document.querySelectorAll('#moves tr')].slice(1).map(r => r.cells[0].textContent)")
        assert shown == [r["name"] for r in sw["rows"]]
    x1 = probe.input(images[1:2])
    with torch.no_grad():
        rows = probe.switch(x1, [found.strongest[0][0]])[0]
    assert [r["name"] for r in rows] == [r["name"] for r in switches[0]["rows"]]
    assert np.allclose([r["change"] for r in rows], [r["change"] for r in switches[0]["rows"]], rtol=2e-2, atol=1e-12)
    assert js_errors(browser) == []
    screenshot(browser, "atlas-image.png")
