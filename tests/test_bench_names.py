"""bench/'s scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path: a script named like an
installed module hides it from every library. `bench/kernels.py` did: transformers 5.25 imports the `kernels`
package (its hub kernels) while loading any model, found the script instead, and every benchmark failed."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_no_bench_script_shadows_an_importable_module():
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "suite" in names and "generate_loop" in names
    # bench/ itself left out: loading bench/suite.py or bench/gpu.py in this process puts it on sys.path
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    shadowed = [n for n in names if n in sys.stdlib_module_names
                or importlib.machinery.PathFinder.find_spec(n, elsewhere) is not None]
    assert shadowed == [], f"bench scripts named like importable modules: {shadowed}; rename them"
