"""The chapters define the science; the modules generated from them must say the same."""

import importlib
import inspect
import json
import shutil

import pytest

from helpers.run import export


def test_every_generated_module_matches_its_chapter():
    changed = export.export(check=True)
    assert changed == [], f"edit the chapter and run `python -m helpers export`: {changed}"


def test_the_chapters_define_the_papers_computations():
    """Each definition a reader looks for lives in the chapter that presents it, exported to its layer."""
    where = {c.module: c.path.stem for c in export.chapters()}
    assert where == {"data.sampling": "02_harvesting", "sae.loss": "03_training", "analysis.spliced": "03_training",
                     "analysis.coherence": "03_training", "analysis.probing": "03_training", "analysis.branches": "04_branch_specialization", "analysis.circuits": "05_circuits",
                     "analysis.embed": "06_umap", "analysis.selection": "07_feature_visualization",
                     "analysis.image_features": "08_feature_explorer", "analysis.compare": "09_comparing_saes",
                     "analysis.verdicts": "10_what_holds"}
    defined = {"data.sampling": ["select_positions"],
               "sae.loss": ["topk_sae", "normalized_mse", "training_loss", "least_squares_scale", "batchtopk_sae",
                            "threshold_sae", "matryoshka_loss", "jumprelu_sae", "reconstruction_stats"],
               "analysis.coherence": ["morans_i", "spatial_coherence", "coherence_summary"],
               "analysis.probing": ["max_pooled", "rank_columns", "sparse_probe", "probe_classes", "absorption"],
               "analysis.spliced": ["reconstruct_positions", "spliced_evaluation"],
               "analysis.branches": ["fraction_in_branch", "baseline", "analyse_branches"],
               "analysis.circuits": ["ablation_edges", "attribution", "circuit_graph"],
               "analysis.embed": ["umap_embedding"],
               "analysis.selection": ["strongest_examples", "activation_bands", "figure1_features"],
               "analysis.image_features": ["image_features", "class_moves", "ImageProbe"],
               "analysis.compare": ["match_features", "matched_share", "reconstruction"],
               "analysis.verdicts": ["bootstrap", "permutation_null", "verdict", "concentration", "neighbour_agreement",
                                     "feature_maxima", "stroke_images"]}
    for module, names in defined.items():
        for name in names:
            obj = getattr(importlib.import_module(f"helpers.{module}"), name)
            assert f"Defined in chapter {where[module][:2]}" in inspect.getdoc(obj), (module, name)


def test_a_cell_can_name_its_own_module(tmp_path):
    """``#| export MODULE`` sends one cell elsewhere than the chapter's default; a module is one chapter's."""
    def chapter(name, cells):
        nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": f"# {name}"}] +
              [{"cell_type": "code", "metadata": {}, "source": c, "outputs": []} for c in cells],
              "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        (tmp_path / "nbs" / name).write_text(json.dumps(nb))

    (tmp_path / "nbs").mkdir()
    chapter("03_x.ipynb", ["#| default_exp sae.eq", '#| export\ndef f():\n    """F."""',
                           '#| export analysis.use\n"""Uses f."""\ndef g():\n    """G."""', '#| export\ndef h():\n    """H."""'])
    written = export.export(tmp_path / "nbs", tmp_path / "helpers")
    assert sorted(written) == ["helpers/analysis/use.py (from nbs/03_x.ipynb)", "helpers/sae/eq.py (from nbs/03_x.ipynb)"]
    eq, use = (tmp_path / "helpers/sae/eq.py").read_text(), (tmp_path / "helpers/analysis/use.py").read_text()
    assert "def f" in eq and "def h" in eq and "def g" not in eq
    assert '"""Uses f."""' in use and "def g" in use and "def f" not in use
    chapter("04_y.ipynb", ['#| export analysis.use\ndef k():\n    """K."""'])
    with pytest.raises(export.ExportError, match="04_y.ipynb and 03_x.ipynb both export helpers.analysis.use"):
        export.export(tmp_path / "nbs", tmp_path / "helpers")
    chapter("04_y.ipynb", ['#| export ../outside\ndef k():\n    """K."""'])
    with pytest.raises(export.ExportError, match="is not a module name"):
        export.export(tmp_path / "nbs", tmp_path / "helpers")


def test_a_chapter_edit_is_caught_until_the_module_is_regenerated(tmp_path):
    nbs, package = tmp_path / "nbs", tmp_path / "helpers"
    shutil.copytree(export.NOTEBOOKS, nbs)
    package.mkdir()
    assert len(export.export(nbs, package)) == 12  # all written into the empty package
    assert export.export(nbs, package, check=True) == []
    path = nbs / "04_branch_specialization.ipynb"
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "".join(c["source"]).startswith("#| export\n") and
                "def fraction_in_branch" in "".join(c["source"]))
    cell["source"] = "".join(cell["source"]).replace("d = d.clamp_min(0)", "d = d.abs()")
    path.write_text(json.dumps(nb))
    assert export.export(nbs, package, check=True) == ["helpers/analysis/branches.py (from nbs/04_branch_specialization.ipynb)"]
    export.export(nbs, package)
    generated = package / "analysis" / "branches.py"
    assert "d = d.abs()" in generated.read_text()
    generated.write_text(generated.read_text() + "\n# edited by hand\n")
    assert export.export(nbs, package, check=True) != []  # a hand edit of a generated module is caught too


