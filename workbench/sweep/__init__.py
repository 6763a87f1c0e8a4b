"""Sweeps: run a grid of configurations, store each run as it ends, resume without redoing stored runs.

`grid` reads and validates the grid (a YAML/JSON file and/or `--set`/`--axis` flags), `run` runs it,
`inline` runs one configuration in this process, `isolated` runs one in a fresh Python process.
"""

from workbench.sweep.grid import SweepSpec, cli_value, field_names, technique_specs
from workbench.sweep.inline import run_inline
from workbench.sweep.run import SweepEvent, SweepReport, run_sweep

__all__ = ["SweepSpec", "SweepEvent", "SweepReport", "run_sweep", "run_inline", "cli_value", "field_names",
           "technique_specs"]
