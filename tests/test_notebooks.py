"""The notebooks: committed clean, and each runs top to bottom in the smoke profile."""

import json
import re

import nbformat
import pytest

from helpers.run.book import notebooks

CHAPTERS = ["01_inceptionv1_branches", "02_harvesting", "03_training", "04_branch_specialization", "05_circuits",
            "06_umap", "07_feature_visualization", "08_feature_explorer", "09_comparing_saes",
            "10_what_holds"]
FIGURES = {"01_inceptionv1_branches": 1, "02_harvesting": 2, "03_training": 3, "04_branch_specialization": 6,
           "05_circuits": 2, "06_umap": 4, "08_feature_explorer": 1, "09_comparing_saes": 2}


def test_the_book_has_the_chapters_of_the_paper():
    assert [p.stem for p in notebooks()] == CHAPTERS


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_one_boilerplate_cell_and_the_colab_badge(path):
    """Parameters, the Colab install, the run and its banner: one cell, right after the title, its code folded
    away in the book; every later cell reaches artifacts through the typed run, never a string key."""
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is nb.cells[1]
    cell = tagged[0]
    for line in ("profile = None", "google.colab", "run = open_run(profile)", "page.banner(run)",
                 "inception-sae[run] @", "output.enable_custom_widget_manager()"):
        assert line in cell.source, line
    assert "hide-input" in cell.metadata.tags
    assert "colab.research.google.com/github/" in nb.cells[0].source and f"/nbs/{path.name}" in nb.cells[0].source
    assert "colab-badge.svg" not in nb.cells[0].source  # a link that reads offline, not an external image
    code = [c.source for c in nb.cells[2:] if c.cell_type == "code"]
    assert not [c for c in code if "google.colab" in c or "open_run(" in c or "banner(" in c]
    assert not [c for c in code if re.search(r"\b(runs\.get|get\(run, \")", c)]


def _outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("name", CHAPTERS)
def test_executes_in_smoke_profile_with_the_random_weights_warning(smoke_book, name):
    outputs = _outputs(smoke_book["executed"][name])
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and markdown[0].startswith(":::{warning}") and "Not a result" in markdown[0]
    assert "**smoke** profile" in markdown[0]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    figures = [h for h in html if "plotly-graph-div" in h]
    assert len(figures) == FIGURES.get(name, 0)
    # opened outside the book: JupyterLab draws the plotly mimetype, Colab the HTML (which loads plotly.js itself)
    assert len([o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]) == len(figures)
    assert all("cdn.plot.ly" in h and 'document.readyState === "complete"' in h for h in figures)
    for fig in figures:
        assert "RANDOM WEIGHTS: NOT A RESULT" in fig
        assert len(fig) < 500_000 and not re.search(r"plotly\.js v\d", fig)  # plotly.js is not inlined


def test_seeing_features_chapters_show_figure_1_and_link_the_atlas(smoke_book):
    pngs = [o for o in _outputs(smoke_book["executed"]["07_feature_visualization"]) if "image/png" in o.get("data", {})]
    assert len(pngs) == 5 + 1 + 1  # figure 1's panel of each layer, its all-branch grid, the close-up
    html = [o["data"]["text/html"] for o in _outputs(smoke_book["executed"]["08_feature_explorer"])
            if "text/html" in o.get("data", {})]
    assert any('href="../atlas/mixed4c/index.html"' in h for h in html)
    for name in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "all"):
        assert (smoke_book["run"] / "figures" / f"figure-01-{name}.png").exists(), name


def test_chapter_01s_widths_are_the_models(smoke_book):
    """The chapter once typed '64 channels each' for the 5x5 and pool branches beside a table showing 48 for mixed4a's
    5x5: the sentence is now computed from the model's slices."""
    from helpers.data.inception import architecture_slices

    text = "\n".join(o["data"]["text/markdown"] for o in _outputs(smoke_book["executed"]["01_inceptionv1_branches"])
                     if "text/markdown" in o.get("data", {}))
    for layer in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"):
        start, stop = architecture_slices(layer)["5x5"]
        assert f"{stop - start} channels in {layer}" in text, layer
    assert "48 channels in mixed4a" in text and "128 channels in mixed4e" in text


