"""The live explorer, driven as a user would, on the smoke book's run."""

import numpy as np

from helpers.analysis.branches import BRANCHES, dominant_branch
from helpers.run.artifacts import open_run
from helpers.show.explorer import Explorer


def test_explorer_sorts_filters_and_shows_a_feature(smoke_run_after_08):
    run = open_run("smoke", run_dir=str(smoke_run_after_08))
    ex = Explorer(["mixed4c"], lambda layer: run.view(layer),
                  lambda layer, features: run.featviz(layer, features))
    a = run.branches("mixed4c")
    whole = next(r for r in run.spliced("mixed4c") if r["spliced in"] == "SAE reconstruction")
    assert f"top-1 agreement with the network {whole['top-1 agreement']:.2f}" in ex.header.value  # chapter 03's
    assert f"KL recovered {whole['KL recovered']:.2f}" in ex.header.value
    ex.sort.value = "frequency"
    ids = [v for _, v in ex.pick.options]
    assert ids and all(a.alive[ids]) and list(np.argsort(-a.frequency[ids], kind="stable")) == list(range(len(ids)))
    ex.only.value = "5x5 dominant"
    ids = [v for _, v in ex.pick.options]
    assert (dominant_branch(a.fractions[ids], a.shuffled) == BRANCHES.index("5x5")).all()
    ex.pick.value = ids[0]  # the detail view runs
    lines, strip = ex.describe(ids[0])
    assert lines[0].startswith(f"**mixed4c feature {ids[0]}**") and "5x5" in lines[0]
    assert any(line.startswith("strongest mixed4d neighbours") for line in lines)
    assert strip is not None and strip.shape[0] == 100 and strip.shape[1] >= 200  # visualisation + crops
    ex.label.value = "no-such-label"
    assert ex.pick.options == ()


def test_activation_histogram_and_feature_density_against_counts_by_hand():
    from helpers.show.atlas import activation_histogram, density_svg
    from helpers.analysis.examples import Examples

    sample = np.array([[0.05, 0.15, 0.15, 0.95, 1.0, 0.0], [0, 0, 0, 0, 0, 0]], np.float32)
    image = np.array([[3, 4, 5, 6, 7, -1], [-1] * 6])
    ex = Examples(top_value=np.array([[1.0], [0.0]], np.float32), top_image=np.array([[7], [-1]]),
                  top_y=np.zeros((2, 1), int), top_x=np.zeros((2, 1), int), sample_value=sample, sample_image=image,
                  sample_y=np.zeros((2, 6), int), sample_x=np.zeros((2, 6), int), images_seen=10)
    assert activation_histogram(ex, 0) == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # the empty slot is not counted
    assert activation_histogram(ex, 1) == [0] * 10  # never fires
    svg = density_svg(np.array([0.0, 0.0, 0.001, 0.01, 0.01, 0.5]))
    assert "4 live, 2 dead" in svg and svg.count("<rect") == 20
    heights = [float(h) for h in __import__("re").findall(r"height='([0-9.]+)' fill", svg)]
    assert sum(h > 0 for h in heights) == 3  # three occupied bins: 1e-3, 1e-2 (twice) and 0.5


def test_the_explorer_image_tab_lists_each_positions_features_and_switches_them(smoke_run_after_08):
    """The image tab, driven as a user would: the features it lists at a position are the SAE's equation on the
    network's own activations there; an uploaded file is the same image as picking it; switching at scale 1
    moves nothing, and the branch option switches exactly the features specialised to that branch."""
    import torch

    from helpers.data.inception import LayerCapture
    from helpers.sae.loss import topk_sae

    run = open_run("smoke", run_dir=str(smoke_run_after_08))
    ex = Explorer(["mixed4c"], lambda layer: run.view(layer), None,
                  lambda layer: run.probe(layer))
    tab, probe = ex.image, run.probe("mixed4c")
    assert tab.found is not None and tab.position.options and tab.features.options
    sae = probe.sae
    with torch.no_grad():
        acts = LayerCapture(probe.model, ["mixed4c"])(probe.input([tab.pixels]))["mixed4c"][0]
    for _, (y, x) in tab.position.options[:5]:
        with torch.no_grad():
            _, z = topk_sae(acts[:, y, x][None], sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k)
        values, ids = z[0].topk(5)
        want = [int(f) for f, v in zip(ids, values) if v > 0]
        lines, strip = tab.at_position(y, x)
        assert [int(t.split()[1]) for t in lines[0].split(": ", 1)[1].split(", ")] == want
        assert strip is None or strip.shape[1] >= 72 * len(want)
    first = tab.found
    path = run.view("mixed4c").images.paths[0]
    tab.use_upload(({"name": path.name, "content": memoryview(path.read_bytes())},))  # ipywidgets 8's value
    assert (tab.found.ids == first.ids).all() and np.allclose(tab.found.branch_maps, first.branch_maps)
    tab.scale.value = 1.0
    assert all(abs(r["change"]) < 1e-9 for r in tab.compare())
    tab.scale.value = 0.0
    rows = tab.compare()
    assert len(rows) >= 5 and all(np.isclose(r["after"] - r["before"], r["change"]) for r in rows)
    tab.branch.value = "5x5"  # the option "all 5x5-specialised"
    assert tab.chosen() == [int(f) for f in np.flatnonzero(run.branches("mixed4c").specialised_branch() == 2)]
    tab.show_moves()  # the table renders