def test_an_exported_function_without_a_docstring_is_refused(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# A chapter"},
                    {"cell_type": "code", "metadata": {}, "source": "#| default_exp thing", "outputs": []},
                    {"cell_type": "code", "metadata": {}, "source": "#| export\ndef f(x):\n    return x", "outputs": []}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "09_thing.ipynb").write_text(json.dumps(nb))
    with pytest.raises(export.ExportError, match="'f' has no docstring"):
        export.export(tmp_path, tmp_path)
    nb["cells"][2]["source"] = '#| export\ndef f(x):\n    """Twice."""\n    return 2 * x'
    (tmp_path / "09_thing.ipynb").write_text(json.dumps(nb))
    export.export(tmp_path, tmp_path)
    text = (tmp_path / "thing.py").read_text()
    assert text.startswith("# GENERATED from nbs/09_thing.ipynb")
    assert '"""Twice.\n\n    Defined in chapter 09, *A chapter* (nbs/09_thing.ipynb).\n    """' in text


def test_every_chapter_opens_on_colab_from_the_one_configured_repository(tmp_path):
    repo, branch = export.repository()
    for path in export.NOTEBOOKS.glob("[0-9]*.ipynb"):
        assert export.colab_cells(path, repo, branch, write=False), path.name
        text = path.read_text()
        assert f"colab.research.google.com/github/{repo}/blob/{branch}/nbs/{path.name}" in text
        assert f"inception-sae[run] @ git+https://github.com/{repo}@{branch}" in text  # what the chapters need
    assert export.readme_badge(export.ROOT / "README.md", repo, branch, write=False)
    # another repository in _config.yml: every chapter is stale until the export rewrites it
    copy = tmp_path / "01.ipynb"
    shutil.copy(next(export.NOTEBOOKS.glob("01_*.ipynb")), copy)
    assert not export.colab_cells(copy, "someone/fork", "dev", write=False)
    assert export.colab_cells(copy, "someone/fork", "dev", write=True) is False
    assert export.colab_cells(copy, "someone/fork", "dev", write=False)
    assert "github/someone/fork/blob/dev/nbs/01.ipynb" in copy.read_text()
    config = tmp_path / "_config.yml"
    config.write_text("repository:\n  url: https://gitlab.com/x/y\n")
    with pytest.raises(export.ExportError, match="not a https://github.com/OWNER/NAME"):
        export.repository(config)


def _record(cpu, chapters):
    return {"cpu": cpu, "date": "2026-12-03", "chapters": chapters}


def test_each_chapter_states_what_it_computes_and_how_long_as_the_bench_measured():
    records = export.cost_records()
    assert set(records) == set(export.COST_PROFILES), "bench/results/profile-{colab,cpu}.json are kept in git"
    for path in export.NOTEBOOKS.glob("[0-9]*.ipynb"):
        assert export.cost_cells(path, records, write=False), f"{path.name}: run `python -m helpers export`"
        title = json.loads(path.read_text())["cells"][0]["source"]
        assert "<!-- cost: " in "".join(title), path.name
    # the statement is the record's: a stage and its minutes, per profile, and what opening alone adds
    for name, record in records.items():
        c = record["chapters"]["07"]
        text = export.cost_statement("07", records)
        assert f"- the `{name}` profile" in text and all(stage in text for stage in export._compact(c["computes"]))
        assert f"{c['minutes']:.0f} min" in text or c["minutes"] < 1 or c["minutes"] >= 90


def test_the_cost_statement_reads_minutes_and_prerequisites_from_the_record(tmp_path):
    records = {"colab": _record("CPU A", {"05": {"computes": ["circuit attribution"], "minutes": 3.4,
                                                  "alone minutes": 9.6}}),
               "cpu": _record("CPU A", {"05": {"computes": ["circuit attribution"], "minutes": 0.4,
                                                "alone minutes": 0.4}})}
    text = export.cost_statement("05", records)
    assert "- the `colab` profile (the default on Colab): circuit attribution: about 3 min on 2 CPU cores" in text
    assert "(about 10 min opened alone" in text
    assert "- the `cpu` profile: circuit attribution: under a minute on 2 CPU cores after the chapters before it.\n" \
        in text  # nothing before it to compute: no "opened alone" clause
    assert export._compact(["training mixed4a (d_sae 8128, aux_k 256)", "feature statistics mixed4a", "training mixed4b",
                            "UMAP", "harvest, mixed4a, mixed4b", "untrained control: its harvest, SAEs"]) == [
        "training of mixed4a, mixed4b", "feature statistics of mixed4a", "UMAP", "harvest of mixed4a, mixed4b",
        "untrained control: its harvest, SAEs"]
    assert "rates measured on CPU A, 2026-12-03" in text and "no T4 has been measured" in text
    assert "Nothing heavy" in export.cost_statement("01", records)
    # a chapter without the block gets one under its Colab link; a changed record makes it stale again
    copy = tmp_path / "05_x.ipynb"
    shutil.copy(next(export.NOTEBOOKS.glob("05_*.ipynb")), copy)
    nb = json.loads(copy.read_text())
    nb["cells"][0]["source"] = export.COST.sub("", "".join(nb["cells"][0]["source"]))
    copy.write_text(json.dumps(nb))
    assert not export.cost_cells(copy, records, write=False)
    export.cost_cells(copy, records, write=True)
    title = "".join(json.loads(copy.read_text())["cells"][0]["source"])
    assert title.index(".ipynb)") < title.index("<!-- cost: ") and export.cost_cells(copy, records, write=False)
    records["colab"]["chapters"]["05"]["minutes"] = 120.0
    assert not export.cost_cells(copy, records, write=False)
    assert "about 2.0 hours" in export.cost_statement("05", records)
