"""Saving a figure as PNG and SVG (``page.save``): one browser kept for a process's figures, the same pixels as
plotly's own one-shot export, and a missing or silent browser costing a warning, never the chapter."""

import io
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

from helpers.run import book
from helpers.show import page
from browser import CHROMIUM


@pytest.fixture
def fresh_browser(monkeypatch):
    """No browser kept from an earlier test, and none left for a later one."""
    import kaleido

    kaleido.stop_sync_server(silence_warnings=True)
    monkeypatch.setattr(page, "_BROWSER", {})
    yield
    kaleido.stop_sync_server(silence_warnings=True)


def figure(n: int) -> go.Figure:
    return go.Figure(go.Scatter(x=list(range(n)), y=[i % 7 for i in range(n)]), layout=dict(height=300))


def test_saved_figures_are_plotlys_own_images_from_one_kept_browser(fresh_browser, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does)")
    import kaleido
    from kaleido import _sync_server
    from PIL import Image

    figs = [figure(50), figure(80)]
    expected = [_sync_server.oneshot_async_run(kaleido.calc_fig, args=(f,), kwargs={"opts": {
        "format": "png", "width": 900, "height": 300}}) for f in figs]  # a browser started for each, as plotly does
    for i, fig in enumerate(figs):
        paths = page.save(fig, tmp_path / "figures", f"f{i}")
        assert [p.name for p in paths] == [f"f{i}.png", f"f{i}.svg"]
        assert paths[0].read_bytes() == expected[i]
        assert Image.open(io.BytesIO(paths[0].read_bytes())).size == (900, 300)
        assert paths[1].read_text().startswith("<svg") and "</svg>" in paths[1].read_text()
    assert page._BROWSER["state"] == "kept" and kaleido._global_server.is_running()
    # in a book build the chapter keeps the figure (no browser in its kernel); the build writes the same image later,
    # one kept while the notebooks run (a second one here) and the rest at the end
    run = SimpleNamespace(random_weights=False, book_build=True, run_dir=tmp_path / "run")
    folder = run.run_dir / "figures"
    page.show(figs[1], run, save_as="later")
    assert [p.name for p in folder.rglob("*")] == ["deferred", "later.json"]
    with book.saving_figures(folder, every=0.05):
        page.show(figs[0], run, save_as="meanwhile")
        deadline = time.monotonic() + 60
        while not (folder / "meanwhile.svg").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (folder / "meanwhile.png").read_bytes() == expected[0]
    assert (folder / "later.png").read_bytes() == expected[1]
    assert sorted(p.name for p in folder.iterdir()) == ["later.png", "later.svg", "meanwhile.png", "meanwhile.svg"]


def test_without_chrome_a_save_warns_and_writes_nothing(fresh_browser, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with caplog.at_level(logging.WARNING, logger="helpers.show.page"):
        assert page.save(figure(20), tmp_path / "figures", "f") == []
    assert "could not write f.png/.svg" in caplog.text and "Chrome" in caplog.text
    assert page._BROWSER["state"] == "one-shot"
    assert not list((tmp_path).rglob("f.*"))


def test_a_browser_that_never_answers_stops_saving_instead_of_hanging(fresh_browser, tmp_path, monkeypatch, caplog):
    import threading

    import plotly.io as pio

    release, calls = threading.Event(), []

    def silent(*args, **kwargs):
        calls.append(args)
        release.wait(30)  # a browser that never answers (released at the end of the test)
        return b""

    monkeypatch.setattr(pio, "to_image", silent)
    monkeypatch.setattr(page, "_BROWSER", {"state": "one-shot"})
    monkeypatch.setattr(page, "SAVE_TIMEOUT", 0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="helpers.show.page"):
            assert page.save(figure(20), tmp_path, "a") == []
            assert page.save(figure(20), tmp_path, "b") == []
        assert len(calls) == 1  # the second figure did not wait on the silent browser again
        assert page._BROWSER["state"] == "failed"
        assert "did not answer" in caplog.text and "earlier figure's browser never answered" in caplog.text
        assert not list(tmp_path.iterdir())
    finally:
        release.set()
