"""`workbench dashboard` without a browser: settings, the Voila command line, the notebook it serves."""

from __future__ import annotations

import json

import pytest

from workbench.serve.dashboard import (NOTEBOOK, DashboardConfig, dashboard_notebook, default_threads, environment,
                                 local_url, voila_command)
from workbench.errors import ConfigError


def test_the_committed_notebook_is_exactly_the_app_cell():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["cells"] == dashboard_notebook()["cells"]
    assert [c["cell_type"] for c in nb["cells"]] == ["code"]  # nothing else visible in Voila
    assert not nb["cells"][0]["outputs"]


def test_binds_localhost_and_culls_idle_kernels_by_default():
    cmd = voila_command(DashboardConfig())
    assert "--Voila.ip=127.0.0.1" in cmd and "--port=8866" in cmd and "--no-browser" in cmd
    assert "--MappingKernelManager.cull_idle_timeout=900" in cmd
    assert "--VoilaConfiguration.show_tracebacks=False" in cmd
    assert not any("cull" in c for c in voila_command(DashboardConfig(cull_idle_s=0)))
    assert local_url(DashboardConfig(ip="0.0.0.0", port=9000, base_url="/wb/")) == "http://127.0.0.1:9000/wb/"


@pytest.mark.parametrize("changes, fragment", [
    ({"port": 0}, "port must be in 1..65535"),
    ({"base_url": "wb"}, "base_url must start and end with '/'"),
    ({"cull_idle_s": -1}, "cull_idle_s must be in 0.."),
])
def test_bad_settings(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        DashboardConfig(**changes)


def test_environment_carries_the_store_and_starting_values(tmp_path):
    env = environment(DashboardConfig(store=str(tmp_path / "s.sqlite")), {"max_new_tokens": 64})
    assert env["WORKBENCH_STORE"] == str(tmp_path / "s.sqlite")
    assert json.loads(env["WORKBENCH_DEFAULTS"]) == {"threads": default_threads(), "max_new_tokens": 64}
    with pytest.raises(ConfigError, match="not run settings: colour"):
        environment(DashboardConfig(), {"colour": "blue"})


def test_cli_refuses_bad_values(capsys):
    from workbench.cli import main

    assert main(["dashboard", "--set", "max_new_tokens=0"]) == 2
    assert "max_new_tokens must be in 1.." in capsys.readouterr().err
    assert main(["dashboard", "--set", "oops"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
