"""The teaching notebooks execute top to bottom and end with exercises; they are committed without outputs."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("nbformat", reason="the dev extra is not installed (pip install -e '.[dev]')")

import nbformat  # noqa: E402

from tools.artifacts import record  # noqa: E402
from workbench.verdict import LINE as VERDICT_LINE  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# The numbered teaching notebooks; the dashboard (notebooks/dashboard.ipynb) is tested with the widgets.
NOTEBOOKS = sorted(p for p in NOTEBOOKS_DIR.glob("0*.ipynb") if p.name != "dashboard.ipynb")
_IDS = [p.stem for p in NOTEBOOKS]
# Notebooks whose lesson is the CPU itself stay there even when a GPU is present; each says why in its introduction.
CPU_LESSONS = ("04_parallelism", "06_engines")
# Notebooks whose speed conclusions are computed (workbench.verdict) in code cells tagged "verdict"
VERDICT_NOTEBOOKS = ("01_latency", "02_quantization", "03_pruning", "05_distillation", "06_engines", "07_hardware",
                     "08_decoding")
# Notebooks whose setup cell calls widgets.figures.static_images(): executed, every figure carries a PNG too
STATIC_IMAGES = ("01_latency", "02_quantization", "03_pruning", "04_parallelism", "05_distillation", "06_engines",
                 "07_hardware", "08_decoding")


def _exercises_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The last cell when it is a markdown cell with an "Exercises" heading, else None."""
    last = nb.cells[-1] if nb.cells else None
    if last is None or last.cell_type != "markdown":
        return None
    return last if re.search(r"^#+\s*Exercises\b", last.source, flags=re.MULTILINE) else None


def _missing(nb: nbformat.NotebookNode) -> list[str]:
    """Modules the notebook's metadata says it needs (`workbench.requires`) that are not installed here."""
    return [m for m in nb.metadata.get("workbench", {}).get("requires", []) if importlib.util.find_spec(m) is None]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch) -> str:
    """A `python3` kernelspec that runs this interpreter, and the kernel's Jupyter/IPython files in tmp_path.

    The kernel inherits os.environ, so conftest's WORKBENCH_CACHE_DIR, HF_HUB_OFFLINE and
    TORCHINDUCTOR_CACHE_DIR (temporary, offline) apply to it as well, and under pytest-xdist its OMP_NUM_THREADS=1
    and OMP_WAIT_POLICY=PASSIVE (two busy OpenMP pools on two cores made a notebook several times slower).
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name="python3", display_name="Python 3 (workbench tests)", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))  # searched before user and env dirs
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl"),
                     ("HOME", "home")):  # chromium (static images of figures) writes under $HOME
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, f"the python3 kernel would run {spec.argv[0]}, not {sys.executable}"
    return "python3"


def test_a_notebook_is_skipped_only_for_the_modules_it_names():
    nb = nbformat.v4.new_notebook(metadata={"workbench": {"requires": ["json", "no_such_module_for_this_test"]}})
    assert _missing(nb) == ["no_such_module_for_this_test"]
    assert _missing(nbformat.v4.new_notebook()) == []


def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS][:3] == ["01_latency.ipynb", "02_quantization.ipynb", "03_pruning.ipynb"]
    assert "07_hardware.ipynb" in [p.name for p in NOTEBOOKS]


def _code(nb: nbformat.NotebookNode) -> list[ast.Module]:
    """Each code cell's source, parsed."""
    return [ast.parse(c.source) for c in nb.cells if c.cell_type == "code"]


