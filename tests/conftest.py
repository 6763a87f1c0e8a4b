"""Shared fixtures: an isolated cache/HOME, the shipped reference model, fast run settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="workbench-tests-"))
# Before anything imports torch/transformers: keep every cache and temp file inside the test folder.
os.environ["WORKBENCH_CACHE_DIR"] = str(_SESSION_TMP / "cache")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_SESSION_TMP / "inductor")
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
# The default results store (and the data folder it lives in) never the user's own.
os.environ["XDG_DATA_HOME"] = str(_SESSION_TMP / "data")
os.environ["WORKBENCH_STORE"] = str(_SESSION_TMP / "results.sqlite")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TMPDIR"] = str(_SESSION_TMP / "tmp")  # torchrun's ranks and their logs, compile workers
(_SESSION_TMP / "tmp").mkdir()
tempfile.tempdir = None  # re-read TMPDIR
# The probes of this machine that the controller took before starting the workers (pytest_configure below)
PROBE_FILES = ("bandwidth.json", "flops.json")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores. Every process a worker starts (CLI runs, torchrun ranks, sweep children, notebook
    # and Voila kernels) computes with one intra-op thread, like the workers themselves (below), and a run that asks
    # for more threads sleeps at OpenMP barriers instead of spinning there: next to a busy worker, a 2-thread decode
    # of preset:llama-124m made 2.3 tokens/s with spinning threads, 14.5 with sleeping ones, 27 alone.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _probed = Path(os.environ.get("WORKBENCH_TEST_PROBES") or _SESSION_TMP / "cache")  # the controller's folder
    (_SESSION_TMP / "cache").mkdir()
    for _name in PROBE_FILES:
        if (_probed / _name).is_file():
            shutil.copy(_probed / _name, _SESSION_TMP / "cache" / _name)

import torch  # noqa: E402

from workbench import logs, paths  # noqa: E402

logs.quiet_libraries()
# The processes tests start (the CLI, torchrun ranks, notebook kernels) import this checkout's code, installed or not
paths.share_import_path()
# One intra-op thread: on a shared 2-core machine two threads per process oversubscribe the cores and
# make the suite several times slower; results do not depend on it (timings are never asserted).
torch.set_num_threads(1)


def pytest_configure(config):
    """Under pytest-xdist, probe this machine's read bandwidth and matmul FLOP/s once, in the controller, before the
    workers start, and give every worker (and the kernels and CLI processes it starts) a copy of the probes.

    A probe is kept only when the machine was calm while it ran (workbench.measure.probes). With two workers the
    machine is never calm, so without this every run of the suite would probe again: about 5 s per run here."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return  # a worker, or one process (its first run probes, calmly)
    from workbench.measure.flops import probe_flops
    from workbench.measure.roofline import probe_bandwidth
    from workbench.paths import cache_dir

    cpu = torch.device("cpu")
    for threads in sorted({1, min(2, os.cpu_count() or 1)}):  # the workers' one thread; runs asking for two
        torch.set_num_threads(threads)
        probe_bandwidth(cpu)
        probe_flops(cpu, "fp32")
    torch.set_num_threads(1)
    os.environ["WORKBENCH_TEST_PROBES"] = str(cache_dir())


def pytest_unconfigure(config):
    """Remove this process's test folder (caches, GGUF files, compiled code, pytest's tmp_path folders under its
    TMPDIR): each worker and the controller made one, and every run of the suite used to leave them behind
    (64 folders, 17 GB in this machine's /tmp after a few days of runs)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# The heaviest tests: each executes a teaching notebook in its own kernel (minutes each).
NOTEBOOK_EXECUTIONS = "test_notebook_executes"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA (run them with `pytest -m gpu` on a GPU machine). Under pytest-xdist
    (`bash dev.sh test` runs `-n 2 --dist loadgroup --no-loadscope-reorder`) a module's tests stay on one worker,
    so its module-scoped fixtures are built once, while the notebook executions are scheduled one by one and
    first: the longest work starts at once instead of leaving one worker alone with it at the end."""
    import torch

    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            if item.originalname != NOTEBOOK_EXECUTIONS:
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        items.sort(key=lambda item: item.originalname != NOTEBOOK_EXECUTIONS)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tiny():
    """The shipped reference model, loaded once (fp32, CPU)."""
    import torch

    from workbench.models.loader import load_model
    from workbench.models.sources import resolve

    return load_model(resolve("tiny"), "fp32", torch.device("cpu"))


@pytest.fixture
def fast():
    """A RunConfig factory for quick runs on the reference model."""
    from workbench.config import RunConfig

    def make(**changes):
        base = dict(model="tiny", warmup=0, repeats=2, min_duration_s=0.0, max_new_tokens=6, eval_tokens=300,
                    eval_context=64)
        base.update(changes)
        return RunConfig(**base)

    return make


@pytest.fixture(scope="session")
def apply_technique():
    """Apply one technique spec to a CPU model in place, through its registered handler as the runner does:
    `notes = apply_technique("w4a8:lm_head=false", model)` returns the run's notes."""
    import torch

    from workbench.techniques import load_all, parse_spec
    from workbench.techniques.base import ApplyContext, handler_for

    load_all()

    def apply(spec: str, model, dtype: str = "fp32") -> list[str]:
        cfg = parse_spec(spec)
        ctx = ApplyContext(model, None, torch.device("cpu"), dtype, lambda message, fraction: None)
        handler_for(cfg)(cfg, ctx)
        return ctx.notes

    return apply


@pytest.fixture(scope="session")
def bench_script():
    """Import one of bench/'s scripts by file name (bench/ is not a package): `bench_script("engines")`."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "results.sqlite"