HOSTILE = '"><img src=x onerror="window.pwned = (window.pwned || 0) + 1"><!--<script>'


def test_text_from_the_data_never_runs_as_script_in_the_atlas(smoke_run_after_08, tmp_path):
    """Class names (a file downloaded into the torch hub cache), label keys, the note and the SAE's origin are
    text: written into the atlas as hostile HTML they show as written and run nothing; a note holding a template
    marker stays a note; a layer name that is a path is refused."""
    import dataclasses
    import json

    import pytest

    from browser import chromium, js_errors
    from helpers.show.atlas import write_atlas

    run = open_run("smoke", run_dir=str(smoke_run_after_08))
    view = run.view("mixed4c")
    labels = [{**entry, "labels": {HOSTILE: 0.9, **entry.get("labels", {})}} for entry in view.labels]
    records = json.loads(json.dumps(view.image_records))
    for record in records:
        record["classes"] = [[HOSTILE, p] for _, p in record["classes"]]
        for switch in record["switches"]:
            switch["what"] = HOSTILE
            for row in switch["rows"]:
                row["name"] = HOSTILE
    hostile = dataclasses.replace(view, labels=labels, image_records=records, origin=HOSTILE)
    folder = write_atlas(tmp_path / "atlas", [hostile], note="__IMAGES__ " + HOSTILE)
    with pytest.raises(ValueError, match="not a layer of InceptionV1"):
        write_atlas(tmp_path / "elsewhere", [dataclasses.replace(view, layer="../../x")])
    assert not (tmp_path / "x").exists()
    browser = chromium()
    try:
        browser.get((folder / "mixed4c" / "index.html").as_uri())
        note = browser.execute_script("return document.querySelector('.note').textContent")
        assert note.startswith("__IMAGES__ " + HOSTILE) and HOSTILE in note  # shown as written
        first = browser.find_element("css selector", "#groups .f")
        first.click()
        assert HOSTILE in browser.execute_script("return document.getElementById('detail').textContent")
        if records:
            browser.find_element("id", "img0").click()
            classes = browser.execute_script("return [...document.querySelectorAll('#classes td')].map(t => t.textContent)")
            assert HOSTILE in classes
            moves = browser.execute_script("return [...document.querySelectorAll('#moves td')].map(t => t.textContent)")
            assert HOSTILE in moves or not records[0]["switches"]
        assert browser.execute_script("return window.pwned || 0") == 0
        assert js_errors(browser) == []
    finally:
        browser.quit()


def test_an_upload_that_is_not_an_image_is_said_in_the_tab(smoke_run_after_08):
    """Zero bytes, text, an SVG, a truncated JPEG and a 20000x20000 PNG once raised PIL's errors out of the widget's
    callback: each now leaves the current image in place and says why in the tab."""
    import io

    from PIL import Image

    run = open_run("smoke", run_dir=str(smoke_run_after_08))
    tab = Explorer(["mixed4c"], lambda layer: run.view(layer), None, lambda layer: run.probe(layer)).image
    before = tab.pixels.copy()
    jpeg = io.BytesIO()
    Image.fromarray(before).save(jpeg, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # small on disk, 400M pixels decoded
    for name, content in (("empty.jpg", b""), ("notes.txt", b"hello"), ("drawing.svg", b"<svg xmlns='x'></svg>"),
                          ("cut.jpg", jpeg.getvalue()[:200]), ("bomb.png", bomb.getvalue())):
        assert tab.use_upload(({"name": name, "content": memoryview(content)},)) is False, name
        assert tab.message.startswith(f"**{name}** could not be read as an image"), tab.message
        assert np.array_equal(tab.pixels, before)
    assert tab.use_upload(({"name": "ok.jpg", "content": memoryview(jpeg.getvalue())},)) and tab.message is None
