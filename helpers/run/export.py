"""Chapters to modules: the code a chapter marks for export becomes a module of this package.

A chapter (``nbs/NN_name.ipynb``) names its default module in one code cell, ``#| default_exp
analysis.branches``, and marks each cell to export with a first line ``#| export`` (nbdev's
markers); ``#| export sae.loss`` sends that cell to another module, so one chapter can write
the SAE's equation into the SAE layer and its evaluation into the analysis layer. ``python -m
helpers export`` writes ``helpers/<layer>/<module>.py`` for each target: a header saying it is
generated, the module docstring (the first cell exported to it may open with one), then its
cells in order. Every top-level function and class must have a docstring; the exporter adds to
it the chapter that defines it, as d2l does. A module is written by one chapter only.

Generated modules are committed and never edited by hand: ``python -m helpers export
--check`` (and ``tests/test_export.py``) fails when a module differs from its chapter.

The repository is named once, in ``_config.yml`` (``repository.url`` and ``branch``, which
Jupyter Book's launch buttons read too). The export writes it into each chapter's "Open in
Colab" badge and install cell (which installs the package with its ``[book]`` extra) and into
the README's badge, and ``--check`` fails when one of them names another.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "nbs"
PACKAGE = ROOT / "helpers"
EXPORT, DEFAULT_EXP = "#| export", "#| default_exp"
HEADER = ("# GENERATED from {chapter} by `python -m helpers export`: edit the chapter, not this file\n"
          "# (tests/test_export.py fails when the two differ).\n")
MODULE_NAME = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")


class ExportError(ValueError):
    """A chapter's export cells cannot make a module."""


@dataclass(frozen=True)
class Chapter:
    """What one chapter exports to one module."""

    path: Path
    module: str  # dotted, under helpers: "analysis.branches" is helpers/analysis/branches.py
    title: str
    cells: tuple[str, ...]  # the cells' source, markers removed

    @property
    def number(self) -> str:
        return self.path.name.split("_", 1)[0]

    def target(self, package: Path = PACKAGE) -> Path:
        return Path(package, *self.module.split(".")).with_suffix(".py")


def _module_name(name: str, path: Path) -> str:
    if not MODULE_NAME.fullmatch(name):
        raise ExportError(f"{path.name}: {name!r} is not a module name; write a dotted path under helpers, "
                          "e.g. 'analysis.branches'")
    return name


def read_chapter(path: Path) -> list[Chapter]:
    """What the chapter exports, one ``Chapter`` per target module (empty if it exports nothing)."""
    nb = json.loads(Path(path).read_text())
    default, cells, title = None, {}, path.stem
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and title == path.stem and source.startswith("# "):
            title = source.splitlines()[0][2:].strip()
        if cell["cell_type"] != "code":
            continue
        first, _, rest = source.partition("\n")
        if first.startswith(DEFAULT_EXP):
            default = _module_name(first[len(DEFAULT_EXP):].strip(), path)
        elif first.strip() == EXPORT or first.startswith(EXPORT + " "):
            named = first.strip()[len(EXPORT):].strip()
            if not named and not default:
                raise ExportError(f"{path.name} marks cells with {EXPORT} but names no module; add a cell "
                                  f"'{DEFAULT_EXP} NAME' before them (helpers/NAME.py), or write '{EXPORT} NAME'")
            module = _module_name(named, path) if named else default
            cells.setdefault(module, []).append(rest.strip("\n"))
    return [Chapter(Path(path), module, title, tuple(found)) for module, found in cells.items()]


def _with_chapter_in_docstrings(source: str, chapter: Chapter) -> str:
    """Append 'Defined in chapter NN, Title.' to the docstring of every top-level def and class."""
    tree = ast.parse(source)
    lines = source.split("\n")
    note = f"Defined in chapter {chapter.number}, *{chapter.title}* (nbs/{chapter.path.name})."
    edits = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = node.body[0] if node.body else None
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise ExportError(f"{chapter.path.name}: exported {node.name!r} has no docstring; say what it computes")
        edits.append((doc.end_lineno - 1, doc.end_col_offset, doc.col_offset))
    for line_no, end, indent in sorted(edits, reverse=True):
        line = lines[line_no]
        quote = line[end - 3:end]
        if quote not in ('"""', "'''"):
            raise ExportError(f"{chapter.path.name}: write docstrings with triple quotes (line {line_no + 1})")
        pad, text = " " * indent, line[:end - 3].rstrip()
        # 'text' is the docstring's last line ('    """One line.' or '' when the quotes stand alone)
        lines[line_no] = f"{text}\n\n{pad}{note}\n{pad}{quote}{line[end:]}" if text.strip() else \
            f"\n{pad}{note}\n{pad}{quote}{line[end:]}"
    return "\n".join(lines)