def _device_literals(tree: ast.Module) -> list[str]:
    """String constants given as a device: `device="cpu"` keywords and `"device": "cpu"` dict entries."""
    found = [k.value.value for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords
             if k.arg == "device" and isinstance(k.value, ast.Constant)]
    found += [v.value for node in ast.walk(tree) if isinstance(node, ast.Dict) for k, v in zip(node.keys, node.values)
              if isinstance(k, ast.Constant) and k.value == "device" and isinstance(v, ast.Constant)]
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_IDS)
def test_runs_on_the_gpu_when_present(path: Path):
    """The setup cell sets DEVICE = "auto" (a CUDA GPU when present, else the CPU), or "cpu" where the lesson is the
    CPU and the introduction says so; no run names a device literally, past DEVICE (or a constant that says why)."""
    nb = nbformat.read(path, as_version=4)
    trees = _code(nb)
    device = next((node.value.value for node in trees[0].body if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "DEVICE" for t in node.targets)
                   and isinstance(node.value, ast.Constant)), None)
    if path.stem in CPU_LESSONS:
        assert device == "cpu", f"{path.name}: set DEVICE = \"cpu\" in the setup cell"
        assert "even when a GPU is present" in nb.cells[0].source, f"{path.name}: say why it stays on the CPU"
    else:
        assert device == "auto", f"{path.name}: set DEVICE = \"auto\" in the setup cell, got {device!r}"
    literals = [value for tree in trees for value in _device_literals(tree)]
    assert not literals, f"{path.name}: runs name the device {literals} literally; use DEVICE"


def d_cores() -> int:
    from workbench.parallel.distributed import cpu_cores

    return cpu_cores()


def test_parallelism_notebook_teaches_pipeline_parallelism():
    """04's pipeline section: the split, the bubble against GPipe's prediction as M grows (M < N refused), a plot,
    a computed conclusion, and its own exercises with expected answers."""
    nb = nbformat.read(NOTEBOOKS_DIR / "04_parallelism.ipynb", as_version=4)
    start = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## 6. Pipeline parallelism"))
    end = next(i for i, c in enumerate(nb.cells) if i > start and c.cell_type == "markdown" and "### Exercises" in c.source)
    code = "\n".join(c.source for c in nb.cells[start:end + 1] if c.cell_type == "code")
    for needle in ("pipeline_parallel=2", "micro_batches=m", "MICRO = (2, 4, 8)", "micro_batches=1",
                   "predicted_bubble", "measured_bubble", "fig.show()"):
        assert needle in code, f"04_parallelism.ipynb: the pipeline section lacks {needle!r}"
    tagged = [c for c in nb.cells[start:end] if "verdict" in c.metadata.get("tags", [])]
    assert tagged and "verdict_from_numbers" in tagged[0].source
    assert nb.cells[end].source.count("*Expected:*") >= 2


def test_distillation_notebook_compares_sync_and_async_updates():
    """05's last section: 2 data-parallel ranks, sync and async, with and without a straggler; loss against steps and
    wall time; a computed conclusion; its own exercises with expected answers (the notebook's last cell)."""
    nb = nbformat.read(NOTEBOOKS_DIR / "05_distillation.ipynb", as_version=4)
    start = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## 6. Synchronous vs asynchronous"))
    code = "\n".join(c.source for c in nb.cells[start:] if c.cell_type == "code")
    for needle in ('for mode in ("sync", "async")', "data_parallel=2", "straggler_ms=sleep_ms", "average_every=",
                   "p.wall_s", "s.wait_s", "fig.show()"):
        assert needle in code, f"05_distillation.ipynb: the sync/async section lacks {needle!r}"
    tagged = [c for c in nb.cells[start:] if "verdict" in c.metadata.get("tags", [])]
    assert tagged and "verdict_from_numbers" in tagged[0].source
    assert "Exercises" in nb.cells[-1].source and nb.cells[-1].source.count("*Expected:*") >= 4


