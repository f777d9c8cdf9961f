"""Build the Jupyter Book: pick the profile, execute the notebooks once, stage, build.

``python -m helpers book`` (what ``make book`` runs):

1. Profile. With none given it tries ``cpu`` (real weights, Imagenette). If the weights or
   images cannot be had here, it says what failed and how to fix it, and falls back to
   ``smoke``, whose pages all carry the random-weights warning. A profile given explicitly
   (``--profile cpu``) never falls back: it stops at once with the same message.
2. Execute every notebook in ``nbs/`` with nbclient, in that profile, into
   ``_build/executed/`` (``execution.jsonl`` records each).
3. Stage the book in ``_build/src``: config, prose pages (each given the profile banner),
   executed notebooks, and plotly.js copied once into ``_static`` (served offline, not
   inlined per page).
   MathJax's SVG build is copied there too, so formulas render offline.
4. ``jupyter-book build`` -> ``_build/html``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers.files import append_jsonl
from helpers.run.artifacts import open_run
from helpers.run.profiles import PROFILES, ROOT, Settings, get_profile

NOTEBOOK_DIR = ROOT / "nbs"


class ProfileUnavailable(RuntimeError):
    pass


def preflight(name: str) -> str | None:
    """Why the profile's weights or images cannot be had here, or None if they can."""
    from helpers.data.images import list_images
    from helpers.data.inception import WeightsUnavailable, load_model

    p = PROFILES[name]
    reasons = []
    if p.weights != "random":
        try:
            load_model(p.weights)
        except WeightsUnavailable as e:
            reasons.append(str(e))
    if p.harvest.images != "sample-or-generated":
        try:
            list_images(p.harvest.images)
        except FileNotFoundError as e:
            reasons.append(str(e))
    return "\n".join(f"- {r}" for r in reasons) or None


def choose_profile(requested: str | None) -> tuple[str, str | None]:
    """``(profile, fallback_reason)``; an explicit profile that cannot run raises."""
    if requested:
        get_profile(requested)
        reason = preflight(requested)
        if reason:
            raise ProfileUnavailable(f"profile {requested!r} cannot run here:\n{reason}")
        return requested, None
    reason = preflight("cpu")
    if reason is None:
        return "cpu", None
    bar = "=" * 78
    print(f"{bar}\nThe cpu profile (real weights, Imagenette) cannot run here, so this book is built with\n"
          f"the smoke profile (random weights: its figures are not results). What failed:\n{reason}\n{bar}",
          file=sys.stderr)
    return "smoke", reason


def choose_saes(profile: str) -> str:
    """Whose SAEs the book shows: ``$SAE_SAES`` if set; else, with real weights, the paper author's when they
    can be fetched (the paper's own results first; ``SAE_SAES=train`` trains ours), else ours."""
    asked = Settings.from_environment().saes
    if asked:
        return asked
    if PROFILES[profile].weights == "random":
        return "train"
    from helpers.run.author import available

    if available():
        return "author"
    print("The paper author's SAEs cannot be fetched here (Hugging Face hub unreachable): training SAEs instead.",
          file=sys.stderr)
    return "train"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9]*.ipynb"))


