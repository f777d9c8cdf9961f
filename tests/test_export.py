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
