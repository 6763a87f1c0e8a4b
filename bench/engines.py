"""llama.cpp against PyTorch on the same model: decode speed and the roofline on a 124M shape, accuracy on `tiny`.

Speed: every GGUF type (F32 / F16 / BF16 exports, then llama.cpp's quantizer) and PyTorch fp32 eager and its
best CPU configuration, decode tokens/s on `preset:llama-124m` at batch 1, each with its fraction of the
roofline; rounds interleaved in one process. In the same rounds a plain llama-cpp-python loop times the same
GGUF files (fidelity: (t(N) - t(1)) / (N - 1), as bench/fidelity.py) and llama.cpp's own llama-bench times the
Q8_0 file (tg128). Accuracy: perplexity and KL against the same fp32 baseline on `tiny` (real weights).
The targets of issue 14 are printed as met / missed with their numbers. Accuracy runs first; the JSON and
markdown files are rewritten after every round (an interrupted run keeps its finished rounds), with the load
average at the start of each round (a busy machine slows every row of that round alike).

    python bench/engines.py [--rounds 3] [--new-tokens 128] [--threads 2] [--repeats 3] [--eval-tokens 4096]
                            [--json bench/results/engines.json] [--markdown bench/results/engines.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.measure.accuracy import decode_looks_wrong  # noqa: E402
from workbench.measure.env import cpu_name  # noqa: E402
from workbench.measure.roofline import probe_bandwidth  # noqa: E402
from workbench.report import human_bytes  # noqa: E402
from workbench.runner import run  # noqa: E402
from workbench.techniques.gguf import GGUF_TYPES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SPEED_MODEL = "preset:llama-124m"
BASELINE = "PyTorch fp32 eager"
NOT_BUILT = "not built: run `bash dev.sh llama-bench`"
TARGETS = {"f32_perplexity_within": 0.005, "f32_kl_max": 0.001, "q8_kl_max": 0.01, "fidelity_within": 0.10,
           "llama_bench_within": 0.10, "perplexity_budget": 0.05, "speedup_min": 3.0, "roofline_max": 1.0}


class Config(NamedTuple):
    """One configuration: a label, the engine, the dtype and the technique specs."""

    label: str
    engine: str
    dtype: str
    techniques: tuple[str, ...] = ()
    execution: tuple[tuple[str, Any], ...] = ()  # RunConfig settings such as compile and the KV cache

    def accuracy_warmup(self) -> int:
        """Untimed calls before an accuracy run: none, but one where the run compiles (it compiles in its warm-up)."""
        return 1 if dict(self.execution).get("compile") else 0

    def run_config(self, model: str, threads: int, **measure: Any) -> RunConfig:
        """This configuration on `model`, measured on the CPU with `threads` threads."""
        return RunConfig(model=model, engine=self.engine, dtype=self.dtype, techniques=self.techniques, device="cpu",
                         threads=threads, min_duration_s=0.0, token_events=False, **dict(self.execution), **measure)


CONFIGS = [Config(BASELINE, "hf", "fp32"),
           Config("PyTorch dynamic-int8 + int8 head", "hf", "fp32", ("dynamic-int8:lm_head=true",)),
           *(Config(f"PyTorch {spec} + torch.compile", "hf", "fp32", (spec,),
                    (("compile", True), ("kv_cache", "static"))) for spec in ("w8a8", "w4a16", "w4a8")),
           *(Config(f"llama.cpp {name}", "llamacpp", dtype) for name, dtype in
             (("F32", "fp32"), ("F16", "fp16"), ("BF16", "bf16"))),
           *(Config(f"llama.cpp {t}", "llamacpp", "fp32", (f"gguf:type={t}",)) for t in GGUF_TYPES)]


def plain_decode(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> float:
    """Decode tokens/s of a plain greedy loop over the GGUF file: (N - 1) / (t(N) - t(1)), medians of `repeats`."""
    from workbench.engines.llamacpp_model import LlamaCppModel

    m = LlamaCppModel(path, n_ctx=len(prompt) + new_tokens, threads=threads)
    try:
        def timed(n: int) -> float:
            m.clear()
            t0 = time.perf_counter()
            m.decode(prompt, 0, outputs=1)
            token = m.greedy()
            for i in range(n - 1):
                token = m.step(token, len(prompt) + i)
            return time.perf_counter() - t0

        timed(new_tokens)  # warm-up
        t1 = statistics.median(timed(1) for _ in range(repeats))
        tn = statistics.median(timed(new_tokens) for _ in range(repeats))
    finally:
        m.close()
    return (new_tokens - 1) / (tn - t1)


def find_llama_bench() -> Path | None:
    """The llama-bench binary `bash dev.sh llama-bench` built, or None."""
    base = os.environ.get("WORKBENCH_WHEELS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "workbench", "wheels")
    found = sorted(glob.glob(os.path.join(base, "llama-bench-*", "llama-bench")), key=os.path.getmtime)
    return Path(found[-1]) if found else None


def parse_llama_bench(output: str, new_tokens: int) -> float:
    """Mean tokens/s of the text-generation test (n_gen = new_tokens, no prompt) in llama-bench's JSON output."""
    rows = [r for r in json.loads(output) if r.get("n_gen") == new_tokens and not r.get("n_prompt")]
    if not rows:
        raise ValueError(f"llama-bench printed no tg{new_tokens} result")
    return float(rows[0]["avg_ts"])


