"""How fast each CPU matmul kernel reads one decode step's weights, from memory rather than the caches.

A batch-1 decode step multiplies one row of activations by every weight matrix of the model once. This
builds those matrices at a preset's shapes (q, k, v, o, gate, up, down per layer, and the output head) in
each storage format the workbench offers, and times one pass over all of them with each kernel: the working
set is the whole model, far larger than the caches, as in a real decode step. Reported per kernel: ms per
pass, billions of weights per second, GB/s of weight bytes read, and the speed-up over fp32.

    python bench/matmul_kernels.py [--model preset:llama-124m] [--threads 2] [--rounds 5] [--json PATH] [--markdown PATH]

A kernel far below the fp32 row's GB/s is limited by its arithmetic (unpacking, converting), not by memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import native  # noqa: E402
from workbench.measure.env import cpu_name  # noqa: E402
from workbench.models.presets import PRESETS  # noqa: E402
from workbench.report import table  # noqa: E402
from workbench.techniques.w4a16 import W4A16Linear  # noqa: E402
from workbench.techniques.w4a8 import W4A8Linear  # noqa: E402
from workbench.techniques.w8a8 import W8A8Linear, row_codes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of every matrix one decode step multiplies by, in order (a Llama-style preset)."""
    name = model.removeprefix("preset:")
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {model!r}; known: {', '.join('preset:' + n for n in PRESETS)}")
    c = PRESETS[name].make_config()
    if not hasattr(c, "intermediate_size"):
        raise SystemExit(f"{model} is not a Llama-style preset (no intermediate_size)")
    h, inner = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inner, h), (inner, h), (h, inner)]
    return layer * c.num_hidden_layers + [(c.vocab_size, h)]


def _dynamic_int8(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """fbgemm's dynamic int8 Linear (what `dynamic-int8` installs) over this weight."""
    from torch.ao import quantization as tq

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: tq.per_channel_dynamic_qconfig},
                                   dtype=torch.qint8)[0]


def _int8_weight_only(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's int8 weight-only kernel (bf16 activations): one byte per weight, converted in registers."""
    codes, scale = row_codes(weight)
    scale = scale.bfloat16()
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, codes, scale)


def _int_mm(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch._int_mm` alone (w8a8's matmul), int8 activations in, int32 out."""
    codes = W8A8Linear(_linear(weight)).codes
    return lambda x: torch._int_mm(x, codes.t())


def _int4(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`_weight_int4pack_mm_for_cpu` alone (w4a16's matmul), bf16 activations in and out, groups of 32."""
    layer = W4A16Linear(_linear(weight), 32)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, 32, layer.scales_and_zeros)


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


# label -> (bytes per weight for the GB/s column, activation dtype, builder of a callable for one weight)
KERNELS: dict[str, tuple[float, torch.dtype, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]] = {
    "fp32 (F.linear)": (4, torch.float32, lambda w: (lambda x, w=w: torch.nn.functional.linear(x, w))),
    "bf16 (F.linear)": (2, torch.bfloat16,
                        lambda w: (lambda x, w=w.bfloat16(): torch.nn.functional.linear(x, w))),
    "dynamic-int8 (fbgemm, with its activation quantization)": (1, torch.float32, _dynamic_int8),
    "int8 weight-only (_weight_int8pack_mm, bf16 activations)": (1, torch.bfloat16, _int8_weight_only),
    "w8a8 matmul only (torch._int_mm, int8 activations)": (1, torch.int8, _int_mm),
    "w8a8 layer (quantize the activations + torch._int_mm)": (1, torch.float32, lambda w: W8A8Linear(_linear(w))),
    "w4a16 matmul only (_weight_int4pack_mm_for_cpu, bf16 activations)": (0.5, torch.bfloat16, _int4),
    "w4a16 layer (fp32 in and out, groups of 32)": (0.5, torch.float32,
                                                                lambda w: W4A16Linear(_linear(w), 32)),
}
if native.unavailable() is None:  # the workbench's own kernel needs a C compiler to build
    KERNELS["w4a8 layer (fp32 in and out, int8 activations, integer dot products)"] = (
        0.5, torch.float32, lambda w: W4A8Linear(_linear(w)))


def measure(shapes: list[tuple[int, int]], rounds: int) -> list[dict[str, Any]]:
    """Time one pass over all matrices with each kernel; rounds interleaved, the median reported."""
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in shapes]  # (out, in)
    built = {label: [make(w) for w in weights] for label, (_, _, make) in KERNELS.items()}
    del weights
    inputs = {label: {i: (torch.randint(-127, 128, (1, i), dtype=torch.int8) if dt == torch.int8
                          else torch.randn(1, i, dtype=dt)) for _, i in shapes}
              for label, (_, dt, _) in KERNELS.items()}
    times: dict[str, list[float]] = {label: [] for label in KERNELS}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for label, fns in built.items():
                xs = inputs[label]
                t0 = time.perf_counter()
                for fn, (_, i) in zip(fns, shapes):
                    fn(xs[i])
                times[label].append(time.perf_counter() - t0)
    count = sum(o * i for o, i in shapes)
    base = statistics.median(times[next(iter(KERNELS))][1:])
    rows = []
    for label, (width, _, _) in KERNELS.items():
        t = statistics.median(times[label][1:])
        rows.append({"kernel": label, "ms_per_step": t * 1e3, "gweights_per_s": count / t / 1e9,
                     "weight_gb_per_s": count * width / t / 1e9, "speedup_vs_fp32": base / t})
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The table, with what it was measured on."""
    portable = f"{native.PORTABLE_ENV}=1 " if result.get("portable") else ""  # the w4a8 row: its portable C build
    head = (f"Measured by `{portable}python bench/matmul_kernels.py --model {result['model']} --threads "
            f"{result['threads']}` on {result['cpu']}, torch {result['torch']}: {result['matrices']} matrices, "
            f"{result['weights'] / 1e6:.1f} M weights per step, median of {result['rounds']} rounds.\n\n")
    rows = [(r["kernel"], f"{r['ms_per_step']:.2f}", f"{r['gweights_per_s']:.1f}", f"{r['weight_gb_per_s']:.1f}",
             f"{r['speedup_vs_fp32']:.2f}x") for r in result["rows"]]
    lines = ["| kernel | ms per step | G weights/s | weight GB/s | vs fp32 |", "| --- | ---: | ---: | ---: | ---: |"]
    return head + "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preset:llama-124m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=str(RESULTS / "matmul-kernels.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "matmul-kernels.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = step_shapes(args.model)
    rows = measure(shapes, args.rounds)
    result = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "cpu": cpu_name(),
              "torch": torch.__version__, "matrices": len(shapes), "weights": sum(o * i for o, i in shapes),
              "portable": os.environ.get(native.PORTABLE_ENV) == "1", "rows": rows}
    print(table([(r["kernel"], f"{r['ms_per_step']:.2f}", f"{r['gweights_per_s']:.1f}", f"{r['weight_gb_per_s']:.1f}",
                  f"{r['speedup_vs_fp32']:.2f}x") for r in rows],
                ("kernel", "ms per step", "G weights/s", "weight GB/s", "vs fp32")))
    Path(args.json).write_text(json.dumps(result, indent=1))
    Path(args.markdown).write_text(markdown(result))


if __name__ == "__main__":
    main()
