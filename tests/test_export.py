"""Figures that leave: PNG/SVG/HTML files through kaleido and Debian's chromium, static images in executed notebooks,
and the app's Export report / Export plots buttons (fake runner, no page)."""

from __future__ import annotations

import html
import os
import re
import stat
from pathlib import Path

import pytest

pytest.importorskip("plotly", reason="the app extra is not installed (pip install -e '.[dev]')")
pytest.importorskip("ipywidgets", reason="the app extra is not installed (pip install -e '.[dev]')")

import plotly.graph_objects as go  # noqa: E402

from test_app import ScriptedRunner, app  # noqa: E402,F401 - app is a fixture
from test_notebooks import kernel_env  # noqa: E402,F401 - a fixture: a python3 kernel with its files in tmp_path
from widgets import figures  # noqa: E402
from workbench.errors import ExportError  # noqa: E402
from workbench.store import Store  # noqa: E402

needs_browser = pytest.mark.skipif(figures.browser_path() is None, reason="no chromium here (apt-get install chromium)")


@pytest.fixture(scope="module", autouse=True)
def browser_home(session_tmp):
    """chromium writes under $HOME: a temporary one for this module (and the kernels it starts); the shared browser
    is closed afterwards."""
    old = os.environ.get("HOME")
    home = session_tmp / "chromium-home"
    home.mkdir(exist_ok=True)
    os.environ["HOME"] = str(home)
    yield home
    figures.close_browser()
    if old is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = old


@pytest.fixture
def fig():
    return go.Figure(go.Bar(x=["a", "b"], y=[3.25, 7.5], name="bars"), layout={"title": {"text": "Two bars"}})


@pytest.fixture
def not_a_browser(tmp_path, monkeypatch):
    """BROWSER_PATH pointing at an executable that is no browser (it exits at once)."""
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    return fake


def test_html_export_is_self_contained(fig, tmp_path):
    out = figures.export_figure(fig, tmp_path / "bars.html")
    text = out.read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", text)  # plotly.js inlined, no CDN
    assert "Two bars" in text and "3.25" in text and len(text) > 1_000_000


@pytest.mark.parametrize("name, says", [("bars.txt", "must end in .png, .svg, .html"),
                                        ("missing/bars.png", "does not exist"),
                                        ("x" * 300 + ".png", "cannot write")])
def test_bad_export_paths_are_one_sentence(fig, tmp_path, name, says):
    with pytest.raises(ExportError, match=re.escape(says)):
        figures.export_figure(fig, tmp_path / name)


def test_a_folder_is_not_an_export_path(fig, tmp_path):
    (tmp_path / "plots.png").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        figures.export_figure(fig, tmp_path / "plots.png")


def test_browser_path_that_is_not_executable(fig, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("not a browser")
    monkeypatch.setenv("BROWSER_PATH", str(text))
    assert figures.kaleido_ready() == f"BROWSER_PATH={str(text)!r} is not an executable file: set it to a Chrome " \
                                      "or Chromium browser"
    with pytest.raises(ExportError, match="not an executable file"):
        figures.export_figure(fig, tmp_path / "bars.png")


def test_kaleido_without_a_usable_chromium_is_one_sentence(fig, tmp_path, not_a_browser):
    reason = figures.kaleido_ready()
    assert reason is not None and reason.startswith(f"{str(not_a_browser)!r} did not start as a headless browser")
    assert "\n" not in reason and "Traceback" not in reason
    with pytest.raises(ExportError, match="did not start as a headless browser"):
        figures.export_figure(fig, tmp_path / "bars.svg")
    assert not (tmp_path / "bars.svg").exists()


@needs_browser
def test_png_and_svg_through_one_running_browser(fig, tmp_path):
    assert figures.kaleido_ready() is None
    browser = figures._SHARED
    png = figures.export_figure(fig, tmp_path / "bars.png")
    svg = figures.export_figure(fig, tmp_path / "bars.svg", width=400, height=300)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png.read_bytes()[16:20], "big") == 700  # the default width
    text = svg.read_text()
    assert text.startswith("<svg") and 'width="400"' in text and "Two bars" in text
    assert figures._SHARED is browser  # one chromium for every figure


