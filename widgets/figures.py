"""Figures that leave the notebook: PNG/SVG/HTML files of plotly figures, and static images in executed notebooks.

PNG and SVG come from kaleido 1.x, which drives a Chrome-family browser over the DevTools protocol
(choreographer). The workbench never downloads a browser: it uses `$BROWSER_PATH` when set, else the system's
chromium (Debian: `apt-get install chromium`), headless, without sandbox or GPU. One browser is started on first
use and kept for the whole process (a background event loop owns it): starting chromium takes seconds, each
figure after that well under one. plotly and kaleido are imported lazily, on the first figure written.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.errors import ExportError

logger = logging.getLogger(__name__)

FORMATS = {".png": "png", ".svg": "svg", ".html": "html"}  # suffix -> what export_figure writes
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
START_TIMEOUT_S = 90.0  # chromium starts in ~5 s on a busy 2-core machine
RENDER_TIMEOUT_S = 60.0
DEFAULT_SIZE = (700, 500)  # plotly's default image size (width, height) for figures without one
_INSTALL = "pip install 'llm-inference-workbench[app]'"


def browser_path() -> str | None:
    """The browser kaleido drives: `$BROWSER_PATH` when set, else the first chromium/chrome on PATH."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)


def _static_problem() -> str | None:
    """Why kaleido cannot work here, judged without starting anything (None: worth trying)."""
    try:
        import kaleido  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as e:
        return f"PNG/SVG export needs plotly and kaleido ({e.name} is not installed): {_INSTALL}"
    path = browser_path()
    if path is None:
        return ("PNG/SVG export needs a Chrome or Chromium browser and none was found: install Debian's chromium "
                "(apt-get install chromium) or set BROWSER_PATH to one")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"BROWSER_PATH={path!r} is not an executable file: set it to a Chrome or Chromium browser"
    return None


def _first_sentence(error: BaseException) -> str:
    """The first line of an exception's message (choreographer packs several sentences in a tuple)."""
    first: Any = error.args[0] if error.args else ""
    while isinstance(first, tuple) and first:
        first = first[0]
    text = str(first).strip().splitlines()[0] if str(first).strip() else type(error).__name__
    return text[:160]


class _Browser:
    """One kaleido (one headless chromium) on its own event loop thread, shared by every export of the process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="workbench-kaleido", daemon=True)
        self._thread.start()
        self._kaleido: Any = None

    def _call(self, coroutine: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the browser within {timeout:.0f} s") from None

    def start(self) -> None:
        """Open the browser; raises ExportError with one sentence when it does not come up."""
        import kaleido

        for name in ("kaleido", "choreographer", "logistro", "chrome_wrapper"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

        async def open_() -> Any:
            k = kaleido.Kaleido(path=self.path, mathjax=False, timeout=RENDER_TIMEOUT_S)  # no CDN: offline
            try:
                await k.open()
            except BaseException:
                with contextlib.suppress(Exception):  # a half-started browser is not left behind
                    await k.close()
                raise
            return k

        try:
            self._kaleido = self._call(open_(), START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to start is one sentence for the user
            self.stop()
            detail = _first_sentence(e)
            raise ExportError(f"{self.path!r} did not start as a headless browser for kaleido ({detail}); set "
                              "BROWSER_PATH to a Chrome or Chromium browser") from None

    def render(self, fig: Mapping[str, Any], fmt: str, width: int, height: int, scale: float) -> bytes:
        """The image bytes of one figure."""
        opts = {"format": fmt, "width": width, "height": height, "scale": scale}
        return self._call(self._kaleido.calc_fig(dict(fig), opts=opts), RENDER_TIMEOUT_S + 10)

    def stop(self) -> None:
        """Close the browser and the loop (safe to call twice)."""
        if self._kaleido is not None:
            try:
                self._call(self._kaleido.close(), 30)
            except Exception:  # noqa: BLE001 - closing at exit: nothing left to tell
                logger.debug("closing kaleido failed", exc_info=True)
            self._kaleido = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)


_LOCK = threading.Lock()
_SHARED: _Browser | None = None


def _browser() -> _Browser:
    """The process's running browser (started, or restarted when BROWSER_PATH changed); ExportError if none."""
    global _SHARED
    problem = _static_problem()
    if problem:
        raise ExportError(problem)
    path = browser_path() or ""
    with _LOCK:
        if _SHARED is not None and _SHARED.path != path:
            _SHARED.stop()
            _SHARED = None
        if _SHARED is None:
            browser = _Browser(path)
            browser.start()
            _SHARED = browser
        return _SHARED