def module_source(chapter: Chapter) -> str:
    """The text of the module ``chapter`` exports to."""
    cells = list(chapter.cells)
    docstring = ""
    first = ast.parse(cells[0]).body
    if first and isinstance(first[0], ast.Expr) and isinstance(first[0].value, ast.Constant) \
            and isinstance(first[0].value.value, str):
        end = first[0].end_lineno
        head = cells[0].split("\n")
        docstring, cells[0] = "\n".join(head[:end]) + "\n", "\n".join(head[end:]).strip("\n")
    body = "\n\n\n".join(c for c in cells if c)
    body = _with_chapter_in_docstrings(body, chapter)
    text = HEADER.format(chapter=f"nbs/{chapter.path.name}") + docstring + "\n" + body + "\n"
    return re.sub(r"\n{4,}", "\n\n\n", text)


def chapters(folder: Path = NOTEBOOKS) -> list[Chapter]:
    """Every (chapter, module) export of the chapters in ``folder``, in chapter order."""
    found = [c for p in sorted(Path(folder).glob("[0-9]*.ipynb")) for c in read_chapter(p)]
    seen: dict[str, Path] = {}
    for c in found:
        if c.module in seen and seen[c.module] != c.path:
            raise ExportError(f"{c.path.name} and {seen[c.module].name} both export helpers.{c.module}; "
                              "a module is written by one chapter")
        seen[c.module] = c.path
    return found


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """(owner/name, branch) of the repository ``_config.yml`` names."""
    import yaml

    repo = yaml.safe_load(Path(config).read_text())["repository"]
    url = repo["url"].rstrip("/").removesuffix(".git")
    if not url.startswith("https://github.com/"):
        raise ExportError(f"_config.yml's repository.url {url!r} is not a https://github.com/OWNER/NAME address")
    return url.removeprefix("https://github.com/"), repo.get("branch", "main")


COLAB_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]+?/blob/[^/)\s]+/nbs/[^)\s]+\.ipynb")
INSTALL = re.compile(r'%pip install -q "[^"]*"')


def colab_cells(path: Path, repo: str, branch: str, write: bool) -> bool:
    """Whether the chapter's badge and install cell name ``repo``@``branch`` (rewritten, with ``write``)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    badge = f"https://colab.research.google.com/github/{repo}/blob/{branch}/nbs/{path.name}"
    install = f'%pip install -q "inception-sae[run] @ git+https://github.com/{repo}@{branch}"'  # what running needs
    changed = False
    for cell in nb.cells:
        new = COLAB_BADGE.sub(badge, cell.source) if cell.cell_type == "markdown" else \
            INSTALL.sub(install, cell.source) if "google.colab" in cell.source else cell.source
        changed |= new != cell.source
        cell.source = new
    if changed and write:
        nbformat.write(nb, path)
    return not changed


COST = re.compile(r"<!-- cost: .*?<!-- /cost -->", re.S)
COST_PROFILES = ("colab", "cpu")  # whose projections each chapter states: Colab's first look, and the full run


def _minutes(m: float) -> str:
    return "under a minute" if m < 1 else f"about {m:.0f} min" if m < 90 else f"about {m / 60:.1f} hours"


READABLE = [(r"^chapter \d\d: ", ""), (r" \(d_sae [^)]*\)", ""), (r"^harvest, ", "harvest of ")]  # stage name -> text


def _compact(stages: list[str]) -> list[str]:
    """bench_profile's stage names for a reader: one item per kind of per-layer stage, its layers listed."""
    out, layers = [], {}
    for stage in stages:
        for pattern, text in READABLE:
            stage = re.sub(pattern, text, stage)
        m = re.fullmatch(r"(training|feature statistics) (mixed\w+)", stage)
        if m and m[1] not in layers:
            layers[m[1]] = []
            out.append(m[1])
        if m:
            layers[m[1]].append(m[2])
        else:
            out.append(stage)
    return [f"{item} of {', '.join(layers[item])}" if item in layers else item for item in out]


