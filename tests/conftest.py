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
BUILT = "SAE_TEST_SMOKE_BOOK"  # the built smoke book's folder, given to the second pytest process (PageTests)
REPORTS = "SAE_TEST_REPORTS"  # where that process writes its tests' reports (JSON lines)


def _needs(item, fixture) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def _chapter(item) -> str | None:
    """The smoke book's chapter a test waits for ("03"; "book": the whole book built), or None if it needs none."""
    found = [name.removeprefix(AFTER) for name in getattr(item, "fixturenames", ()) if name.startswith(AFTER)]
    return "book" if _needs(item, "smoke_book") else max(found) if found else None


def pytest_collection_modifyitems(config, items):
    """The smoke book's tests (marked ``smoke_book``) last: those that need only its first chapters
    (``smoke_run_after_05``, ...) first among them, by chapter. The book is built in the background meanwhile
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


class PageTests:
    """The tests that drive Chromium over the built book (those with the ``browser`` fixture), run by a second
    pytest process started as soon as the book is built, beside this process's remaining tests (issue 25: they once
    took the run's last 40-50 s on about one core). Each stands in this session as an ``Elsewhere`` item: it waits
    for that process and reports the outcome the test had there (its traceback and output, where it failed)."""

    def __init__(self, items):
        import threading

        self.nodeids = [item.nodeid for item in items]
        self.process, self.results, self.log, self.lock = None, None, None, threading.Lock()
        if self.nodeids and "process" in SMOKE:  # started the moment the book is, not at the next test's end
            threading.Thread(target=lambda: SMOKE["process"].wait() == 0 and self.start_if_built(), daemon=True).start()

    def start_if_built(self) -> None:
        import subprocess
        import sys

        import smoke_book as smoke

        with self.lock:
            if self.process is not None or not self.nodeids or not (SMOKE["root"] / smoke.DONE).exists():
                return
            root = SMOKE["root"]
            env = {**os.environ, BUILT: str(root), REPORTS: str(root / "page-tests.jsonl")}
            self.log = open(root / "page-tests.log", "w")
            self.process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             *self.nodeids], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(__file__).resolve().parents[1])

    def outcome(self, nodeid: str) -> dict:
        """The test's outcome there ({"outcome", "text"}), once that process has ended."""
        import json

        if self.results is None:
            if self.process is None:  # the book not built yet: wait for it
                built_book()
                self.start_if_built()
            self.process.wait()
            self.log.close()
            self.results = {}
            path = SMOKE["root"] / "page-tests.jsonl"
            for line in (path.read_text().splitlines() if path.exists() else []):
                r = json.loads(line)
                if r["outcome"] != "passed" or r["nodeid"] not in self.results:  # a failed phase outranks a pass
                    self.results[r["nodeid"]] = r
        found = self.results.get(nodeid)
        if found is None:
            raise failed(f"the page tests' pytest process gave no result for {nodeid}", "page-tests.log")
        return found


class FailedElsewhere(Exception):
    """A test that failed in the page tests' pytest process: its report there."""


class Elsewhere(pytest.Item):
    """A test that ``PageTests`` runs in its pytest process: this item reports the outcome it had there."""

    def runtest(self):
        found = SMOKE["pages"].outcome(self.nodeid)
        if found["outcome"] == "skipped":
            pytest.skip(found["text"])
        if found["outcome"] == "failed":
            raise FailedElsewhere(found["text"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, FailedElsewhere):
            return f"(run in the page tests' pytest process)\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.name


def pytest_runtest_logreport(report):
    """In the page tests' pytest process: each test's outcome written for the session that started it."""
    if os.environ.get(REPORTS) and (report.when == "call" or report.outcome != "passed"):
        import json

        text = report.longreprtext if report.outcome == "failed" else \
            report.longrepr[2] if report.outcome == "skipped" and isinstance(report.longrepr, tuple) else ""
        text += "".join(f"\n--- {title} ---\n{content}" for title, content in report.sections)
        with open(os.environ[REPORTS], "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text}) + "\n")


class Schedule:
    """The session's tests in their collected order, except that the tests waiting for a chapter of the smoke book
    run as soon as it has executed (looked at where one test file ends and the next begins, so a module's fixtures
    are made once), not after all the others: on 2 cores they then run beside the book's last chapters instead of
    after it (issue 25). The page tests (``PageTests``) run in a second process once the book is built, where this
    session has other tests to run beside them."""

    def __init__(self, items):
        self.plain = [item for item in items if not _chapter(item)][::-1]  # popped from the end
        self.waiting = {}  # chapter -> its tests
        for item in items:
            if _chapter(item) and _chapter(item) != "book":
                self.waiting.setdefault(_chapter(item), []).append(item)
        book = [item for item in items if _chapter(item) == "book"]
        pages = [item for item in book if _needs(item, "browser")] if self.plain else []
        SMOKE["pages"] = PageTests(pages)
        self.rest = ([item for item in book if item not in pages]
                     + [Elsewhere.from_parent(item.parent, name=item.name) for item in pages])[::-1]
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
    if "root" in SMOKE:
        return
    if os.environ.get(BUILT):  # the page tests' pytest process: the session that started it built the book
        SMOKE["root"] = Path(os.environ[BUILT])
        return
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="smoke-book-"))
    log = open(root / "build.log", "w")
    SMOKE.update(root=root, log=log, process=subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("smoke_book.py")), str(root)], stdout=log,
        stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]))


