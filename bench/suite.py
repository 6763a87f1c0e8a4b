"""The benchmark suite: fidelity, speed, accuracy-budget search, scale, workbench speed, memory, GPU.

    python bench/suite.py [--quick] [--sections fidelity speed ...] [--no-readme]

One command, one process, every comparison measured side by side in the same run (rounds
interleaved where it matters). Prints a table per section, writes bench/results/suite.json and
suite.md, draws docs/bench-scale.png (with Debian's chromium, when installed), and rewrites the
README's performance section (between the `bench:start` / `bench:end` markers) from these results,
with the machine they ran on. Targets are checked and reported as met or missed, with the margin.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from fidelity import compare  # noqa: E402
from techniques import runnable  # noqa: E402

from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.events import TokenEvent  # noqa: E402
from workbench.measure.env import cpu_name  # noqa: E402
from workbench.report import human_bytes  # noqa: E402
from workbench.measure.accuracy import decode_looks_wrong  # noqa: E402
from workbench.runner import run  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SPEED_MODEL = "preset:llama-124m"
MiB = 2**20

# (label, dtype, techniques, execution settings): every CPU configuration the workbench offers
SPEED_CONFIGS: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = [
    ("fp32 eager (HF baseline)", "fp32", (), {}),
    ("bf16", "bf16", (), {}),
    ("fp32 + torch.compile", "fp32", (), {"kv_cache": "static", "compile": True}),
    ("bf16 + torch.compile", "bf16", (), {"kv_cache": "static", "compile": True}),
    ("dynamic-int8", "fp32", ("dynamic-int8",), {}),
    ("dynamic-int8 + int8 head", "fp32", ("dynamic-int8:lm_head=true",), {}),
    ("bnb-int8", "fp32", ("bnb-int8",), {}),
    ("bnb-nf4", "fp32", ("bnb-nf4",), {}),
    ("torchao-int8-weight", "fp32", ("torchao-int8-weight",), {}),
    ("torchao-int8-weight + torch.compile", "fp32", ("torchao-int8-weight",), {"kv_cache": "static", "compile": True}),
    ("w8a8", "fp32", ("w8a8",), {}),
    ("w8a8 + torch.compile", "fp32", ("w8a8",), {"kv_cache": "static", "compile": True}),
    ("w4a16", "fp32", ("w4a16",), {}),
    ("w4a16 + torch.compile", "fp32", ("w4a16",), {"kv_cache": "static", "compile": True}),
    ("structured MLP 1/2 + dynamic-int8 + int8 head", "fp32",
     ("structured:mlp_ratio=0.5", "dynamic-int8:lm_head=true"), {}),
    ("structured heads 1/2, MLP 1/2 + dynamic-int8 + int8 head", "fp32",
     ("structured:heads_ratio=0.5,mlp_ratio=0.5", "dynamic-int8:lm_head=true"), {}),
    ("structured heads 1/2, MLP 1/2 + w4a16 + torch.compile", "fp32",
     ("structured:heads_ratio=0.5,mlp_ratio=0.5", "w4a16"), {"kv_cache": "static", "compile": True}),
]

TARGETS = {"fidelity_within": 0.05, "events_overhead_max": 0.02, "best_speedup_min": 5.0, "best_roofline_min": 0.40,
           "memory_ratio_max": 1.3, "sweep_16_max_s": 60.0, "first_token_max_s": 1.0}


def _run(**kwargs: Any) -> Any:
    """One run with quiet, fast measurement defaults (overridable)."""
    base = {"device": "cpu", "warmup": 1, "repeats": 3, "min_duration_s": 0.0, "eval_tokens": 0, "token_events": False}
    return run(RunConfig(**{**base, **kwargs}))


# ------------------------------------------------------------------------------------------- sections
def fidelity(quick: bool) -> dict[str, Any]:
    """Workbench vs an independent plain loop; per-token events on vs off (interleaved rounds)."""
    rows = [compare(m, 32, 2 if quick else 3, 5) for m in ("tiny", SPEED_MODEL)]
    on, off = [], []
    for _ in range(3 if quick else 5):
        for events, bucket in ((True, on), (False, off)):
            bucket.append(_run(model="tiny", max_new_tokens=64, repeats=5, token_events=events)
                          .latency.decode_tokens_per_s)
    overhead = 1 - statistics.median(on) / statistics.median(off)
    return {"rows": rows, "events_on_tokens_per_s": statistics.median(on),
            "events_off_tokens_per_s": statistics.median(off), "events_overhead": overhead}


def speed(quick: bool) -> dict[str, Any]:
    """Every CPU configuration on the 124M preset vs fp32 eager, with the fraction of the roofline reached."""
    configs = [c for c in SPEED_CONFIGS if runnable(c[2])]
    rates: dict[str, list[float]] = {c[0]: [] for c in configs}
    info: dict[str, dict[str, Any]] = {}
    for _ in range(1 if quick else 2):
        for label, dtype, specs, execution in configs:
            try:
                r = _run(model=SPEED_MODEL, dtype=dtype, techniques=specs, max_new_tokens=32, **execution)
            except WorkbenchError as e:
                print(f"  {label}: {e}", file=sys.stderr)
                continue
            rates[label].append(r.latency.decode_tokens_per_s)
            info[label] = {"weights_bytes": r.memory.weights_bytes, "bytes_per_token": r.roofline.bytes_per_token,
                           "bound_tokens_per_s": r.roofline.decode_bound_tokens_per_s,
                           "cold_start_s": r.latency.cold_start_s, "techniques": list(specs), "dtype": dtype,
                           "execution": execution, "decode_sound": not decode_looks_wrong(r.warnings)}
            print(f"  {label}: {r.latency.decode_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    base = statistics.median(rates[configs[0][0]])
    rows = []
    for label, values in rates.items():
        if values:
            rate = statistics.median(values)
            bound = info[label]["bound_tokens_per_s"]
            rows.append({"config": label, "decode_tokens_per_s": rate, "speedup": rate / base,
                         "fraction_of_roofline": rate / bound if bound else None, **info[label]})
    # a configuration whose decoded tokens disagree with its own forward pass is fast at being wrong: never "best"
    best = max((r for r in rows if r["decode_sound"]), key=lambda r: r["speedup"])
    return {"model": SPEED_MODEL, "rows": rows, "best": best}


def budget_search(speed_rows: list[dict[str, Any]], budget: float = 0.05) -> dict[str, Any]:
    """The fastest configuration whose perplexity on `tiny` (real weights) is within `budget` of fp32's."""
    rows = []
    for row in speed_rows:
        warmup = 1 if row["execution"].get("compile") else 0  # a compiled model compiles in its warm-up
        try:
            r = _run(model="tiny", dtype=row["dtype"], techniques=tuple(row["techniques"]), max_new_tokens=8,
                     warmup=warmup, repeats=1, eval_tokens=4096, eval_context=256, **row["execution"])
        except WorkbenchError as e:
            print(f"  {row['config']}: {e}", file=sys.stderr)
            continue
        rows.append({"config": row["config"], "perplexity": r.accuracy.perplexity,
                     "kl_vs_baseline": r.accuracy.kl_vs_baseline, "speedup_124m": row["speedup"],
                     "decode_sound": row["decode_sound"] and not decode_looks_wrong(r.warnings)})
        print(f"  {row['config']}: perplexity {r.accuracy.perplexity:.2f}", file=sys.stderr, flush=True)
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_increase"] = r["perplexity"] / base - 1
        r["within_budget"] = r["perplexity_increase"] <= budget and r["decode_sound"]
    winner = max((r for r in rows if r["within_budget"]), key=lambda r: r["speedup_124m"])
    return {"budget": budget, "rows": rows, "winner": winner}