def _start_kernel():
    """A python3 kernel started in the notebooks' folder with the environment of now, as nbclient starts one."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(NOTEBOOK_DIR), extra_arguments=["--HistoryManager.hist_file=:memory:"])
    return km


def execute_notebooks(out_dir: Path, env: dict[str, str], paths: list[Path] | None = None,
                      timeout: int | None = None) -> list[Path]:
    """Run each notebook top to bottom in a fresh kernel with ``env`` set; save it executed. Each notebook's kernel
    is started while the one before runs (a kernel takes about 2 s to start on 2 cores: 20 s of the smoke book)."""
    import nbformat
    from nbclient import NotebookClient
    from helpers.progress import progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    done, paths = [], list(paths or notebooks())
    upcoming = _start_kernel() if paths else None
    try:
        for i, path in enumerate(progress(paths, desc="notebooks", unit="nb")):
            nb = nbformat.read(path, as_version=4)
            t = time.perf_counter()
            km, upcoming = upcoming, (_start_kernel() if i + 1 < len(paths) else None)
            client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
            client.owns_km = True  # nbclient ends the kernel after the notebook, as one it started (exit handlers run)
            status = "ok"
            try:
                client.execute()
            except Exception as e:
                status = f"{type(e).__name__}: {str(e)[-2000:]}"
                raise RuntimeError(f"notebook {path.name} failed in profile {env.get('SAE_PROFILE')}:\n{status}") from e
            finally:
                nbformat.write(nb, out_dir / path.name)
                append_jsonl(out_dir / "execution.jsonl", {"notebook": path.name, "status": status,
                                                           "seconds": round(time.perf_counter() - t, 2), **env})
            done.append(out_dir / path.name)
    finally:
        if upcoming is not None:  # a notebook failed before the next one's turn
            upcoming.shutdown_kernel(now=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done


def _with_banner(markdown: str, banner: str) -> str:
    lines = markdown.split("\n")
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
    return "\n".join(lines[:at] + ["", banner] + lines[at:])


def stage(executed: list[Path], banner: str, src: Path, atlas: Path | None = None) -> Path:
    """Lay out the book's sources, with executed notebooks, a local plotly.js and the atlas
    (copied as is into the built site's ``atlas/``)."""
    import plotly

    if src.exists():
        shutil.rmtree(src)
    (src / "nbs").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "book", src / "book")
    for page in (src / "book").glob("*.md"):
        page.write_text(_with_banner(page.read_text(), banner))
    for nb in executed:
        _without_markers(nb, src / "nbs" / nb.name)
    (src / "extra").mkdir()
    if atlas is not None and Path(atlas).is_dir():
        shutil.copytree(atlas, src / "extra" / "atlas")
    static = src / "_static"
    static.mkdir()
    shutil.copy(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", static / "plotly.min.js")
    (static / "mathjax").mkdir()
    shutil.copy(mathjax_file(), static / "mathjax" / "tex-svg.js")
    return src


DOWNLOAD_NOTE = ("*This is the book's chapter as it was executed. Opened outside the book, its interactive figures "
                 "draw with plotly.js and its formulas with MathJax, each fetched from the internet the first time; "
                 "offline they stay blank (the PNG and SVG of every figure are in the run's `figures/` folder, and "
                 "`make book` builds pages that need no internet).*")


def _without_markers(notebook: Path, dest: Path) -> None:
    """Copy an executed chapter, its bare ``#| default_exp MODULE`` cells tagged away (the export's marker, not
    something a reader of the book needs to see; the downloaded notebook keeps them), and a note for the
    downloaded notebook after its title (``DOWNLOAD_NOTE``: its figures need the internet once), hidden in the book."""
    nb = json.loads(notebook.read_text())
    note = {"cell_type": "markdown", "id": "download-note", "metadata": {"tags": ["remove-cell"]},
            "source": [DOWNLOAD_NOTE]}
    nb["cells"].insert(1, note)
    for cell in nb["cells"]:
        text = "".join(cell.get("source", "")).strip()
        if cell["cell_type"] == "code" and text.startswith("#| default_exp") and "\n" not in text:
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            if "remove-cell" not in tags:
                tags.append("remove-cell")
    dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def mathjax_file() -> Path:
    """MathJax 3 (TeX input, SVG output: one file, no fonts to fetch), from the django-static-mathjax
    package, which ships MathJax's own files; the book serves it instead of a CDN."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    path = Path(spec.origin).parent / "static" / "mathjax" / "es5" / "tex-svg.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("MathJax is not installed: pip install -e '.[book]' (django-static-mathjax ships it)")
    return path


def build_html(src: Path, out: Path) -> Path:
    exe = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(exe if exe.exists() else "jupyter-book"), "build", str(src), "--path-output", str(out)],
                   check=True)
    return out / "_build" / "html"


@contextlib.contextmanager
def saving_figures(folder: Path, every: float = 1.0):
    """While the body runs (the notebooks executing), the figures their kernels defer (``page.defer``) are written
    into ``folder`` by one browser in this process, each about a second after its chapter made it: one browser for
    the whole book instead of one started in every chapter's kernel (about 2 s of CPU each)."""
    from helpers.show.page import save_deferred

    stop, errors = threading.Event(), []

    def loop():
        try:
            while not stop.wait(every):
                save_deferred(folder)
        except Exception as e:  # save() only warns of a figure it cannot write: anything else is a bug, raised below
            errors.append(e)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
    if errors:
        raise errors[0]
    save_deferred(folder)


def build(profile: str | None = None, run_dir: str | None = None, timeout: int | None = None) -> Path:
    """The whole book; returns the folder holding ``index.html``."""
    t = time.perf_counter()
    name, reason = choose_profile(profile)
    # progress bars would land in the pages as widgets; the build log records each notebook instead
    env = {"SAE_PROFILE": name, "SAE_BOOK_BUILD": "1", "SAE_FALLBACK_REASON": reason or "", "TQDM_DISABLE": "1",
           "SAE_SAES": choose_saes(name)}
    if run_dir:
        env["SAE_RUN_DIR"] = str(Path(run_dir).resolve())
    run = open_run(settings=Settings.from_environment({**os.environ, **env}))  # the run the chapters use
    with saving_figures(run.run_dir / "figures"):
        executed = execute_notebooks(ROOT / "_build" / "executed", env, timeout=timeout)
    html = build_html(stage(executed, run.banner(), ROOT / "_build" / "src", run.run_dir / "atlas"), ROOT)
    print(f"book ({name} profile) built in {time.perf_counter() - t:.0f} s: {html / 'index.html'}")
    return html


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers book", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("PROFILE") or None, choices=list(PROFILES),
                        help="smoke, cpu, gpu or paper (default: cpu, falling back to smoke offline)")
    parser.add_argument("--run-dir", default=None, help="reuse artifacts from this run directory")
    args = parser.parse_args(argv)
    if args.profile is not None and args.profile not in PROFILES:  # $PROFILE, which argparse does not check
        print(f"error: PROFILE={args.profile!r} is not a profile; choose from {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    try:
        build(args.profile, args.run_dir)
    except ProfileUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