def cost_statement(chapter: str, records: dict[str, dict]) -> str:
    """What running ``chapter`` ("02") computes in each of ``COST_PROFILES`` and about how long, from
    ``bench/bench_profile.py``'s records (``records[profile]``: its JSON), as the chapter's top says it."""
    head = "<!-- cost: written by `python -m helpers export` from bench/results/profile-*.json -->\n"
    if not any(chapter in r.get("chapters", {}) for r in records.values()):
        return head + ("**What running this chapter computes.** Nothing heavy: it loads the network (a download of "
                       "about 27 MB, once) and reads its architecture, in seconds.\n<!-- /cost -->")
    lines, measured_on = [], set()
    for name in COST_PROFILES:
        if name not in records:
            continue
        record, c = records[name], records[name]["chapters"][chapter]
        measured_on.add(f"{record['cpu']}, {record.get('date', 'undated')}")
        own = "; ".join(_compact(c["computes"])) or "nothing new (it reads what earlier chapters made)"
        alone = "" if c["alone minutes"] == c["minutes"] else f" ({_minutes(c['alone minutes'])} opened alone, " \
                "with the earlier chapters' stages it needs)"
        lines.append(f"- the `{name}` profile{' (the default on Colab)' if name == 'colab' else ''}: {own}: "
                     f"{_minutes(c['minutes'])} on 2 CPU cores after the chapters before it{alone}.")
    return (head + "**What running this chapter computes, and how long:**\n\n" + "\n".join(lines) + "\n\nProjected by "
            "`python bench/bench_profile.py --profile NAME` from rates measured on " + " and ".join(sorted(measured_on))
            + ". Colab's CPU runtime has 2 cores too; no T4 has been measured yet: on a T4 runtime the harvest, the SAEs' "
            "training and feature visualisation run on its GPU; the dataset-example pass, the circuits, the image "
            "decoding and UMAP on its 2 CPU cores.\n<!-- /cost -->")


def cost_records(results: Path = ROOT / "bench" / "results") -> dict[str, dict]:
    """bench_profile's records of ``COST_PROFILES`` found in ``results``."""
    import json

    return {name: json.loads((results / f"profile-{name}.json").read_text()) for name in COST_PROFILES
            if (results / f"profile-{name}.json").is_file()}


def cost_cells(path: Path, records: dict[str, dict], write: bool) -> bool:
    """Whether the chapter's title cell states its cost as ``records`` say (rewritten, with ``write``); a chapter
    without the ``<!-- cost: ... -->`` block gets one after its Colab link."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cell, statement = nb.cells[0], cost_statement(path.name[:2], records)
    if COST.search(cell.source):
        new = COST.sub(lambda _: statement, cell.source)
    else:
        head, sep, rest = cell.source.partition(".ipynb)\n")
        new = head + sep + "\n" + statement + "\n" + rest if sep else cell.source + "\n\n" + statement
    if new != cell.source and write:
        cell.source = new
        nbformat.write(nb, path)
    return new == cell.source


def readme_badge(readme: Path, repo: str, branch: str, write: bool) -> bool:
    """Whether the README's Colab badge names ``repo``@``branch`` (rewritten, with ``write``)."""
    text = Path(readme).read_text()
    new = COLAB_BADGE.sub(f"https://colab.research.google.com/github/{repo}/blob/{branch}/nbs/"
                          "01_inceptionv1_branches.ipynb", text)
    if new != text and write:
        Path(readme).write_text(new)
    return new == text


def export(folder: Path = NOTEBOOKS, package: Path = PACKAGE, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every generated module; returns the modules that
    differ from their chapter (with ``check``) or were rewritten."""
    changed = []
    for chapter in chapters(folder):
        target = chapter.target(package)
        text = module_source(chapter)
        if not target.exists() or target.read_text() != text:
            changed.append(f"{target.relative_to(Path(package).parent)} (from nbs/{chapter.path.name})")
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    return changed


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers export", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a module differs")
    args = parser.parse_args(argv)
    try:
        changed = export(check=args.check)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    repo, branch = repository()
    stale = [f"nbs/{p.name}" for p in sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
             if not colab_cells(p, repo, branch, write=not args.check)]
    stale += [] if readme_badge(ROOT / "README.md", repo, branch, write=not args.check) else ["README.md"]
    changed += [f"{name} (the Colab badge or install cell of {repo}@{branch})" for name in stale]
    records = cost_records()
    changed += [f"nbs/{p.name} (its cost statement, from bench/results/profile-*.json)"
                for p in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")) if records and not cost_cells(p, records, not args.check)]
    if args.check and changed:
        print("generated modules or Colab cells differ from their sources (run `python -m helpers export`):\n  "
              + "\n  ".join(changed), file=sys.stderr)
        return 1
    print("\n".join(f"wrote {c}" for c in changed) or "every generated module matches its chapter")
    return 0