def scale(quick: bool) -> dict[str, Any]:
    """Prefill and decode cost as the prompt, the output and the batch grow (fp32, 124M preset)."""
    prompts = [16, 128, 512] if quick else [16, 64, 256, 1024]
    outputs = [16, 64, 256] if quick else [16, 64, 256, 512]
    batches = [1, 4, 16] if quick else [1, 4, 16, 64]
    prompt_rows = [_lat(_run(model=SPEED_MODEL, prompt_tokens=n, max_new_tokens=8), prompt_tokens=n) for n in prompts]
    output_rows = [_lat(_run(model=SPEED_MODEL, prompt_tokens=16, max_new_tokens=n, repeats=2), new_tokens=n)
                   for n in outputs]
    batch_rows = [_lat(_run(model=SPEED_MODEL, batch_size=b, max_new_tokens=16), batch=b) for b in batches]
    return {"model": SPEED_MODEL, "prompt": prompt_rows, "output": output_rows, "batch": batch_rows}


def _lat(r: Any, **key: Any) -> dict[str, Any]:
    lat = r.latency
    return {**key, "ttft_ms": lat.ttft_ms.p50, "tpot_ms": lat.tpot_ms.p50 if lat.tpot_ms else None,
            "prefill_tokens_per_s": lat.prefill_tokens_per_s, "decode_tokens_per_s": lat.decode_tokens_per_s,
            "per_sequence_tokens_per_s": lat.decode_tokens_per_s_per_sequence, "kv_cache_bytes": r.memory.kv_cache_bytes}


