"""The teaching notebooks execute top to bottom and end with exercises; they are committed without outputs."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# The numbered teaching notebooks; the dashboard (notebooks/dashboard.ipynb) is tested with the widgets.
NOTEBOOKS = sorted(p for p in NOTEBOOKS_DIR.glob("0*.ipynb") if p.name != "dashboard.ipynb")
_IDS = [p.stem for p in NOTEBOOKS]
# Notebooks whose lesson is the CPU itself stay there even when a GPU is present; each says why in its introduction.
CPU_LESSONS = ("04_parallelism", "06_engines")


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
    TORCHINDUCTOR_CACHE_DIR (temporary, offline) apply to it as well.
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name="python3", display_name="Python 3 (workbench tests)", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))  # searched before user and env dirs
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl")):
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


def _tagged_cell(path: Path, tag: str) -> str:
    """The source of the one code cell carrying `tag`."""
    nb = nbformat.read(path, as_version=4)
    found = [c.source for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"{path.name}: {len(found)} cells tagged {tag!r}"
    return found[0]


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
    errors = [(i, out.get("ename"), out.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for out in c.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: cells raised {errors}"
    assert _exercises_cell(nb) is not None
