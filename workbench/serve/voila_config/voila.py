"""Voila settings of `workbench dashboard` (loaded through `--Voila.config_file_paths`; `c` is Voila's config).

The page's `_xsrf` cookie:

Closing a page makes Voila's front end POST /voila/api/shutdown/<kernel> with the form field `_xsrf` copied
from the `_xsrf` cookie, but Voila 0.5's page never sets that cookie: the POST was refused ("'_xsrf' argument
missing from POST", 403, voila-dashboards/voila#1458) and the closed page's kernel kept running until culled.
Reading `xsrf_token` before the page is sent makes tornado set the cookie, so the shutdown is accepted (and
still checked: a POST without the page's cookie is refused as before).
"""


def set_xsrf_cookie(handler, notebook=None, cwd=None):  # noqa: ARG001 - Voila's prelaunch hook signature
    """Voila's prelaunch hook: give the page its `_xsrf` cookie (tornado sets it on first read)."""
    handler.xsrf_token  # noqa: B018 - reading it sets the cookie


c.VoilaConfiguration.prelaunch_hook = set_xsrf_cookie  # noqa: F821 - `c` is defined by traitlets

# After the notebook's cell replies, Voila waits at most `iopub_timeout` for the rest of its output and then drops
# it. The app's cell opens some 500 widget models; with four pages starting their kernels at once on a 2-core machine,
# draining those messages took longer than nbclient's default 4 s, and the page came up without the app
# ("Timeout waiting for IOPub output" in the log). The wait ends as soon as the kernel is idle, so a long limit
# costs nothing when the machine is not busy.
c.VoilaExecutor.iopub_timeout = 60  # noqa: F821
