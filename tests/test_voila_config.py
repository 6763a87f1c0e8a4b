"""The Voila settings `workbench dashboard` loads (workbench/serve/voila_config/voila.py), without a server."""

from __future__ import annotations

import runpy
from unittest import mock

import pytest

pytest.importorskip("tornado", reason="the app extra (voila) is not installed (pip install -e '.[dev]')")

import tornado.httputil  # noqa: E402
import tornado.web  # noqa: E402

from traitlets.config import Config  # noqa: E402

from workbench.serve.dashboard import VOILA_CONFIG, DashboardConfig, voila_command  # noqa: E402


def test_the_dashboard_loads_its_voila_config_which_gives_each_page_its_xsrf_cookie():
    assert f"--Voila.config_file_paths={VOILA_CONFIG}" in voila_command(DashboardConfig())
    c = Config()
    runpy.run_path(str(VOILA_CONFIG / "voila.py"), init_globals={"c": c})
    hook = c.VoilaConfiguration.prelaunch_hook
    assert c.VoilaExecutor.iopub_timeout >= 60  # the app's ~500 widget messages on a busy machine (not 4 s)

    app = tornado.web.Application(cookie_secret="test")
    start = tornado.httputil.RequestStartLine("GET", "/", "HTTP/1.1")
    request = tornado.httputil.HTTPServerRequest(start_line=start, connection=mock.Mock(),
                                                 headers=tornado.httputil.HTTPHeaders({"Host": "127.0.0.1"}))
    handler = tornado.web.RequestHandler(app, request)
    assert hook(handler, notebook=None, cwd=".") is None  # None: Voila keeps the notebook as it is
    assert "_xsrf" in handler._new_cookie  # sent with the page: its close request can carry it
