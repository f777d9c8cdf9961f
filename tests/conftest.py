import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
# The smoke book's kernels run beside the tests (``start_smoke_book``): OpenMP threads that wait sleep instead of
# spinning, or the two processes' spinning threads take the two cores from each other (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the ImageNet sample is not at {SAMPLE}")


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from helpers.data.images import generate_images

    return generate_images(folder, n, seed).paths


SMOKE: dict = {}  # the smoke book's background build: "root", "process"
AFTER = "smoke_run_after_"  # + a chapter ("05"): the fixtures of tests that wait for that chapter (_smoke_run_after)


def _needs(item, fixture) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def _chapter(item) -> str | None:
    """The smoke book's chapter a test waits for ("03"; "book": the whole book built), or None if it needs none."""
    found = [name.removeprefix(AFTER) for name in getattr(item, "fixturenames", ()) if name.startswith(AFTER)]
    return "book" if _needs(item, "smoke_book") else max(found) if found else None


def pytest_collection_modifyitems(config, items):
    """The smoke book's tests (marked ``smoke_book``) last: those that need only its first chapters
    (``smoke_run_after_03``, ...) first among them, by chapter. The book is built in the background meanwhile
    (``pytest_collection_finish``); ``pytest_runtestloop`` runs each of those as soon as its chapter has executed."""
    waiting = sorted((item for item in items if _chapter(item)), key=lambda item: _chapter(item))  # stable
    for item in waiting:
        item.add_marker(pytest.mark.smoke_book)
    later = set(map(id, waiting))
    items[:] = [item for item in items if id(item) not in later] + waiting


def executed(chapter: str) -> bool:
    """Whether the background smoke book has executed chapter ``chapter`` ("05") without error."""
    import json

    log = SMOKE["root"] / "executed" / "execution.jsonl"
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if record["notebook"].startswith(chapter) and record["status"] == "ok":
            return True
    return False


class Schedule:
    """The session's tests in their collected order, except that the tests waiting for a chapter of the smoke book
    run as soon as it has executed (looked at where one test file ends and the next begins, so a module's fixtures
    are made once), not after all the others: on 2 cores they then run beside the book's last chapters instead of
    after it (issue 25)."""

    def __init__(self, items):
        self.plain = [item for item in items if not _chapter(item)][::-1]  # popped from the end
        self.waiting = {}  # chapter -> its tests
        for item in items:
            if _chapter(item) and _chapter(item) != "book":
                self.waiting.setdefault(_chapter(item), []).append(item)
        self.rest = [item for item in items if _chapter(item) == "book"][::-1]
        self.group, self.last = [], None

    def next(self):
        if not self.group:
            boundary = self.last is None or not self.plain or self.plain[-1].path != self.last.path
            ready = [c for c in sorted(self.waiting) if boundary and (not self.plain or executed(c))]
            if ready:
                self.group = self.waiting.pop(ready[0])[::-1]
        queue = self.group or self.plain or self.rest
        self.last = queue.pop() if queue else None
        return self.last


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's own loop over ``Schedule``'s order, where the smoke book is being built (else pytest's loop)."""
    if "process" not in SMOKE or session.testsfailed or session.config.option.collectonly:
        return None
    schedule = Schedule(session.items)
    item = schedule.next()
    while item is not None:
        nextitem = schedule.next()
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        item = nextitem
    return True


def start_smoke_book() -> None:
    """Start building the smoke book in a background process (once): its notebooks' kernels then run beside the rest
    of the suite, so both cores are busy from the start."""
    if "process" in SMOKE:
        return
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="smoke-book-"))
    log = open(root / "build.log", "w")
    SMOKE.update(root=root, log=log, process=subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("smoke_book.py")), str(root)], stdout=log,
        stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]))


def smoke_book_through(chapter: str) -> Path:
    """The smoke book's run once its notebooks up to chapter ``chapter`` ("03") have executed, while the later ones
    go on: for tests that read only what those chapters make (later chapters add files beside them, never rewrite
    them) and compute in a run of their own or write only what the book writes the same. One thing a later chapter
    deletes: the harvest's kept input of mixed4a, after chapter 04's example pass (a run of a test's own links the
    harvest without it: tests/test_families.py)."""
    import time

    import smoke_book as smoke

    start_smoke_book()
    finished = False
    while not executed(chapter):
        if finished:
            raise RuntimeError(f"the smoke book did not execute chapter {chapter}:\n"
                               f"{(SMOKE['root'] / 'build.log').read_text()[-6000:]}")
        finished = SMOKE["process"].poll() is not None  # one more look at the log after the process ended
        time.sleep(0.5)
    os.environ.update(smoke.reader_environment(SMOKE["root"]))
    return SMOKE["root"] / "run"


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(item.get_closest_marker("smoke_book") for item in session.items):
        start_smoke_book()