def close_browser() -> None:
    """Stop the shared browser (it starts again on the next export)."""
    global _SHARED
    with _LOCK:
        if _SHARED is not None:
            _SHARED.stop()
            _SHARED = None


atexit.register(close_browser)


def kaleido_ready() -> str | None:
    """None when PNG/SVG export works here (the shared browser is running), else one sentence saying why not."""
    try:
        _browser()
    except ExportError as e:
        return str(e)
    return None


def _fig_dict(fig: Any) -> dict[str, Any]:
    """A plotly figure (Figure, FigureWidget) or its dict, as a dict."""
    return fig.to_dict() if hasattr(fig, "to_dict") else dict(fig)


def to_image(fig: Any, fmt: str = "png", *, width: int | None = None, height: int | None = None,
             scale: float = 1.0) -> bytes:
    """PNG or SVG bytes of a plotly figure (its own size, else 700 x 500); ExportError when kaleido cannot run."""
    if fmt not in ("png", "svg"):
        raise ExportError(f"image format {fmt!r} is not one of png, svg")
    data = _fig_dict(fig)
    layout = data.get("layout", {})
    size = (width or layout.get("width") or DEFAULT_SIZE[0], height or layout.get("height") or DEFAULT_SIZE[1])
    try:
        return _browser().render(data, fmt, int(size[0]), int(size[1]), scale)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - a render that fails or hangs is one sentence
        close_browser()  # the next export starts a fresh browser
        raise ExportError(f"kaleido could not render the figure as {fmt.upper()} ({type(e).__name__}: "
                          f"{_first_sentence(e)})") from None


def export_path(path: str | Path, allowed: tuple[str, ...] = tuple(FORMATS)) -> Path:
    """`path` checked before any work: a known suffix, an existing folder, not a folder itself."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in allowed:
        raise ExportError(f"cannot export to {str(p)!r}: the file name must end in {', '.join(allowed)}")
    try:
        is_folder, parent_ok = p.is_dir(), p.parent.is_dir()
    except OSError as e:  # e.g. a name too long for the file system
        raise ExportError(f"cannot write {str(p)!r}: {e.strerror or e}") from None
    if is_folder:
        raise ExportError(f"cannot export to {str(p)!r}: it is a folder; give a file name")
    if not parent_ok:
        raise ExportError(f"cannot export to {str(p)!r}: folder {str(p.parent)!r} does not exist")
    return p


def write_bytes(path: Path, data: bytes) -> Path:
    """Write a file, turning an OS refusal into one sentence."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise ExportError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def export_figure(fig: Any, path: str | Path, *, width: int | None = None, height: int | None = None,
                  scale: float = 1.0) -> Path:
    """Write a plotly figure to `path`: .png / .svg through kaleido, .html self-contained (plotly.js inlined)."""
    p = export_path(path)
    fmt = FORMATS[p.suffix.lower()]
    if fmt == "html":
        import plotly.io as pio

        data = pio.to_html(_fig_dict(fig), include_plotlyjs=True, full_html=True, validate=False)
        return write_bytes(p, data.encode("utf-8"))
    return write_bytes(p, to_image(fig, fmt, width=width, height=height, scale=scale))


RENDERER = "workbench_png"
_told: list[str] = []  # the reason static images are off, said once per process


def _png_bundle(fig_dict: dict[str, Any]) -> dict[str, str]:
    """image/png of a figure for a notebook output, or nothing (saying why once) when kaleido cannot run."""
    if _told:
        return {}
    try:
        return {"image/png": base64.b64encode(to_image(fig_dict, "png")).decode("ascii")}
    except ExportError as e:
        _told.append(str(e))
        logger.warning("figures stay interactive only (no static image): %s", e)
        return {}


def static_images(enable: bool = True) -> str | None:
    """Make every `fig.show()` carry a PNG beside the interactive figure, so HTML exports of the notebook show it.

    Returns None when static images are on, else the one sentence saying why not (also logged, once).
    `enable=False` goes back to interactive output only.
    """
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer

    class PngAlongside(MimetypeRenderer):
        """plotly renderer: the figure as image/png (merged with the interactive bundle)."""

        def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
            return _png_bundle(fig_dict)

    interactive = "+".join(r for r in (pio.renderers.default or "").split("+") if r and r != RENDERER)
    if not enable:
        pio.renderers.default = interactive or "plotly_mimetype"
        return None
    problem = kaleido_ready()
    if problem:
        if not _told:
            _told.append(problem)
            logger.warning("figures stay interactive only (no static image): %s", problem)
        return problem
    _told.clear()
    pio.renderers[RENDERER] = PngAlongside()
    pio.renderers.default = f"{interactive or 'plotly_mimetype'}+{RENDERER}"
    return None
