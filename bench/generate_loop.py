"""What Hugging Face's `generate` loop costs around one decode step, and what fixed-length decoding used to add.

For each configuration this loads the model the way the workbench does and times, per decode step
((t(N tokens) - t(1 token)) / (N - 1), interleaved rounds, medians):

- plain loop: the model's step (compiled, as `generate` compiles it, with a static cache; or eager with a
  dynamic cache) called N - 1 times after the prefill, the greedy pick (EOS masked, as generate's), nothing else;
- generate, fixed length: `generate` with the workbench's settings (`hf_generate.fixed_length`: EOS masked by
  one indexed fill), what the runner times;
- generate, min_new_tokens: `generate` with `min_new_tokens = max_new_tokens`, transformers' own way to the same
  tokens (two processors that build a vocabulary-long mask with `torch.isin` every step).

    python bench/generate_loop.py [--model preset:llama-124m] [--config fp32 --config 'fp32|w4a16|compile']
                                  [--new-tokens 64] [--rounds 8] [--threads 2] [--json PATH] [--markdown PATH]

A config is `DTYPE|SPEC|...`; a final `|compile` compiles the decode step (static cache).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import logs  # noqa: E402

logs.quiet_libraries()

from workbench.config import RunConfig  # noqa: E402
from workbench.engines.hf_compile import CompilePlan, compile_config, fresh_compile_state  # noqa: E402
from workbench.engines.hf_generate import NoEarlyEnd, fixed_length  # noqa: E402
from workbench.events import no_event  # noqa: E402
from workbench.measure.env import cpu_name  # noqa: E402
from workbench.models.loader import load_model  # noqa: E402
from workbench.models.sources import resolve  # noqa: E402
from workbench.report import table  # noqa: E402
from workbench.techniques import apply_techniques  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = ["fp32", "fp32|w4a16|compile"]
WAYS = ("plain loop", "generate, fixed length", "generate, min_new_tokens")
PROMPT = 16


def parse(config: str) -> tuple[str, tuple[str, ...], bool]:
    """(dtype, technique specs, compiled) of `DTYPE|SPEC|...|compile`."""
    dtype, *specs = config.split("|")
    compiled = bool(specs) and specs[-1] == "compile"
    return dtype, tuple(specs[:-1] if compiled else specs), compiled


def timers(model: torch.nn.Module, tokenizer: Any, compiled: bool,
           new_tokens: int) -> dict[str, Callable[[int], tuple[float, list[int]]]]:
    """For each way of decoding, a function that decodes n tokens of one prompt: (its seconds, the tokens)."""
    from transformers import DynamicCache, StaticCache

    cc = compile_config(CompilePlan("default"), "cpu") if compiled else None
    ids = torch.arange(5, 5 + PROMPT).unsqueeze(0)  # (1, T)
    mask = torch.ones_like(ids)
    execution = dict(disable_compile=cc is None, compile_config=cc, cache_implementation="static" if cc else None)
    no_eos = NoEarlyEnd(tokenizer.eos_token_id, ids.device)  # the pick generate makes, so all ways agree
    # transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def plain(n: int) -> tuple[float, list[int]]:
        cache = (StaticCache(config=model.config, max_cache_len=PROMPT + new_tokens) if cc
                 else DynamicCache(config=model.config))
        step = model.get_compiled_call(cc) if cc else model
        t0 = time.perf_counter()
        logits = model(input_ids=ids, cache_position=torch.arange(PROMPT), **{cache_kw: cache}).logits  # (1, T, V)
        tokens = [no_eos(None, logits[:, -1]).argmax(-1, keepdim=True)]  # (1, 1) each
        for i in range(n - 1):
            logits = step(input_ids=tokens[-1], cache_position=torch.tensor([PROMPT + i]), **{cache_kw: cache}).logits
            tokens.append(no_eos(None, logits[:, -1]).argmax(-1, keepdim=True))
        return time.perf_counter() - t0, torch.cat(tokens, 1)[0].tolist()

    def timed_generate(**settings: Any) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **settings, **execution)
        return time.perf_counter() - t0, out[0, PROMPT:].tolist()

    def ours(n: int) -> tuple[float, list[int]]:
        return timed_generate(**fixed_length(tokenizer, n, ids.device))

    def theirs(n: int) -> tuple[float, list[int]]:
        return timed_generate(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    return dict(zip(WAYS, (plain, ours, theirs)))


def measure(model_spec: str, config: str, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Load and apply one configuration; the median ms per decode step of each way, interleaved by round.

    Every way must decode the same tokens (the same work per step), or the comparison is refused."""
    dtype, specs, compiled = parse(config)
    loaded = load_model(resolve(model_spec), dtype, torch.device("cpu"))
    apply_techniques(loaded, RunConfig(model=model_spec, dtype=dtype, device="cpu", techniques=specs), no_event)
    model = loaded.model.eval()
    fresh_compile_state()
    ways = timers(model, loaded.tokenizer, compiled, new_tokens)
    steps: dict[str, list[float]] = {way: [] for way in ways}
    with torch.inference_mode():
        decoded = {way: fn(new_tokens)[1] for way, fn in ways.items()}  # warm-up: compiles the step once, for all
        if len({tuple(t) for t in decoded.values()}) != 1:
            raise SystemExit(f"{config}: the decode loops disagree on the tokens (different work): {decoded}")
        for _ in range(rounds):
            for way, fn in ways.items():
                steps[way].append((fn(new_tokens)[0] - fn(1)[0]) / (new_tokens - 1))
    ms = {way: 1e3 * statistics.median(v) for way, v in steps.items()}
    plain = ms[WAYS[0]]
    return {"config": config, "ms_per_step": ms, "tokens_per_s": {w: 1e3 / v for w, v in ms.items()},
            "overhead_ms": {w: v - plain for w, v in ms.items()}}