def llama_bench(binary: Path, path: Path, new_tokens: int, threads: int) -> float:
    """llama-bench's tg<new_tokens> tokens/s on `path` (3 repetitions, no prompt)."""
    cmd = [str(binary), "-m", str(path), "-t", str(threads), "-p", "0", "-n", str(new_tokens), "-r", "3", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return parse_llama_bench(done.stdout, new_tokens)


def gguf_file(cfg: RunConfig, files: dict[str, tuple[Path, list[int]]]) -> tuple[Path, list[int]]:
    """The GGUF file a run of `cfg` loaded and its prompt ids (looked up once per configuration)."""
    from workbench.engines.llamacpp import prepared_gguf
    from workbench.models.loader import load_tokenizer
    from workbench.models.sources import resolve
    from workbench.textio import build_prompts

    key = f"{cfg.dtype} {cfg.techniques}"
    if key not in files:
        tokenizer = load_tokenizer(resolve(cfg.model))
        files[key] = (prepared_gguf(cfg), build_prompts(cfg, tokenizer, len(tokenizer))[0])
    return files[key]


def speed_round(configs: list[Config], args: argparse.Namespace, acc: dict[str, dict[str, Any]],
                files: dict[str, tuple[Path, list[int]]]) -> None:
    """One round: every configuration through the workbench; after each llama.cpp run, the plain loop on its file."""
    for c in configs:
        cfg = c.run_config(SPEED_MODEL, args.threads, max_new_tokens=args.new_tokens, warmup=1,
                           repeats=args.repeats, eval_tokens=0)
        try:
            r = run(cfg)
        except WorkbenchError as e:
            print(f"  {c.label}: {e}", file=sys.stderr)
            continue
        row = acc[c.label]
        row["tokens_per_s"].append(r.latency.decode_tokens_per_s)
        row["fraction"].append(r.roofline.fraction_of_bound)
        row["info"] = {"weights_bytes": r.memory.weights_bytes, "bytes_per_token": r.roofline.bytes_per_token,
                       "bound_tokens_per_s": r.roofline.decode_bound_tokens_per_s,
                       "roofline_uncertain": r.roofline.uncertain, "decode_sound": not decode_looks_wrong(r.warnings)}
        line = f"  {c.label}: {r.latency.decode_tokens_per_s:.1f} tok/s"
        if c.engine == "llamacpp":
            path, prompt = gguf_file(cfg, files)
            row["plain"].append(plain_decode(path, prompt, args.new_tokens, args.threads, args.repeats))
            row["gguf"] = str(path)
            line += f", plain loop {row['plain'][-1]:.1f}"
        print(line, file=sys.stderr, flush=True)


def bench_round(binary: str | Path | None, q8: str | None, args: argparse.Namespace, bench: list[float]) -> str:
    """llama-bench once on the Q8_0 file, its tokens/s appended to `bench`; returns the status."""
    if not binary:
        return NOT_BUILT
    if not q8:
        return "no Q8_0 run"
    try:
        bench.append(llama_bench(Path(binary), Path(q8), args.new_tokens, args.threads))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return f"llama-bench failed: {str(e).splitlines()[0][:160]}"
    print(f"  llama-bench Q8_0 tg{args.new_tokens}: {bench[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return "ok"


def speed(args: argparse.Namespace, after_round: Callable[[dict[str, Any]], None]) -> None:
    """Interleaved rounds of every configuration and llama-bench; the medians so far go to `after_round`."""
    configs = [c for c in CONFIGS if c.label in args.configs] if args.configs else CONFIGS
    acc: dict[str, dict[str, Any]] = {c.label: {"tokens_per_s": [], "fraction": [], "plain": []} for c in configs}
    bench: list[float] = []
    files: dict[str, tuple[Path, list[int]]] = {}
    load: list[float] = []
    for i in range(args.rounds):
        load.append(os.getloadavg()[0])  # other processes' load: a busy machine slows every row of its round
        print(f"round {i + 1} of {args.rounds} (load average {load[-1]:.1f})", file=sys.stderr, flush=True)
        speed_round(configs, args, acc, files)
        binary = args.llama_bench or find_llama_bench()  # looked up each round: it may finish building meanwhile
        status = bench_round(binary, acc.get("llama.cpp Q8_0", {}).get("gguf"), args, bench)
        rates = acc.get(BASELINE, {}).get("tokens_per_s")
        base = statistics.median(rates) if rates else None
        lb = {"tokens_per_s": statistics.median(bench) if bench else None, "runs": bench,
              "binary": str(binary) if binary else None, "status": "ok" if bench else status}
        rows = [summarize(label, values, base) for label, values in acc.items() if values["tokens_per_s"]]
        after_round({"model": SPEED_MODEL, "rows": rows, "llama_bench": lb, "load_average": load,
                     "rounds_done": i + 1})


def summarize(label: str, values: dict[str, Any], base: float | None) -> dict[str, Any]:
    """Medians over the rounds of one configuration."""
    rate = statistics.median(values["tokens_per_s"])
    fractions = [f for f in values["fraction"] if f is not None]
    plain = statistics.median(values["plain"]) if values["plain"] else None
    return {"config": label, "decode_tokens_per_s": rate, "speedup": rate / base if base else None,
            "fraction_of_roofline": statistics.median(fractions) if fractions else None,
            "plain_loop_tokens_per_s": plain, "fidelity_ratio": rate / plain if plain else None,
            "rounds": values["tokens_per_s"], **values.get("info", {}), "gguf": values.get("gguf")}


def accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Perplexity, KL and agreement vs the fp32 PyTorch baseline on `tiny`, each configuration once."""
    configs = [c for c in CONFIGS if c.label in args.configs] if args.configs else CONFIGS
    rows = []
    for c in configs:
        try:
            r = run(c.run_config("tiny", args.threads, max_new_tokens=8, warmup=c.accuracy_warmup(), repeats=1,
                                 eval_tokens=args.eval_tokens, eval_context=256))
        except WorkbenchError as e:
            print(f"  {c.label}: {e}", file=sys.stderr)
            continue
        a = r.accuracy
        rows.append({"config": c.label, "perplexity": a.perplexity, "kl_vs_baseline": a.kl_vs_baseline,
                     "top1_agreement": a.top1_agreement_vs_baseline, "greedy_match": a.greedy_match_vs_baseline,
                     "eval_tokens": a.eval_tokens, "weights_bytes": r.memory.weights_bytes,
                     "decode_sound": not decode_looks_wrong(r.warnings)})
        print(f"  {c.label}: perplexity {a.perplexity:.3f}, KL {a.kl_vs_baseline:.5f}", file=sys.stderr, flush=True)
    return rows


def _target(name: str, measured: float | None, goal: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "measured": measured, "goal": goal, "met": met, "note": note}


def targets(speed_rows: list[dict], acc_rows: list[dict], lb: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets, each met (True), missed (False) or not measured (None)."""
    t, acc, fast = TARGETS, {r["config"]: r for r in acc_rows}, {r["config"]: r for r in speed_rows}
    out = []
    f32, base, q8 = acc.get("llama.cpp F32"), acc.get(BASELINE), acc.get("llama.cpp Q8_0")
    if f32 and base:
        gap = abs(f32["perplexity"] / base["perplexity"] - 1)
        out.append(_target("conversion: F32 perplexity vs PyTorch fp32 (tiny)", gap,
                           f"≤ {t['f32_perplexity_within']}", gap <= t["f32_perplexity_within"],
                           "relative difference"))
        out.append(_target("conversion: F32 KL vs PyTorch fp32 (tiny)", f32["kl_vs_baseline"], f"< {t['f32_kl_max']}",
                           f32["kl_vs_baseline"] < t["f32_kl_max"]))
    if q8:
        out.append(_target("conversion: Q8_0 KL vs PyTorch fp32 (tiny)", q8["kl_vs_baseline"], f"< {t['q8_kl_max']}",
                           q8["kl_vs_baseline"] < t["q8_kl_max"]))
    for r in speed_rows:
        if r["fidelity_ratio"] is not None:
            out.append(_target(f"fidelity: {r['config']} decode, workbench / plain loop", r["fidelity_ratio"],
                               f"1 ± {t['fidelity_within']}", abs(r["fidelity_ratio"] - 1) <= t["fidelity_within"]))
    wb_q8 = fast.get("llama.cpp Q8_0")
    ratio = wb_q8["decode_tokens_per_s"] / lb["tokens_per_s"] if wb_q8 and lb["tokens_per_s"] else None
    out.append(_target("llama.cpp Q8_0 decode, workbench / llama-bench tg", ratio, f"1 ± {t['llama_bench_within']}",
                       None if ratio is None else abs(ratio - 1) <= t["llama_bench_within"],
                       "" if ratio is not None else lb["status"]))
    out.append(budget_target(speed_rows, acc_rows))
    worst = max((r for r in speed_rows if r["fraction_of_roofline"] is not None),
                key=lambda r: r["fraction_of_roofline"], default=None)
    out.append(_target("highest fraction of the roofline", worst and worst["fraction_of_roofline"],
                       f"≤ {t['roofline_max']}", worst and worst["fraction_of_roofline"] <= t["roofline_max"],
                       worst["config"] if worst else ""))
    return out


def budget_target(speed_rows: list[dict], acc_rows: list[dict]) -> dict[str, Any]:
    """The fastest configuration within the perplexity budget on `tiny`: its speed-up over fp32 eager (124M)."""
    acc = {r["config"]: r for r in acc_rows}
    base = acc.get(BASELINE)
    ok = [r for r in speed_rows if base and r["config"] in acc and r["speedup"] is not None and r["decode_sound"]
          and acc[r["config"]]["decode_sound"]
          and acc[r["config"]]["perplexity"] <= base["perplexity"] * (1 + TARGETS["perplexity_budget"])]
    best = max(ok, key=lambda r: r["speedup"], default=None)
    name = f"fastest within a {TARGETS['perplexity_budget']:.0%} perplexity budget, vs PyTorch fp32 eager"
    return _target(name, best and best["speedup"], f"≥ {TARGETS['speedup_min']}x",
                   best and best["speedup"] >= TARGETS["speedup_min"], best["config"] if best else "")


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def target_row(t: dict[str, Any]) -> str:
    """One row of the targets table: what, the number, the goal, met / missed."""
    note = f" ({t['note']})" if t["note"] else ""
    verdict = "not measured" if t["met"] is None else "met" if t["met"] else "**missed**"
    return f"| {t['target']}{note} | {_num(t['measured'], '.4g')} | {t['goal']} | {verdict} |"


def markdown(result: dict[str, Any]) -> str:
    """The tables: speed (124M), accuracy (tiny), targets."""
    s = ["| configuration | decode tok/s | vs PyTorch fp32 | fraction of roofline | weights | plain loop tok/s | "
         "workbench / plain |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    s += [f"| {r['config']} | {r['decode_tokens_per_s']:.1f} | {_num(r['speedup'], '.2f')}x | "
          f"{_num(r['fraction_of_roofline'], '.0%')} | {human_bytes(r['weights_bytes'])} | "
          f"{_num(r['plain_loop_tokens_per_s'], '.1f')} | {_num(r['fidelity_ratio'], '.3f')} |"
          for r in result["speed"]["rows"]]
    lb = result["speed"]["llama_bench"]
    s.append(f"| llama-bench Q8_0 (tg{result['new_tokens']}) | {_num(lb['tokens_per_s'], '.1f')} | | | | | |"
             if lb["tokens_per_s"] else f"| llama-bench Q8_0 | {lb['status']} | | | | | |")
    a = ["| configuration | perplexity | KL vs fp32 | top-1 agree | greedy match | weights |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
    a += [f"| {r['config']} | {r['perplexity']:.3f} | {r['kl_vs_baseline']:.5f} | {r['top1_agreement']:.1%} | "
          f"{r['greedy_match']:.0%} | {human_bytes(r['weights_bytes'])} |" for r in result["accuracy"]]
    tg = ["| target | measured | goal | |", "| --- | ---: | ---: | --- |"]
    tg += [target_row(t) for t in result["targets"]]
    eval_tokens = result["accuracy"][0]["eval_tokens"] if result["accuracy"] else 0
    loads = ", ".join(f"{x:.1f}" for x in result["speed"].get("load_average", [])) or "–"
    return (f"Measured by `python bench/engines.py` on {result['cpu']} ({result['threads']} threads), "
            f"{result['platform']}, {result['date']}; bandwidth bound: {result['bandwidth']}\n\n"
            f"Speed on `{result['speed']['model']}` (batch 1, {result['new_tokens']} new tokens, median of "
            f"{result['rounds']} interleaved rounds; load average at each round: {loads}):\n\n" + "\n".join(s)
            + f"\n\nAccuracy on `tiny` ({eval_tokens} held-out tokens, KL against PyTorch fp32):\n\n" + "\n".join(a)
            + "\n\nTargets:\n\n" + "\n".join(tg) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration and round")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--configs", nargs="+", default=None, help="only these labels (a smoke run)")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary (default: the one dev.sh built)")
    parser.add_argument("--json", default=str(RESULTS / "engines.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "engines.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = probe_bandwidth(torch.device("cpu"), refresh=True)  # a bound for this session, kept if best
    started = time.perf_counter()
    acc_rows = accuracy(args)  # first (a few minutes): the files then hold whole rounds as they finish

    def write(speed_result: dict[str, Any]) -> None:
        result = {"cpu": cpu_name(), "threads": args.threads, "platform": platform.platform(),
                  "date": str(date.today()), "torch": torch.__version__, "rounds": speed_result["rounds_done"],
                  "new_tokens": args.new_tokens, "repeats": args.repeats, "bandwidth": bandwidth.explanation,
                  "bandwidth_bytes_per_s": bandwidth.bytes_per_s, "speed": speed_result, "accuracy": acc_rows,
                  "duration_s": time.perf_counter() - started,
                  "targets": targets(speed_result["rows"], acc_rows, speed_result["llama_bench"])}
        text = markdown(result)
        print(text)
        Path(args.json).write_text(json.dumps(result, indent=1))
        Path(args.markdown).write_text(text)

    speed(args, write)


if __name__ == "__main__":
    main()