def failed(what: str, log: str = "build.log") -> RuntimeError:
    """``what`` went wrong, with the end of the smoke book's ``log`` to say why."""
    return RuntimeError(f"{what}:\n{(SMOKE['root'] / log).read_text()[-6000:]}")


def built_book() -> Path:
    """The smoke book's folder once it is built (waiting for this session's background build)."""
    import smoke_book as smoke

    start_smoke_book()  # started already where collection showed a test that needs it
    root = SMOKE["root"]
    if ("process" in SMOKE and SMOKE["process"].wait() != 0) or not (root / smoke.DONE).exists():
        raise failed("the smoke book failed to build")
    return root


def smoke_book_through(chapter: str) -> Path:
    """The smoke book's run once its notebooks up to chapter ``chapter`` ("05") have executed, while the later ones
    go on: for tests that read only what those chapters make (later chapters add files beside them, never rewrite
    them) and compute in a run of their own or write only what the book writes the same. One thing a later chapter
    deletes: the harvest's kept input of mixed4a, after chapter 04's example pass."""
    import time

    import smoke_book as smoke

    start_smoke_book()
    finished = False
    while not executed(chapter):
        if finished:
            raise failed(f"the smoke book did not execute chapter {chapter}")
        finished = "process" not in SMOKE or SMOKE["process"].poll() is not None  # one more look after it ended
        time.sleep(0.5)
    os.environ.update(smoke.reader_environment(SMOKE["root"]))
    return SMOKE["root"] / "run"


def whole_suite(config) -> bool:
    """Whether the session runs every test (``make test``: no paths, no selection), so surely the smoke book's too."""
    option = config.option
    return (config.args_source is pytest.Config.ArgsSource.TESTPATHS and not option.keyword and not option.markexpr
            and not option.collectonly and not getattr(option, "lf", False) and not getattr(option, "stepwise", False)
            and not option.deselect)


def pytest_sessionstart(session):
    """Where the session runs every test, the smoke book starts before collection (which takes 5-7 s of one core)."""
    if whole_suite(session.config) and not os.environ.get(BUILT):
        start_smoke_book()


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(item.get_closest_marker("smoke_book") for item in session.items):
        start_smoke_book()


def pytest_sessionfinish(session):
    """The background build stopped if the session ends before it (an -x failure, ^C); its folder removed, unless a
    test failed (then kept, for a look at the executed notebooks and the run)."""
    import shutil

    if "process" in SMOKE:
        pages = SMOKE.get("pages")
        if pages:
            with pages.lock:
                pages.nodeids = []  # none started from now on (by the thread waiting for the book)
        for process in (SMOKE["process"], pages and pages.process):
            if process and process.poll() is None:
                process.kill()
                process.wait()
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


smoke_run_after_05 = _smoke_run_after("05", "the harvest, every layer's SAE, the families sweep (03), every layer's "
                                            "examples (04) and attribution matrix")
smoke_run_after_08 = _smoke_run_after("08", "the explorer and the atlas: every layer's view")
smoke_run_after_10 = _smoke_run_after("10", "the last notebook; the book's pages still being built")


@pytest.fixture(scope="session")
def smoke_book():
    """Every notebook executed in the smoke profile, and the book built from them (once, in the background)."""
    import smoke_book as smoke

    root = built_book()
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