def label(config: str) -> str:
    """A configuration as a table cell: `fp32 + w4a16 + compile` (a pipe would split a markdown row)."""
    return config.replace("|", " + ")


def rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One table row per configuration and way."""
    out = []
    for r in result["rows"]:
        for way in WAYS:
            out.append((label(r["config"]), way, f"{r['ms_per_step'][way]:.2f}", f"{r['tokens_per_s'][way]:.1f}",
                        f"{r['overhead_ms'][way]:+.2f}"))
    return out


HEADER = ("configuration", "decode loop", "ms per step", "tokens/s", "vs plain loop, ms")


def markdown(result: dict[str, Any]) -> str:
    """The table, with the command and the machine."""
    head = (f"Measured by `python bench/generate_loop.py --model {result['model']} --new-tokens "
            f"{result['new_tokens']} --rounds {result['rounds']}` on {result['cpu']} ({result['threads']} threads), "
            f"torch {result['torch']}, transformers {result['transformers']}: batch 1, a {PROMPT}-token prompt, "
            "(t(N) - t(1)) / (N - 1), medians of interleaved rounds.\n\n")
    lines = [f"| {' | '.join(HEADER)} |", "| --- | --- | ---: | ---: | ---: |"]
    return head + "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows(result)]) + "\n"


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:llama-124m")
    parser.add_argument("--config", action="append", help="DTYPE|SPEC|...[|compile]; repeatable")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS / "generate-loop.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "generate-loop.md"))
    args = parser.parse_args()
    if args.new_tokens < 2 or args.rounds < 1:
        parser.error("--new-tokens must be at least 2 and --rounds at least 1")
    torch.set_num_threads(args.threads)
    result = {"model": args.model, "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
              "cpu": cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "rows": [measure(args.model, c, args.new_tokens, args.rounds) for c in args.config or DEFAULT_CONFIGS]}
    print(table(rows(result), HEADER))
    Path(args.json).write_text(json.dumps(result, indent=1))
    Path(args.markdown).write_text(markdown(result))


if __name__ == "__main__":
    main()
