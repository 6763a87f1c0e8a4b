"""The workbench app (ipywidgets + plotly) on top of the `workbench` core.

    from widgets import Workbench
    Workbench()          # last expression of a notebook cell: the whole app
"""

from widgets.app import Workbench

__all__ = ["Workbench"]