def pytest_sessionfinish(session):
    """The background build stopped if the session ends before it (an -x failure, ^C); its folder removed, unless a
    test failed (then kept, for a look at the executed notebooks and the run)."""
    import shutil

    if "process" in SMOKE:
        if SMOKE["process"].poll() is None:
            SMOKE["process"].kill()
            SMOKE["process"].wait()
        SMOKE["log"].close()
        if session.testsfailed:
            print(f"\nthe smoke book (executed notebooks, run, build log) is kept at {SMOKE['root']}")
        else:
            shutil.rmtree(SMOKE["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 7)
    return folder


@pytest.fixture(scope="session")
def random_model():
    from helpers.data.inception import load_model

    return load_model("random", seed=0)[0]


@pytest.fixture(scope="session")
def harvest_run(tmp_path_factory, image_dir) -> Path:
    """A small finished harvest over two layers, made once per session."""
    from helpers.data.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("runs") / "harvest"
    return harvest(HarvestConfig(images=str(image_dir), out=str(out), layers="mixed4a,mixed4c", weights="random",
                                 batch_size=3, shard_images=4, workers=0, device="cpu"))


def _smoke_run_after(chapter: str, made: str):
    """A session fixture: the smoke book's run once chapter ``chapter`` (which made ``made``) has executed."""
    def fixture() -> Path:
        return smoke_book_through(chapter)

    fixture.__doc__ = f"The smoke book's run once chapter {chapter} ({made}) has executed."
    return pytest.fixture(scope="session", name=AFTER + chapter)(fixture)


smoke_run_after_03 = _smoke_run_after("03", "the harvest, every layer's SAE, the families sweep")
smoke_run_after_05 = _smoke_run_after("05", "the circuits: each layer's attribution matrix kept")
smoke_run_after_08 = _smoke_run_after("08", "the explorer and the atlas: every layer's view")
smoke_run_after_10 = _smoke_run_after("10", "the last notebook; the book's pages still being built")


@pytest.fixture(scope="session")
def smoke_book():
    """Every notebook executed in the smoke profile, and the book built from them (once, in the background)."""
    import smoke_book as smoke

    start_smoke_book()  # started already where collection showed a test that needs it
    root = SMOKE["root"]
    if SMOKE["process"].wait() != 0 or not (root / smoke.DONE).exists():
        raise RuntimeError(f"the smoke book failed to build:\n{(root / 'build.log').read_text()[-6000:]}")
    os.environ.update(smoke.reader_environment(root))
    executed = [Path(p) for p in (root / smoke.DONE).read_text().splitlines()]
    return {"executed": {p.stem: p for p in executed}, "html": root / "out" / "_build" / "html", "run": root / "run"}


def stub_hub(monkeypatch, snapshot: Path, downloads: Path, dates: dict | None = None) -> None:
    """The Hugging Face hub, answering from a local folder: ``snapshot``'s files are the repository's (listing,
    digests, last commits from ``dates``), a download copies one into ``downloads`` as the hub cache would."""
    import hashlib
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    from helpers.run import author

    def entry(path):
        digest = hashlib.sha256((snapshot / path).read_bytes()).hexdigest()
        return SimpleNamespace(path=path, size=(snapshot / path).stat().st_size, lfs=SimpleNamespace(sha256=digest),
                               blob_id=digest, last_commit=SimpleNamespace(date=(dates or {}).get(path)))

    class Api:
        def list_repo_tree(self, repo, revision=None, recursive=False):
            return [entry(str(p.relative_to(snapshot))) for p in snapshot.rglob("*") if p.is_file()]

        def get_paths_info(self, repo, paths, expand=False, revision=None):
            return [entry(p) for p in paths]

    def download(repo, filename, revision=None, cache_dir=None):
        out = downloads / "snapshots" / ("d" * 40) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(snapshot / filename, out)
        return str(out)

    monkeypatch.setattr(author, "_reachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