def workbench_speed(quick: bool) -> dict[str, Any]:
    """A 16-configuration sweep on `tiny`; the time from calling run() to its first token event."""
    from workbench.store import Store
    from workbench.sweep import SweepSpec, run_sweep

    techniques = ["none", "sim:bits=8", "sim:bits=4", "sim:bits=4,granularity=per-group", "magnitude:sparsity=0.5",
                  "wanda:sparsity=0.5", "2:4", "structured:mlp_ratio=0.25"]
    spec = SweepSpec(base={"model": "tiny", "threads": 1}, axes=(("dtype", ("fp32", "bf16")),
                                                                  ("techniques", tuple(techniques))))
    with tempfile.TemporaryDirectory() as folder:
        report = run_sweep(spec, Store(Path(folder) / "sweep.sqlite"))
    firsts = [_first_token_s() for _ in range(3 if quick else 5)]
    return {"sweep_configs": report.total, "sweep_s": report.elapsed_s, "sweep_failed": report.failed,
            "first_token_s": statistics.median(firsts), "first_token_all_s": firsts}


def _first_token_s() -> float:
    """Seconds from run() to the first token event on `tiny` with the app's default settings."""
    first: list[float] = []
    t0 = time.perf_counter()
    run(RunConfig(model="tiny", device="cpu", max_new_tokens=8, repeats=1, min_duration_s=0.0),
        on_event=lambda e: first.append(time.perf_counter() - t0) if isinstance(e, TokenEvent) and not first else None)
    return first[0]