def test_decoding_notebook_predicts_then_measures():
    """08: a distilled draft, the speed-up predicted from α and c then measured (K swept), the quantized KV cache at
    8/4/2 bits with its bytes and KL, the long-context crossing, computed conclusions and 4-6 exercises."""
    nb = nbformat.read(NOTEBOOKS_DIR / "08_decoding.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for needle in ("DistillConfig(", "draft_model=f\"student:{DRAFT}\"", "predicted_speedup(alpha, K, cost)",
                   "kv_cache=\"quantized\", kv_bits=b", "kv_bytes_per_token", "fig.show()"):
        assert needle in code, f"08_decoding.ipynb lacks {needle!r}"
    tagged = [c.source for c in nb.cells if "verdict" in c.metadata.get("tags", [])]
    assert len(tagged) == 2 and all("speed_verdict(" in t for t in tagged)
    assert nb.cells[-1].source.count("*Expected:*") >= 4


def test_quantization_notebook_compares_static_and_dynamic_fairly():
    """02's section 4 compares three activation schemes at the same bits (static per-tensor, dynamic per-tensor,
    dynamic per-token); its static int8 subsection measures static-int8 next to dynamic-int8 with a computed
    conclusion, and ends with its own exercises with expected answers."""
    nb = nbformat.read(NOTEBOOKS_DIR / "02_quantization.ipynb", as_version=4)
    start = next(i for i, c in enumerate(nb.cells) if "## 4. Activations: static vs dynamic, at the same" in c.source)
    end = next(i for i, c in enumerate(nb.cells) if i > start and "### Exercises: static vs dynamic" in c.source)
    code = "\n".join(c.source for c in nb.cells[start:end] if c.cell_type == "code")
    for needle in ("act_granularity=tensor", "act_granularity=token", "activations=static", "activations=dynamic",
                   '"static-int8', '"dynamic-int8"', "fig.show()"):
        assert needle in code, f"02_quantization.ipynb: the static vs dynamic sections lack {needle!r}"
    tagged = [c for c in nb.cells[start:end] if "verdict" in c.metadata.get("tags", [])]
    assert tagged and "speed_verdict" in tagged[0].source and "static-int8" in tagged[0].source
    assert nb.cells[end].source.count("*Expected:*") >= 3


def _tagged_cell(path: Path, tag: str) -> str:
    """The source of the one code cell carrying `tag`."""
    nb = nbformat.read(path, as_version=4)
    found = [c.source for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"{path.name}: {len(found)} cells tagged {tag!r}"
    return found[0]


def _static_images_possible() -> bool:
    """kaleido and a chromium are installed (without them, static_images() says why and figures stay interactive)."""
    from widgets.figures import _static_problem

    return _static_problem() is None


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in STATIC_IMAGES],
                         ids=[s for s in _IDS if s in STATIC_IMAGES])
def test_setup_cell_turns_on_static_images(path: Path):
    """The setup cell calls `figures.static_images()` (or `static_images()`), so executed figures carry a PNG."""
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(_code(nbformat.read(path, as_version=4))[0]) if isinstance(n, ast.Call)}
    assert "static_images" in calls, f"{path.name}: call figures.static_images() in the setup cell"


@pytest.mark.parametrize("present", [False, True], ids=["absent", "present"])
def test_hardware_notebook_shows_the_gpu_table_or_names_the_command(tmp_path, capsys, present):
    """07's last section shows docs/gpu-results.md as written, and without it names `python bench/gpu.py`."""
    from IPython.display import Markdown

    results = tmp_path / "gpu-results.md"
    table = "| configuration | decode tok/s |\n| --- | ---: |\n| bf16 eager | 73.9 |\n"
    if present:
        results.write_text(table)
    shown: list = []
    exec(_tagged_cell(NOTEBOOKS_DIR / "07_hardware.ipynb", "gpu-table"),  # noqa: S102 - the notebook's own cell
         {"GPU_RESULTS": results, "ON_GPU": False, "Markdown": Markdown, "display": shown.append})
    out = capsys.readouterr().out
    if present:
        assert [m.data for m in shown] == [table]
        assert "does not exist" not in out
    else:
        assert shown == []
        assert "does not exist yet" in out and "python bench/gpu.py" in out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_IDS)
