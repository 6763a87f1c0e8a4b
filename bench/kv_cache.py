"""Long-context sweep of the KV cache: its real bytes, its share of the bytes read per decode step, and speed,
unquantized and quantized (transformers' QuantizedCache through `--kv-cache quantized --kv-bits B`).

Each decode step reads every weight once and the whole KV cache once: bytes per step = weights + batch x context
x KV bytes per position. The cache outweighs the weights beyond context* = weights / (batch x KV bytes per
position); the script prints that crossing (from the model's config) and measures each context below the model's
position limit. `preset:llama-124m` (12 layers, 12 KV heads of 64: 72 KiB per position in fp32, 2,048 positions)
crosses at about 6,700 positions at batch 1, so the default batch is 4 (about 1,700). `tiny` has 1,024 positions
(12 KiB per position in fp32, crossing at about 2,000 at batch 1: at batch 4 about 500).

    python bench/kv_cache.py [--model preset:llama-124m] [--batch 4] [--contexts 256,512,1024,1536,1984]
                             [--bits 0,8,4,2] [--new-tokens 16] [--repeats 2] [--json bench/results/kv_cache.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.models.loader import count_params, kv_bytes_per_token  # noqa: E402
from workbench.models.sources import TORCH_DTYPES, load_config, resolve  # noqa: E402
from workbench.report import human_bytes  # noqa: E402
from workbench.runner import run  # noqa: E402


def crossing(model: str, dtype: str, batch: int) -> tuple[int, int, float]:
    """(weight bytes, KV bytes per position, the context where the batch's KV cache equals the weights)."""
    config = load_config(resolve(model))
    weights = count_params(config) * TORCH_DTYPES[dtype].itemsize
    per_position = kv_bytes_per_token(config, dtype)
    return weights, per_position, weights / (batch * per_position)


def measure(model: str, dtype: str, batch: int, context: int, bits: int, args: argparse.Namespace) -> dict:
    """One run at this context (prompt + new tokens) with an unquantized (bits 0) or quantized cache."""
    quant = dict(kv_cache="quantized", kv_bits=bits) if bits else {}
    r = run(RunConfig(model=model, dtype=dtype, batch_size=batch, prompt_tokens=context - args.new_tokens,
                      max_new_tokens=args.new_tokens, warmup=1, repeats=args.repeats, min_duration_s=0.0,
                      eval_tokens=0, token_events=False, **quant))
    weights, kv = r.memory.weights_bytes, r.memory.kv_cache_bytes
    return {"context": context, "bits": bits or None, "kv_cache_bytes": kv, "weights_bytes": weights,
            "kv_share_of_step_bytes": kv / (kv + weights) if kv and weights else None,
            "decode_tokens_per_s": r.latency.decode_tokens_per_s, "cv": r.latency.cv, "warnings": list(r.warnings)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preset:llama-124m")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--contexts", default="256,512,1024,1536,1984")
    p.add_argument("--bits", default="0,8,4,2", help="0: the unquantized (dynamic) cache")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = p.parse_args()
    weights, per_position, cross = crossing(args.model, args.dtype, args.batch)
    print(f"{args.model} {args.dtype}: weights {human_bytes(weights)}, KV {human_bytes(per_position)} per position; "
          f"at batch {args.batch} the KV cache outweighs the weights beyond {cross:,.0f} positions")
    rows = []
    print(f"{'context':>8} {'bits':>5} {'KV cache':>10} {'KV share':>9} {'decode tok/s':>13}")
    for context in (int(c) for c in args.contexts.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            row = measure(args.model, args.dtype, args.batch, context, bits, args)
            rows.append(row)
            share = row["kv_share_of_step_bytes"]
            print(f"{context:>8} {bits or 'fp':>5} {human_bytes(row['kv_cache_bytes']):>10} "
                  f"{share:>9.0%} {row['decode_tokens_per_s'] or 0:>13.1f}", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch,
                                             "crossing_positions": cross, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