def memory(quick: bool) -> dict[str, Any]:
    """Peak host memory of a batch-1 run against weights + KV cache + the idle process.

    Each run happens in a fresh `workbench run` process: in this long-lived one, the allocator keeps memory
    from earlier runs, which would inflate "idle" and hide what a run really adds.
    """
    import subprocess

    rows = []
    for model in ("tiny", SPEED_MODEL):
        out = subprocess.run([sys.executable, "-m", "workbench", "run", "--model", model, "--device", "cpu",
                              "--max-new-tokens", "32", "--warmup", "1", "--repeats", "3", "--min-duration-s", "0",
                              "--eval-tokens", "0", "--no-token-events", "--no-store", "--json"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        m = json.loads(out.stdout)["memory"]
        floor = m["weights_bytes"] + m["kv_cache_bytes"] + m["idle_host_bytes"]
        peak = max(m["peak_host_bytes"], m["load_peak_host_bytes"])
        rows.append({"model": model, **{k: m[k] for k in ("peak_host_bytes", "load_peak_host_bytes", "weights_bytes",
                                                          "kv_cache_bytes", "idle_host_bytes")}, "ratio": peak / floor})
    return {"rows": rows}


def gpu(quick: bool) -> dict[str, Any]:
    """fp16 vs fp32 (and int4/2:4 where available) on CUDA; skipped without one."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    rows = []
    for label, dtype, specs in (("fp32", "fp32", ()), ("fp16", "fp16", ()), ("bnb-nf4", "fp16", ("bnb-nf4",)),
                                ("torchao-int4-weight", "bf16", ("torchao-int4-weight",))):
        try:
            r = _run(model=SPEED_MODEL, device="cuda", dtype=dtype, techniques=specs, max_new_tokens=64)
        except WorkbenchError as e:
            rows.append({"config": label, "error": str(e)})
            continue
        rows.append({"config": label, "decode_tokens_per_s": r.latency.decode_tokens_per_s,
                     "ttft_ms": r.latency.ttft_ms.p50, "peak_gpu_allocated_bytes": r.memory.peak_gpu_allocated_bytes,
                     "fraction_of_roofline": r.roofline.fraction_of_bound})
    return {"device": torch.cuda.get_device_name(0), "rows": rows}


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "fidelity": fidelity, "speed": speed, "scale": scale, "workbench": workbench_speed, "memory": memory, "gpu": gpu}


# ------------------------------------------------------------------------------------------- targets
def check_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met."""
    t, out = TARGETS, []

    def add(name: str, value: float | None, goal: str, met: bool, unit: str = "") -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": met, "unit": unit})

    if "fidelity" in res:
        for row in res["fidelity"]["rows"]:
            for key in ("decode_ratio", "ttft_ratio"):
                add(f"fidelity: {key.split('_')[0]} workbench / plain loop ({row['model']})", row[key],
                    f"1 ± {t['fidelity_within']}",
                    abs(row[key] - 1) <= t["fidelity_within"], "ratio")
        ov = res["fidelity"]["events_overhead"]
        add("per-token events: cost in decode tokens/s", ov, f"≤ {t['events_overhead_max']}",
            ov <= t["events_overhead_max"], "fraction")
    if "speed" in res:
        best = res["speed"]["best"]
        add(f"best speed-up vs fp32 eager ({best['config']})", best["speedup"], f"≥ {t['best_speedup_min']}",
            best["speedup"] >= t["best_speedup_min"], "x")
        frac = best["fraction_of_roofline"]
        add("its fraction of the roofline", frac, f"≥ {t['best_roofline_min']}",
            bool(frac and frac >= t["best_roofline_min"]), "fraction")
    if "memory" in res:
        for row in res["memory"]["rows"]:
            add(f"peak host / (weights + KV + idle) ({row['model']})", row["ratio"], f"≤ {t['memory_ratio_max']}",
                row["ratio"] <= t["memory_ratio_max"], "x")
    if "workbench" in res:
        w = res["workbench"]
        add("16-configuration sweep on tiny", w["sweep_s"], f"≤ {t['sweep_16_max_s']:g}", w["sweep_s"] <= t["sweep_16_max_s"],
            "s")
        add("run() to first token event on tiny", w["first_token_s"], f"≤ {t['first_token_max_s']:g}",
            w["first_token_s"] <= t["first_token_max_s"], "s")
    return out


# ------------------------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _label(row: dict[str, Any]) -> str:
    """A row's configuration, marked when its decoded tokens disagreed with its own forward pass."""
    return row["config"] + ("" if row.get("decode_sound", True) else " (**decode wrong**: output not trusted)")


def markdown(res: dict[str, Any]) -> str:
    """The README's performance section."""
    m = res["machine"]
    out = [f"Measured by `python bench/suite.py` on {m['cpu']} ({m['threads']} threads), {m['platform']}, torch "
           f"{m['torch']}, {m['date']}; the whole suite took {res['wall_s'] / 60:.1f} min.", ""]
    out += ["| target | measured | goal | |", "| --- | ---: | ---: | --- |"]
    for t in res["targets"]:
        out.append(f"| {t['target']} | {_f(t['measured'], '.3f')} {t['unit']} | {t['goal']} {t['unit']} | "
                   f"{'met' if t['met'] else '**missed**'} |")
    if "speed" in res:
        out += ["", f"Speed on `{res['speed']['model']}` (batch 1, 32 new tokens):", "",
                "| configuration | decode tok/s | vs fp32 eager | of roofline | bytes/token | weights | first call s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {_label(r)} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                f"{_f(r['fraction_of_roofline'] and 100 * r['fraction_of_roofline'], '.0f')} % | "
                f"{human_bytes(r['bytes_per_token'])} | {human_bytes(r['weights_bytes'])} | {_f(r['cold_start_s'])} |"
                for r in res["speed"]["rows"]]
    if "search" in res:
        s = res["search"]
        out += ["", f"Fastest configuration within a {s['budget']:.0%} perplexity budget on `tiny`: "
                f"**{s['winner']['config']}** ({s['winner']['speedup_124m']:.2f}x on the 124M preset, perplexity "
                f"+{100 * s['winner']['perplexity_increase']:.1f} %).", "",
                "| configuration | perplexity (tiny) | increase | KL vs fp32 | within budget |",
                "| --- | ---: | ---: | ---: | --- |"]
        out += [f"| {_label(r)} | {r['perplexity']:.2f} | {100 * r['perplexity_increase']:+.1f} % | "
                f"{_f(r['kl_vs_baseline'], '.4f')} | {'yes' if r['within_budget'] else 'no'} |" for r in s["rows"]]
    if "scale" in res:
        sc = res["scale"]
        out += ["", "Scale (fp32, 124M preset; plot: `docs/bench-scale.png`):", "",
                "| prompt tokens | TTFT ms | prefill tok/s |", "| ---: | ---: | ---: |"]
        out += [f"| {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {_f(r['prefill_tokens_per_s'], '.0f')} |"
                for r in sc["prompt"]]
        out += ["", "| new tokens | TPOT ms | decode tok/s |", "| ---: | ---: | ---: |"]
        out += [f"| {r['new_tokens']} | {_f(r['tpot_ms'])} | {_f(r['decode_tokens_per_s'])} |" for r in sc["output"]]
        out += ["", "| batch | aggregate tok/s | per sequence tok/s | TPOT ms |", "| ---: | ---: | ---: | ---: |"]
        out += [f"| {r['batch']} | {_f(r['decode_tokens_per_s'])} | {_f(r['per_sequence_tokens_per_s'])} | "
                f"{_f(r['tpot_ms'])} |" for r in sc["batch"]]
    if "gpu" in res:
        g = res["gpu"]
        out += ["", "GPU: " + (g["skipped"] + "; the section runs where CUDA is present" if "skipped" in g
                               else g["device"] + ": " + "; ".join(
                                   f"{r['config']} {_f(r.get('decode_tokens_per_s'))} tok/s" for r in g["rows"]))]
    return "\n".join(out) + "\n"


def scale_plot(sc: dict[str, Any], path: Path) -> str:
    """Three panels as a PNG, drawn by plotly in the system chromium; returns what happened."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("TTFT vs prompt tokens", "TPOT vs new tokens",
                                                        "decode tok/s vs batch"))
    fig.add_trace(go.Scatter(x=[r["prompt_tokens"] for r in sc["prompt"]], y=[r["ttft_ms"] for r in sc["prompt"]],
                             mode="lines+markers", name="TTFT ms"), 1, 1)
    fig.add_trace(go.Scatter(x=[r["new_tokens"] for r in sc["output"]], y=[r["tpot_ms"] for r in sc["output"]],
                             mode="lines+markers", name="TPOT ms"), 1, 2)
    for key, name in (("decode_tokens_per_s", "aggregate"), ("per_sequence_tokens_per_s", "per sequence")):
        fig.add_trace(go.Scatter(x=[r["batch"] for r in sc["batch"]], y=[r[key] for r in sc["batch"]],
                                 mode="lines+markers", name=name), 1, 3)
    for col, (x, y) in enumerate((("prompt tokens", "ms"), ("new tokens", "ms"), ("batch", "tokens/s")), start=1):
        fig.update_xaxes(type="log", title_text=x, row=1, col=col)
        fig.update_yaxes(title_text=y, rangemode="tozero", row=1, col=col)
    fig.update_layout(title=f"Scale on {sc['model']} (fp32, CPU)", width=1200, height=420, template="plotly_white")
    try:
        from tools.browser import browser

        with tempfile.TemporaryDirectory() as folder, browser() as b:
            html = Path(folder) / "scale.html"
            fig.write_html(html, include_plotlyjs=True)
            page = b.new_page(viewport={"width": 1220, "height": 440})
            page.goto(html.as_uri())
            page.wait_for_selector(".main-svg")
            page.screenshot(path=str(path))
        return f"wrote {path}"
    except Exception as e:  # noqa: BLE001 - the plot is optional; the numbers are in the JSON
        return f"no plot ({e})"


def update_readme(section: str) -> bool:
    """Replace the README text between the bench markers; False when the markers are missing."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + section + end + rest.split(end, 1)[1])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=[*SECTIONS, "search"], default=[*SECTIONS, "search"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and points (a smoke test)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's performance section")
    args = parser.parse_args()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                       "platform": platform.platform(terse=True), "date": time.strftime("%Y-%m-%d")}}
    for name in (s for s in SECTIONS if s in args.sections):
        print(f"== {name}", file=sys.stderr, flush=True)
        res[name] = SECTIONS[name](args.quick)
        if name == "speed" and "search" in args.sections:
            print("== search", file=sys.stderr, flush=True)
            res["search"] = budget_search(res["speed"]["rows"])
        RESULTS.mkdir(parents=True, exist_ok=True)  # what was measured survives a later failure
        (RESULTS / "suite.partial.json").write_text(json.dumps(res, indent=1, default=str))
    if "scale" in res:
        res["scale_plot"] = scale_plot(res["scale"], ROOT / "docs" / "bench-scale.png")
    res["wall_s"] = time.perf_counter() - t0
    res["targets"] = check_targets(res)
    text = markdown(res)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "suite.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / "suite.md").write_text(text)
    (RESULTS / "suite.partial.json").unlink(missing_ok=True)
    if not args.no_readme and not args.quick and not update_readme(text):
        print("README.md has no bench:start / bench:end markers; not updated", file=sys.stderr)


if __name__ == "__main__":
    main()
