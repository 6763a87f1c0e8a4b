"""Every CPU technique side by side in one process: speed and size on a 124M model, accuracy on `tiny`.

Speed: decode tokens/s and weight bytes on `preset:llama-124m` (random weights, GPT-2-small size)
against fp32 with no technique, rounds interleaved. Accuracy: perplexity, KL and agreement vs the
unmodified model on the reference model `tiny` (real weights).

    python bench/techniques.py [--speed-model preset:llama-124m] [--new-tokens 32] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.report import human_bytes, table  # noqa: E402
from workbench.runner import run  # noqa: E402
from workbench.techniques import load_all, parse_spec  # noqa: E402

# (label, dtype, technique specs): every configuration the CPU can run
CONFIGS = [
    ("fp32 (baseline)", "fp32", ()),
    ("bf16", "bf16", ()),
    ("dynamic-int8", "fp32", ("dynamic-int8",)),
    ("w8a8", "fp32", ("w8a8",)),
    ("w4a16", "fp32", ("w4a16",)),
    ("bnb-int8", "fp32", ("bnb-int8",)),
    ("bnb-nf4", "fp32", ("bnb-nf4",)),
    ("bnb-fp4", "fp32", ("bnb-fp4",)),
    ("torchao-int8-weight", "fp32", ("torchao-int8-weight",)),
    ("torchao-int8-dynamic", "fp32", ("torchao-int8-dynamic",)),
    ("sim 4-bit per-group", "fp32", ("sim:bits=4,granularity=per-group,group_size=64",)),
    ("sim 8-bit", "fp32", ("sim:bits=8",)),
    ("sim 3-bit", "fp32", ("sim:bits=3",)),
    ("magnitude 50%", "fp32", ("magnitude:sparsity=0.5",)),
    ("wanda 50%", "fp32", ("wanda:sparsity=0.5",)),
    ("2:4 (masks)", "fp32", ("2:4",)),
    ("structured heads 1/2 + MLP 1/2", "fp32", ("structured:heads_ratio=0.5,mlp_ratio=0.5",)),
    ("structured MLP 1/2 + dynamic-int8", "fp32", ("structured:mlp_ratio=0.5", "dynamic-int8")),
]


def runnable(specs: tuple[str, ...]) -> bool:
    """True when every technique is registered and can run on the CPU."""
    load_all()
    try:
        configs = [parse_spec(s) for s in specs]
    except WorkbenchError:
        return False
    return all(type(c).unavailable(torch.device("cpu")) is None for c in configs)


def speed(model: str, new_tokens: int, rounds: int) -> list[dict]:
    """Decode tokens/s and weight bytes per configuration, median over interleaved rounds."""
    configs = [c for c in CONFIGS if runnable(c[2])]
    rates: dict[str, list[float]] = {c[0]: [] for c in configs}
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        for label, dtype, specs in configs:
            cfg = RunConfig(model=model, dtype=dtype, device="cpu", techniques=specs, max_new_tokens=new_tokens,
                            warmup=1, repeats=3, min_duration_s=0.0, eval_tokens=0, token_events=False)
            try:
                r = run(cfg)
            except WorkbenchError as e:
                print(f"{label}: {e}", file=sys.stderr)
                continue
            rates[label].append(r.latency.decode_tokens_per_s)
            sizes[label] = r.memory.weights_bytes
            print(f"{label}: {r.latency.decode_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    base = statistics.median(rates["fp32 (baseline)"])
    return [{"config": label, "decode_tokens_per_s": statistics.median(v), "speedup": statistics.median(v) / base,
             "weights_bytes": sizes[label]} for label, v in rates.items() if v]


def accuracy(new_tokens: int, eval_tokens: int) -> list[dict]:
    """Perplexity and agreement with the unmodified model on `tiny` (real weights)."""
    rows = []
    for label, dtype, specs in CONFIGS:
        if not runnable(specs):
            continue
        cfg = RunConfig(model="tiny", dtype=dtype, device="cpu", techniques=specs, max_new_tokens=new_tokens,
                        warmup=0, repeats=1, min_duration_s=0.0, eval_tokens=eval_tokens, eval_context=256)
        a = run(cfg).accuracy
        rows.append({"config": label, "perplexity": a.perplexity, "next_token_accuracy": a.next_token_accuracy,
                     "kl_vs_baseline": a.kl_vs_baseline, "top1_agreement": a.top1_agreement_vs_baseline,
                     "greedy_match": a.greedy_match_vs_baseline, "eval_tokens": a.eval_tokens})
    return rows


def markdown(speed_rows: list[dict], acc_rows: list[dict], model: str) -> str:
    """The two README tables."""
    s = ["| configuration | decode tokens/s | vs fp32 | weight bytes |", "| --- | ---: | ---: | ---: |"]
    s += [f"| {r['config']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {human_bytes(r['weights_bytes'])} |"
          for r in speed_rows]
    a = ["| configuration | perplexity | next-token acc. | KL vs fp32 | top-1 agree | greedy match |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
    a += [f"| {r['config']} | {r['perplexity']:.2f} | {r['next_token_accuracy']:.3f} | {r['kl_vs_baseline']:.4f} | "
          f"{r['top1_agreement']:.1%} | {r['greedy_match']:.0%} |" for r in acc_rows]
    return (f"Speed on `{model}` ({torch.get_num_threads()} threads):\n\n" + "\n".join(s)
            + f"\n\nAccuracy on `tiny` ({acc_rows[0]['eval_tokens'] if acc_rows else 0} held-out tokens):\n\n"
            + "\n".join(a) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed-model", default="preset:llama-124m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    speed_rows = speed(args.speed_model, args.new_tokens, args.rounds)
    acc_rows = accuracy(args.new_tokens, args.eval_tokens)
    print(table([(r["config"], f"{r['decode_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
                  human_bytes(r["weights_bytes"])) for r in speed_rows],
                ("configuration", "decode tok/s", "vs fp32", "weights")))
    print(table([(r["config"], f"{r['perplexity']:.2f}", f"{r['kl_vs_baseline']:.4f}", f"{r['top1_agreement']:.1%}")
                 for r in acc_rows], ("configuration", "perplexity", "KL", "top-1 agree")))
    text = markdown(speed_rows, acc_rows, args.speed_model)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": speed_rows, "accuracy": acc_rows}, indent=1))


if __name__ == "__main__":
    main()
