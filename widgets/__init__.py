"""The workbench app (ipywidgets + plotly) on top of the `workbench` core.

    from widgets import Workbench
    Workbench()          # last expression of a notebook cell: the whole app
"""

import workbench  # noqa: F401 - first: its deferred imports (workbench.deferred) must be in place before plotly's

from widgets.app import Workbench  # noqa: E402

__all__ = ["Workbench"]
