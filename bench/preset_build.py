"""How long a preset's seeded random weights take to build: `from_config` on the device (torch's default init of
every layer, then transformers' init draws every weight again) against `build_preset` (built on the meta device,
every weight drawn once by transformers' init), rounds alternating in one process, the median of each.

    python bench/preset_build.py [--presets llama-124m,llama-3.2-1b] [--dtype fp32] [--device cpu] [--rounds 3]
                                 [--markdown bench/results/preset_build.md]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

import torch  # noqa: E402

from workbench.measure.env import cpu_name  # noqa: E402
from workbench.models.preset_weights import build_preset  # noqa: E402
from workbench.models.sources import TORCH_DTYPES, load_config, resolve  # noqa: E402


def from_config(source, dtype: str, seed: int, device: str) -> torch.nn.Module:
    """The build before `build_preset`: the whole model made on the device, every layer initialised twice."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(load_config(source), dtype=TORCH_DTYPES[dtype])


def timed(build, source, dtype: str, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model = build(source, dtype, 0, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    return seconds


def measure(preset: str, dtype: str, device: str, rounds: int) -> dict:
    """Median seconds of each build over `rounds` alternating rounds (the first round of each untimed)."""
    source = resolve(f"preset:{preset}")
    times: dict[str, list[float]] = {"from_config": [], "build_preset": []}
    for round_ in range(rounds + 1):
        for name, build in (("from_config", from_config), ("build_preset", build_preset)):
            seconds = timed(build, source, dtype, device)
            if round_:
                times[name].append(seconds)
    old, new = (statistics.median(times[k]) for k in ("from_config", "build_preset"))
    return {"preset": preset, "from_config_s": old, "build_preset_s": new, "speedup": old / new, "times": times}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{cpu_name()} ({torch.get_num_threads()} threads)")
    lines = [f"Measured by `python bench/preset_build.py --presets {args.presets} --dtype {args.dtype} "
             f"--device {args.device} --rounds {args.rounds}` on {machine}, torch {torch.__version__}; "
             f"medians of {args.rounds} alternating rounds after one untimed round of each.", "",
             "| preset | `from_config` (init twice) | `build_preset` (init once) | speed-up |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| `preset:{r['preset']}` | {r['from_config_s']:.2f} s | {r['build_preset_s']:.2f} s | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="llama-124m,llama-3.2-1b")
    p.add_argument("--dtype", default="fp32", choices=sorted(TORCH_DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    rows = []
    for preset in args.presets.split(","):
        rows.append(measure(preset, args.dtype, args.device, args.rounds))
        r = rows[-1]
        print(f"preset:{preset}: from_config {r['from_config_s']:.2f} s, build_preset {r['build_preset_s']:.2f} s "
              f"({r['speedup']:.2f}x)", flush=True)
    text = table(rows, args)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