@needs_browser
def test_a_failed_render_is_one_sentence_and_the_next_export_starts_afresh(fig, tmp_path, monkeypatch):
    assert figures.kaleido_ready() is None
    broken = figures._SHARED

    def crash(*args, **kwargs):
        raise RuntimeError("tab crashed")

    monkeypatch.setattr(broken, "render", crash)
    with pytest.raises(ExportError, match=re.escape("could not render the figure as PNG (RuntimeError: tab crashed)")):
        figures.export_figure(fig, tmp_path / "a.png")
    assert figures._SHARED is None and not (tmp_path / "a.png").exists()
    assert figures.export_figure(fig, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert figures._SHARED is not broken


@needs_browser
def test_static_images_add_a_png_beside_the_interactive_figure(fig):
    import plotly.io as pio

    old = pio.renderers.default
    pio.renderers.default = "plotly_mimetype"  # what a Jupyter kernel starts with
    try:
        assert figures.static_images() is None
        assert pio.renderers.default == "plotly_mimetype+workbench_png"
        bundle = pio.renderers._build_mime_bundle(fig.to_dict())
        assert "application/vnd.plotly.v1+json" in bundle and bundle["image/png"].startswith("iVBORw0KGgo")
        figures.static_images(enable=False)
        assert pio.renderers.default == "plotly_mimetype"
        assert "image/png" not in pio.renderers._build_mime_bundle(fig.to_dict())
    finally:
        pio.renderers.default = old


def test_static_images_say_once_why_not(fig, not_a_browser, monkeypatch):
    import plotly.io as pio

    monkeypatch.setattr(figures, "_told", [])
    old = pio.renderers.default
    try:
        reason = figures.static_images()
        assert reason is not None and "did not start as a headless browser" in reason
        assert pio.renderers.default == old  # interactive output stays as it was
    finally:
        pio.renderers.default = old


@needs_browser
@pytest.mark.slow
def test_executed_notebook_exported_to_html_shows_every_figure(tmp_path, kernel_env):  # noqa: F811
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    cells = ["from widgets.figures import static_images\nstatic_images()",
             "import plotly.graph_objects as go\ngo.Figure(go.Bar(x=[1, 2], y=[3, 4])).show()",
             "fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[2, 1, 2]))\nfig.show()"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    NotebookClient(nb, timeout=300, kernel_name=kernel_env, resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in nb.cells[1:]:
        (out,) = [o for o in cell.outputs if o.output_type == "display_data"]
        assert {"application/vnd.plotly.v1+json", "image/png"} <= set(out.data)
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert len(re.findall(r"<img[^>]+src=\"data:image/png;base64,", body)) == 2


# ---------------------------------------------------------------------------------------------- the app's buttons
def _ran(app, tmp_path, runs: int = 2):  # noqa: F811
    w = app()
    for _ in range(runs):
        w.start()
        w.wait(10)
    return w


def test_export_report_button_writes_the_selected_runs(app, tmp_path):  # noqa: F811
    w = _ran(app, tmp_path)
    w.history.select(1)
    w.history.select(2)
    w.exports.report_path.value = "compare.html"
    w.exports.report_button.click()
    w.exports.wait(60)
    out = tmp_path / "compare.html"  # the app's working folder
    text = out.read_text()
    assert "Workbench report: runs 1, 2" in text
    assert str(out) in w.exports.status.value and "runs 1, 2" in w.exports.status.value
    assert not w.exports.report_button.disabled


def test_export_report_without_selection_reports_the_newest_run(app, tmp_path):  # noqa: F811
    w = _ran(app, tmp_path)
    w.exports.report_button.click()
    w.exports.wait(60)
    assert "Workbench report: runs 2<" in (tmp_path / "workbench-report.html").read_text()


@pytest.mark.parametrize("path, says", [("report.txt", "must end in .html"),
                                        ("no/such/folder/report.html", "does not exist")])
def test_export_report_bad_path_is_one_sentence(app, tmp_path, path, says):  # noqa: F811
    w = _ran(app, tmp_path, runs=1)
    w.exports.report_path.value = path
    w.exports.report_button.click()
    w.exports.wait(60)
    assert "wb-error" in w.exports.status.value and says in w.exports.status.value
    assert "Traceback" not in w.exports.status.value


def test_export_report_with_no_runs(app, tmp_path):  # noqa: F811
    w = app()
    w.exports.report_button.click()
    w.exports.wait(30)
    assert "no runs to report yet" in w.exports.status.value


def test_locked_dashboard_exports_only_under_its_folder(tmp_path, monkeypatch):
    from widgets import Workbench
    from workbench.serve.publish import PublishPolicy

    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.chdir(root)
    w = Workbench(store_path=str(root / "runs.sqlite"), runner=ScriptedRunner(),
                  policy=PublishPolicy(models="tiny", root=str(root)))
    w.start()
    w.wait(10)
    w.exports.report_path.value = str(tmp_path / "outside.html")
    w.exports.report_button.click()
    w.exports.wait(60)
    assert "outside this server's working folder" in html.unescape(w.exports.status.value)
    assert not (tmp_path / "outside.html").exists()
    w.exports.report_path.value = "inside.html"
    w.exports.report_button.click()
    w.exports.wait(60)
    assert (root / "inside.html").exists()


def test_export_plots_as_html_writes_every_plot(app, tmp_path):  # noqa: F811
    from widgets.export import figures_in

    w = _ran(app, tmp_path, runs=1)
    (tmp_path / "plots").mkdir()
    w.exports.plots_folder.value = "plots"
    w.exports.plot_format.value = "html"
    w.exports.plots_button.click()
    w.exports.wait(120)
    written = sorted((tmp_path / "plots").glob("workbench-plot-*.html"))
    shown = figures_in(w)
    assert len(shown) >= 3 and w.live in shown and w.history.pareto.widget in shown
    assert len(written) == len(shown), w.exports.status.value
    assert f"{len(shown)} plots written as HTML" in w.exports.status.value
    assert any("history" in p.name for p in written)


@needs_browser
def test_export_plots_as_png(app, tmp_path):  # noqa: F811
    w = _ran(app, tmp_path, runs=1)
    w.exports.plot_format.value = "png"
    w.exports.plots_button.click()
    w.exports.wait(300)
    written = list(tmp_path.glob("workbench-plot-*.png"))
    assert written and all(p.read_bytes()[:4] == b"\x89PNG" for p in written), w.exports.status.value


def test_export_plots_without_a_usable_chromium(app, tmp_path, not_a_browser):  # noqa: F811
    w = _ran(app, tmp_path, runs=1)
    w.exports.plot_format.value = "svg"
    w.exports.plots_button.click()
    w.exports.wait(120)
    assert "did not start as a headless browser" in w.exports.status.value
    assert not list(tmp_path.glob("*.svg"))


def test_export_plots_into_a_missing_folder(app, tmp_path):  # noqa: F811
    w = app()
    w.exports.plots_folder.value = "nowhere"
    w.exports.plots_button.click()
    w.exports.wait(30)
    assert "plots folder" in w.exports.status.value and "does not exist" in w.exports.status.value


def test_store_is_untouched_by_exports(app, tmp_path):  # noqa: F811
    w = _ran(app, tmp_path, runs=1)
    before = Store(tmp_path / "runs.sqlite").summaries()
    w.exports.report_button.click()
    w.exports.wait(60)
    assert Store(tmp_path / "runs.sqlite").summaries() == before
