"""The workbench app (ipywidgets + plotly) on top of the `workbench` core."""
