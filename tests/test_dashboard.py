"""The Voila dashboard in a real browser (Debian's chromium via Playwright), with every non-local request blocked.

Screenshots and timings land in test-artifacts/ (or $WORKBENCH_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import re
import time
from urllib.parse import urlparse

import pytest

pytest.importorskip("playwright", reason="the dev extra is not installed (pip install -e '.[dev]')")

import psutil  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from tools.artifacts import ARTIFACTS, record  # noqa: E402
from tools.browser import browser, chromium_path, free_port, server, widget_button  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.serve.dashboard import DashboardConfig, environment, notebook_path, voila_command  # noqa: E402
from workbench.store import Store  # noqa: E402

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (bash dev.sh setup)")]
DEFAULTS = {"threads": 1, "warmup": 0, "repeats": 2, "min_duration_s": 0.0, "max_new_tokens": 16,
            "eval_tokens": 256, "eval_context": 64}
POINTS_JS = """(title) => {
  for (const p of document.querySelectorAll('.js-plotly-plot')) {
    const texts = [...p.querySelectorAll('.gtitle, .annotation-text')].map(t => t.textContent);
    if (texts.some(t => t.startsWith(title))) return p.querySelectorAll('.scatterlayer .trace path.point').length;
  }
  return -1;
}"""

TRACES_JS = """(title) => {  // for failure messages: markers drawn per trace, and the data each trace holds
  for (const p of document.querySelectorAll('.js-plotly-plot')) {
    const texts = [...p.querySelectorAll('.gtitle, .annotation-text')].map(t => t.textContent);
    if (texts.some(t => t.startsWith(title))) return {
      drawn: [...p.querySelectorAll('.scatterlayer .trace')].map(t => t.querySelectorAll('path.point').length),
      data: (p.data || []).map(t => [t.name, (t.x || []).length, (t.y || []).length,
                                     JSON.stringify(t.y || []).slice(0, 400)]),
      title: texts};
  }
  return null;
}"""
BARS_JS = POINTS_JS.replace("'.scatterlayer .trace path.point'", "'.barlayer .trace .point'")
FULL_WIDTH_JS = """() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  return plots.length >= 2 && plots.every(p => {
    const svg = p.querySelector('svg.main-svg');
    return svg && svg.getBoundingClientRect().width >= 0.97 * p.getBoundingClientRect().width;
  });
}"""
HISTORY_JS = """() => {
  const plot = [...document.querySelectorAll('.js-plotly-plot')].find(
    p => [...p.querySelectorAll('.gtitle')].some(t => t.textContent.startsWith('History')));
  const title = plot ? plot.querySelector('.gtitle').textContent : '';
  const runs = plot ? plot.querySelectorAll('.scatterlayer .trace:first-child path.point').length : -1;
  const table = [...document.querySelectorAll('table.wb-table')].find(
    t => [...t.querySelectorAll('th')].some(h => h.textContent === 'when (UTC)'));
  return {title, runs, rows: table ? table.querySelectorAll('tbody tr').length : -1};
}"""


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """Voila serving notebooks/dashboard.ipynb, its store holding two earlier runs."""
    from test_app import fake_result

    root = tmp_path_factory.mktemp("dashboard")
    store = root / "runs.sqlite"
    for scale, ppl in ((1.0, 20.0), (0.5, 30.0)):
        Store(store).add(fake_result(RunConfig(), scale=scale, ppl=ppl))
    config = DashboardConfig(port=free_port(), store=str(store), cull_idle_s=600)
    env = {k: v for k, v in environment(config, DEFAULTS).items() if k.startswith("WORKBENCH_")}
    url = f"http://127.0.0.1:{config.port}/"
    # wait on a static URL: a request for the notebook itself would start a kernel nobody uses
    with server(voila_command(config, notebook_path()), url + "voila/static/", root, home=root / "home",
                log=root / "voila.log", env=env, timeout=120) as proc:
        yield {"url": url, "proc": proc, "root": root, "store": store}


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


class Page:
    """A dashboard page in a fresh browser context that blocks every non-local request."""

    def __init__(self, chromium, url: str, wait: bool = True) -> None:
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []
        self.context = chromium.new_context(viewport={"width": 1500, "height": 2400})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.t0 = time.perf_counter()
        self.page.goto(url, timeout=180_000, wait_until="load" if wait else "commit")
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the app's Run button (the kernel ran the notebook and the widgets rendered)."""
        widget_button(self.page, "Run").wait_for(timeout=240_000)
        self.cold_start_s = time.perf_counter() - self.t0

    def _route(self, route) -> None:
        host = urlparse(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def points(self, title: str) -> int:
        """Markers drawn in the plot whose title starts with `title` (-1: no such plot)."""
        return self.page.evaluate(POINTS_JS, title)

    def text_input(self, label: str):
        return self.page.locator(".widget-text", has=self.page.locator("label", has_text=re.compile(f"^{label}$"))
                                 ).locator("input")

    def open_section(self, title: str) -> None:
        self.page.get_by_text(title, exact=True).first.click()

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def kernel_id(self) -> str:
        """The id of the kernel Voila started for this page."""
        return self.page.evaluate("() => JSON.parse(document.getElementById('jupyter-config-data').textContent)"
                                  ".kernelId")

    def leave(self) -> None:
        """Close the tab as a person does: its beforeunload asks Voila to shut the page's kernel down."""
        with contextlib.suppress(Exception):
            self.page.close(run_before_unload=True)
            self.page.wait_for_event("close", timeout=10_000)

    def close(self) -> None:
        self.leave()
        self.context.close()


@pytest.fixture
def page(dashboard, chromium):
    p = Page(chromium, dashboard["url"])
    yield p
    p.close()


def test_page_renders_offline_with_the_history_drawn(page):
    assert page.errors == []
    assert page.page.get_by_text("LLM Inference Workbench").count() >= 1
    # plotly #4998: figures filled before the page connected (the history from the store) keep their data
    page.page.wait_for_function(f"({POINTS_JS})('History:') >= 2", timeout=30_000)
    assert not [u for u in page.blocked if "plotly" in u or "widget" in u]  # nothing the app needs is remote
    # before a run the live plots say so (no meaningless axes); every figure is as wide as its place
    page.page.wait_for_function("document.querySelectorAll('.annotation-text').length > 0", timeout=30_000)
    assert page.page.locator(".annotation-text", has_text="no run yet").count() == 4
    page.page.wait_for_function(FULL_WIDTH_JS, timeout=30_000)
    page.screenshot("dashboard-loaded.png")
    record("dashboard.json", "cold_start", seconds=round(page.cold_start_s, 2),
           blocked_requests=sorted(set(page.blocked)))


def finished_runs(page: Page) -> int:
    """The run number of the last 'done: run N' status (0: none yet). Read in one step, without waiting: the
    status leaves 'done' when the next run starts, and a locator that waited for it would wait for the whole run."""
    texts = page.page.get_by_text(re.compile(r"done: run \d+")).all_inner_texts()
    found = re.search(r"done: run (\d+)", texts[0]) if texts else None
    return int(found.group(1)) if found else 0


def run_and_watch(page: Page, timeout: float = 240.0) -> tuple[float | None, list[int]]:
    """Click Run; poll the latency plot until the run is done. Returns (click -> first live token s, counts)."""
    before = finished_runs(page)
    t0 = time.perf_counter()
    widget_button(page.page, "Run").click()
    first, counts = None, []
    live = page.page.locator(".annotation-text", has_text="Per-token latency (live)")
    while time.perf_counter() - t0 < timeout and finished_runs(page) <= before:
        n = page.points("Per-token latency")
        if first is None and n > 0 and live.count():
            first = time.perf_counter() - t0
        counts.append(n)
        time.sleep(0.05)
    assert finished_runs(page) > before, "the run did not finish"
    return first, counts


def test_run_plots_tokens_while_it_runs_then_the_final_numbers(page):
    tokens = 400  # about two seconds of decoding per run here: the plot must grow while it happens
    page.open_section("Workload")
    box = page.text_input("max new tokens")
    box.fill(str(tokens))
    box.press("Enter")
    time.sleep(1.0)  # let the value reach the kernel
    first_cold, counts = run_and_watch(page)
    markers = 2 * tokens  # an arrival marker per token, a gap marker per token after the first, the TTFT
    growing = sorted({c for c in counts if 0 < c < markers})
    assert len(growing) >= 3, f"the latency plot did not grow during the run: {counts}"
    page.page.wait_for_function(f"({POINTS_JS})('Per-token latency: TTFT p50') > 0", timeout=30_000)
    assert page.page.get_by_text(re.compile(r"Accuracy: perplexity \d")).count() == 1
    # every subplot received its data in the browser: roofline (2 bars), memory (>= 4), accuracy (3)
    assert page.page.evaluate(BARS_JS, "Per-token latency") >= 9
    assert page.errors == []
    page.screenshot("dashboard-after-run.png")
    first_warm, _ = run_and_watch(page)  # the unmodified model's predictions are cached now
    # None: the browser drew no token before the run ended (a busy machine can delay the page that long)
    record("dashboard.json", "run",
           click_to_first_plotted_token_s={"first_run": first_cold and round(first_cold, 2),
                                           "second_run": first_warm and round(first_warm, 2)},
           partial_counts_seen=len(growing), new_tokens=tokens)


def test_stop_ends_a_long_run(page):
    page.open_section("Workload")
    tokens = page.text_input("max new tokens")
    tokens.fill("900")
    tokens.press("Enter")
    page.open_section("Measurement")
    for label, value in (("repeats", "50"), ("min duration s", "120")):
        box = page.text_input(label)
        box.fill(value)
        box.press("Enter")
    time.sleep(1.0)
    widget_button(page.page, "Run").click()
    page.page.wait_for_function(f"({POINTS_JS})('Per-token latency') > 5", timeout=120_000)
    t0 = time.perf_counter()
    widget_button(page.page, "Stop").click()
    page.page.get_by_text(re.compile("stopped: partial result kept")).wait_for(timeout=60_000)
    record("dashboard.json", "stop", click_to_stopped_s=round(time.perf_counter() - t0, 2))


def test_bad_model_id_shows_one_message(page):
    page.page.locator(".widget-dropdown select").first.select_option(label="hub id or local folder…")
    folder = page.text_input("hub id / folder")
    folder.fill("./no/such/model")
    folder.press("Enter")
    time.sleep(1.0)
    widget_button(page.page, "Run").click()
    message = page.page.get_by_text(re.compile("Run failed: no model folder at"))
    message.wait_for(timeout=60_000)
    assert "Traceback" not in page.page.content()
    assert page.errors == []


def test_every_page_load_gets_its_own_kernel(dashboard, chromium):
    def kernels() -> list[psutil.Process]:
        procs = psutil.Process(dashboard["proc"].pid).children(recursive=True)
        return [p for p in procs if "ipykernel" in " ".join(p.cmdline())]

    first = Page(chromium, dashboard["url"])
    second = Page(chromium, dashboard["url"])
    try:
        assert second.errors == [] and widget_button(second.page, "Run").count() == 1
        live = kernels()
        assert len(live) >= 2
        rss = sorted(p.memory_info().rss for p in live)
        record("dashboard.json", "kernels", count=len(live), rss_mib=[round(r / 2**20) for r in rss])
    finally:
        first.close()
        second.close()


def test_two_users_at_once_each_see_only_their_own_run(dashboard, chromium):
    """Two pages run at the same time on one server: each shows its own run, both land in the shared store."""
    users = {5: Page(chromium, dashboard["url"]), 7: Page(chromium, dashboard["url"])}
    try:
        for tokens, page in users.items():
            page.open_section("Workload")
            box = page.text_input("max new tokens")
            box.fill(str(tokens))
            box.press("Enter")
        time.sleep(1.0)
        for page in users.values():
            widget_button(page.page, "Run").click()
        for page in users.values():
            page.page.get_by_text(re.compile(r"done: run \d+")).wait_for(timeout=240_000)
        stored = {r.run_id: r for r in Store(dashboard["store"]).results(status=None)}
        for tokens, page in users.items():
            own = stored[finished_runs(page)]  # the run this page reports is the one its own settings made
            assert own.status == "ok" and own.config.max_new_tokens == tokens
            page.page.wait_for_function(f"({POINTS_JS})('Per-token latency') === {2 * tokens}", timeout=30_000)
            assert page.text_input("max new tokens").input_value() == str(tokens)
            assert page.errors == []
        assert finished_runs(users[5]) != finished_runs(users[7])
    finally:
        for page in users.values():
            page.close()


@pytest.fixture
def empty_dashboard(tmp_path):
    """A Voila dashboard of its own whose results store does not exist yet."""
    store = tmp_path / "runs.sqlite"
    config = DashboardConfig(port=free_port(), store=str(store), cull_idle_s=600)
    env = {k: v for k, v in environment(config, DEFAULTS).items() if k.startswith("WORKBENCH_")}
    url = f"http://127.0.0.1:{config.port}/"
    with server(voila_command(config, notebook_path()), url + "voila/static/", tmp_path, home=tmp_path / "home",
                log=tmp_path / "voila.log", env=env, timeout=120) as proc:
        yield {"url": url, "proc": proc, "root": tmp_path, "store": store, "log": tmp_path / "voila.log"}


def drawn(page: Page, tokens: int) -> dict[str, object]:
    """What the page drew once it settled: live-plot markers, History plot runs and title, table rows, errors."""
    with contextlib.suppress(PlaywrightTimeout):
        page.page.wait_for_function(f"({POINTS_JS})('Per-token latency') === {2 * tokens}", timeout=60_000)
        page.page.wait_for_function(f"(h => h.runs === h.rows)(({HISTORY_JS})())", timeout=30_000)
    history = page.page.evaluate(HISTORY_JS)
    title = re.match(r"History: \d+ runs?", history["title"])
    return {"points": page.points("Per-token latency"), "history_runs": history["runs"],
            "title": title and title.group(0).rstrip("s"), "table_rows": history["rows"], "errors": page.errors,
            "failed_models": sum("Failed to initialize model" in m for m in page.console + page.errors)}


def test_four_pages_at_once_each_plot_their_own_run(empty_dashboard, chromium):
    """Four visitors open the dashboard together and press Run together (2 cores, 4 kernels, 4 pages).

    anywidget 0.11 gives a model 2 s to import its front-end module and initialize; past that it drops
    every message to the model for good ("[anywidget] Failed to initialize model."): the plots stayed as
    the page first drew them. Each page's live plot must get its points and its History plot its runs.
    """
    pages = [Page(chromium, empty_dashboard["url"], wait=False) for _ in range(4)]
    try:
        for page in pages:
            page.wait_ready()
        loaded = time.perf_counter()
        for page in pages:
            widget_button(page.page, "Run").click()
        for page in pages:
            page.page.get_by_text(re.compile(r"done: run \d+")).wait_for(timeout=400_000)
        ran = time.perf_counter()
        stored = Store(empty_dashboard["store"]).results(status=None)
        assert sorted(r.run_id for r in stored) == [1, 2, 3, 4] and {r.status for r in stored} == {"ok"}
        tokens = DEFAULTS["max_new_tokens"]
        seen = [drawn(page, tokens) for page in pages]
        want = [{"points": 2 * tokens, "history_runs": s["table_rows"], "title": f"History: {s['table_rows']} run",
                 "table_rows": s["table_rows"], "errors": [], "failed_models": 0} for s in seen]
        assert seen == want, (seen, [p.page.evaluate(TRACES_JS, "Per-token latency") for p in pages],
                              [p.console[-20:] for p in pages])
        assert all(s["table_rows"] >= finished_runs(p) for s, p in zip(seen, pages))
        pages[0].screenshot("dashboard-four-pages.png")
        record("dashboard.json", "four_pages", load_s=[round(p.cold_start_s, 1) for p in pages],
               all_loaded_to_all_done_s=round(ran - loaded, 1))
    finally:
        for page in pages:
            page.close()


def test_closing_a_page_shuts_its_kernel_down(dashboard, chromium):
    """Voila's page-close request carries the page's _xsrf cookie: accepted (was 403 "'_xsrf' argument missing
    from POST" on every page, the kernel left running until culled)."""
    log = dashboard["root"] / "voila.log"
    page = Page(chromium, dashboard["url"])
    try:
        kernel = page.kernel_id()
        assert "_xsrf" in [c["name"] for c in page.context.cookies()]
        page.leave()  # the browser context stays open while Voila gets the request
        deadline = time.monotonic() + 60
        while f"Kernel shutdown: {kernel}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert f"Kernel shutdown: {kernel}" in text and "_xsrf" not in text
    finally:
        page.close()