def test_chapter_02_says_what_the_images_are(smoke_book):
    tables = [o["data"]["text/markdown"] for o in _outputs(smoke_book["executed"]["02_harvesting"])
              if "text/markdown" in o.get("data", {}) and "image source" in o["data"]["text/markdown"]]
    assert len(tables) == 1
    header, _, row = tables[0].splitlines()[:3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["image source", "images", "ImageNet classes"], columns
    values = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert int(values["images"]) == 64 and 0 <= int(values["ImageNet classes"]) <= 64


def test_later_chapters_reuse_the_run(smoke_book):
    run = smoke_book["run"]
    assert (run / "harvest" / "manifest.json").exists()
    paper = ["mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"]  # and chapter 10's Distill layers, same harvest
    assert sorted(p.name for p in (run / "saes").iterdir()) == ["mixed3a", "mixed3b", *paper]
    assert sorted(p.name for p in (run / "saes-seed1").iterdir()) == ["mixed3a", "mixed3b", *paper]  # the claim seeds'
    assert json.loads((run / "harvest" / "manifest.json").read_text())["layers"] == ["mixed3a", "mixed3b", *paper]
    cfg = json.loads((run / "saes" / "mixed4c" / "cfg.json").read_text())
    assert cfg["metadata"]["random_weights"] is True and cfg["d_sae"] == 4 * 512


def test_paper_figures_are_written_as_png_and_svg_with_the_label(smoke_book):
    folder = smoke_book["run"] / "figures"
    if not list(folder.glob("*.png")):
        pytest.skip("no static export here (kaleido needs a Chrome/Chromium)")
    for n in range(2, 11):
        assert (folder / f"figure-{n:02d}.png").stat().st_size > 5000, n
        assert "RANDOM WEIGHTS: NOT A RESULT" in (folder / f"figure-{n:02d}.svg").read_text(), n


@pytest.mark.parametrize("name", CHAPTERS)
def test_pages_hold_no_progress_bars_log_lines_or_warnings(smoke_book, name):
    for output in _outputs(smoke_book["executed"][name]):
        assert not (output.output_type == "stream" and output.name == "stderr"), output.get("text", "")[:300]
        data = output.get("data", {})
        assert "application/vnd.jupyter.widget-view+json" not in data, data.get("text/plain")  # a tqdm.notebook bar
        text = str(data) + output.get("text", "")
        assert ".venv" not in text and "Traceback" not in text and "Warning:" not in text, text[:300]


def test_the_smoke_book_sweeps_every_family_and_sparsity(smoke_book):
    """Chapter 03's sweep: an SAE per family and L0 in the run, each evaluated; TopK keeps exactly k latents per
    vector, BatchTopK and Matryoshka k on average (over the layer's vectors), and the files say their family."""
    from helpers.run.profiles import get_profile
    from helpers.run.sweep import EVALUATION, FAMILIES

    import numpy as np
    import torch

    from helpers.data.store import ActivationStore
    from helpers.sae.model import TopKSAE

    p = get_profile("smoke")
    folder = smoke_book["run"] / "sweep" / p.sweep_layer
    store = ActivationStore(smoke_book["run"] / "harvest", p.sweep_layer)
    vectors = torch.from_numpy(store.load(len(store)).astype(np.float32))
    for family in FAMILIES:
        for k in p.sweep_l0:
            d = folder / f"{family}-k{k}-s0"
            record = json.loads((d / EVALUATION).read_text())
            cfg = json.loads((d / "cfg.json").read_text())
            assert cfg.get("family", cfg["architecture"]) == family
            assert record["FVU"] < 1 and 0 < record["KL recovered (zero)"] <= 1 + 1e-9, (family, k, record)
            if family == "topk":
                assert record["L0"] == k
            elif family != "jumprelu":  # calibrated on the training vectors: k per vector on average over the layer's
                sae = TopKSAE.load(d)   # vectors (the held-out tenth, a few images here, may use far fewer or more)
                with torch.no_grad():
                    l0 = float((sae.encode(vectors) > 0).sum(-1).float().mean())
                assert 0.7 * k <= l0 <= 1.3 * k, (family, k, l0)


def test_no_output_prints_a_float_to_sixteen_digits(smoke_book):
    """A reader sees 0.104, not 0.10350000113248825 (plotly's JSON, which no reader sees, is not counted)."""
    found = []
    for name, path in smoke_book["executed"].items():
        for cell in nbformat.read(path, as_version=4).cells:
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                texts = [out.get("text", "")] + [data[k] for k in ("text/markdown", "text/plain")
                                                 if k in data and "text/html" not in data]
                found += [(name, m) for t in texts for m in re.findall(r"\d\.\d{9,}", str(t))]
    assert found == [], found
