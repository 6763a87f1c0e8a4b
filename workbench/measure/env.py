"""Environment capture: versions, CPU, threads, GPU, driver, git commit."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

from workbench import __version__
from workbench.execution import cpuinfo_line
from workbench.result import EnvInfo


@functools.cache
def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux)."""
    return cpuinfo_line("model name") or platform.processor() or platform.machine()


@functools.cache
def git_commit() -> str | None:
    """The commit of the workbench checkout, when it runs from one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def _gpu(device: torch.device) -> tuple[str | None, str | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - NVML is optional
        driver = None
    return name, f"driver {driver}, CUDA {torch.version.cuda}" if driver else f"CUDA {torch.version.cuda}"


def capture(device: torch.device) -> EnvInfo:
    """What the run ran on."""
    import transformers

    gpu, driver = _gpu(device)
    return EnvInfo(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                   cpu=cpu_name(), threads=torch.get_num_threads(), gpu=gpu, driver=driver,
                   workbench_version=__version__, git_commit=git_commit(), platform=platform.platform())