def test_committed_clean(path: Path):
    """Saved without outputs (timings are never diffed), for the python3 kernel, ending with 4-6 exercises."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"
    cell = _exercises_cell(nb)
    assert cell is not None, f"{path.name} must end with a markdown cell headed 'Exercises'"
    tasks = re.findall(r"^\d+\.\s", cell.source, flags=re.MULTILINE)
    assert 4 <= len(tasks) <= 6, f"{path.name}: {len(tasks)} exercises; a teacher needs 4 to 6"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_IDS)
def test_notebook_executes(path: Path, kernel_env: str):
    """Every cell runs without error in a fresh kernel (on an in-memory copy: outputs are never written back)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if _missing(nb):  # e.g. 06 needs llama-cpp-python, which `LLAMACPP=skip bash dev.sh setup` leaves out
        pytest.skip(f"{path.name} needs {', '.join(_missing(nb))}, not installed here")
    client = NotebookClient(nb, timeout=600, kernel_name=kernel_env,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()
    record_cell_times(path.stem, nb)
    errors = [(i, out.get("ename"), out.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for out in c.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: cells raised {errors}"
    assert _exercises_cell(nb) is not None
    plots = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "application/vnd.plotly.v1+json" in o.get("data", {})]
    if path.stem in STATIC_IMAGES and _static_images_possible():  # so `nbconvert --to html` shows every figure
        assert all("image/png" in o["data"] for o in plots), f"{path.name}: a figure has no static image"
    if path.stem == "04_parallelism" and d_cores() >= 2:  # the pipeline section measured the bubble per M
        shown = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs)
        assert "measured bubble" in shown and "stage 1 busy s" in shown, f"{path.name}: no pipeline table"
    if path.stem == "05_distillation" and d_cores() >= 2:  # the sync/async section's per-rank account
        shown = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs)
        assert "waiting s" in shown and "identical weights" in shown, f"{path.name}: no per-rank table"
    if path.stem == "08_decoding":  # speculative decoding against its prediction; the quantized cache's bytes and KL
        shown = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs)
        for needle in ("measured speed-up", "draft acceptance", "share of unquantized", "KL vs unmodified"):
            assert needle in shown, f"{path.name}: no {needle!r} in its outputs"
    silent = [i for i, c in enumerate(nb.cells) if "verdict" in c.metadata.get("tags", [])
              and not VERDICT_LINE.search("".join(o.get("text", "") for o in c.outputs if o.output_type == "stream"))]
    assert not silent, f"{path.name}: cells {silent} are tagged 'verdict' but printed no verdict line"


def record_cell_times(name: str, nb: nbformat.NotebookNode) -> None:
    """Each executed notebook's time and its five slowest cells in test-artifacts/notebooks.json (what to trim
    when the suite outgrows its time budget)."""
    times = []
    for cell in nb.cells:
        stamps = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in stamps and "shell.execute_reply" in stamps:
            took = (datetime.fromisoformat(stamps["shell.execute_reply"].replace("Z", "+00:00"))
                    - datetime.fromisoformat(stamps["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
            times.append((round(took, 1), cell.get("id", ""), (cell.source.strip().splitlines() or [""])[0][:80]))
    record("notebooks.json", name, cells_s=round(sum(t for t, _, _ in times), 1),
           slowest=sorted(times, reverse=True)[:5])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_IDS)
def test_speed_conclusions_are_computed(path: Path):
    """Every cell tagged "verdict" prints workbench.verdict's line (ratio, CVs, warnings, contradiction); the notebooks
    that draw speed conclusions have such cells, and no hand-made `trust()` of their own."""
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "verdict" in c.metadata.get("tags", [])]
    assert all(c.cell_type == "code" for c in tagged), f"{path.name}: tag code cells 'verdict'"
    called = [{n.func.id for n in ast.walk(ast.parse(c.source)) if isinstance(n, ast.Call)
               and isinstance(n.func, ast.Name)} for c in tagged]
    assert all(names & {"speed_verdict", "verdict_from_numbers"} for names in called), \
        f"{path.name}: a cell tagged 'verdict' calls neither speed_verdict nor verdict_from_numbers"
    if path.stem in VERDICT_NOTEBOOKS:
        assert tagged, f"{path.name}: its speed conclusions must be printed by workbench.verdict in cells tagged 'verdict'"
        assert not any("def trust(" in c.source for c in nb.cells), f"{path.name}: use workbench.verdict, not trust()"
