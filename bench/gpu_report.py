"""bench/gpu.py's report: issue 15's targets drawn from the rows, and docs/gpu-results.md's tables.

A row is one configuration: its label, model and status (ok, error, skipped), its error sentence, and the numbers
of a finished run (decode tokens/s, fraction and kind of the bound, J/token, weights, peak GPU memory, warnings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workbench.report import human_bytes

SMALL, BIG = "preset:llama-3.2-1b", "preset:llama-3.1-8b"
EAGER, COMPILED, INT4 = "bf16 eager", "bf16 + compiled step", "torchao-int4-weight + compiled step"
NF4_8B, OFFLOAD_8B = "8B bnb-nf4", "8B bnb-nf4, max_memory cuda:0=4GiB (offload)"
GIB = 1 << 30
TARGETS = {"fraction_min": 0.5, "int4_speedup_min": 1.5, "big_gib_max": 7.0}


def slower_than_eager(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the 1B model that decode slower than bf16 eager (the baseline every technique should beat)."""
    by = {r["config"]: r for r in rows}
    base = (by.get(EAGER) or {}).get("decode_tokens_per_s")
    if base is None:
        return []
    return [r for r in rows if r["config"] != EAGER and r.get("model") == SMALL
            and r.get("decode_tokens_per_s") is not None and r["decode_tokens_per_s"] < base]


def _target(name: str, measured: float | None, goal: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "measured": measured, "goal": goal, "met": met, "note": note}


def _ok(row: dict[str, Any] | None, key: str) -> float | None:
    return row.get(key) if row and row.get("status") == "ok" else None


def _check(name: str, rows: list[dict[str, Any] | None], value: float | None, goal: str,
           passes: Callable[[float], bool]) -> dict[str, Any]:
    """A target on the rows it needs: missed when one of them failed, not measured when one was skipped."""
    failed = next((r for r in rows if r is not None and r["status"] == "error"), None)
    if failed is not None:
        return _target(name, None, goal, False, f"{failed['config']}: {failed['error']}")
    if any(r is None or r["status"] != "ok" for r in rows) or value is None:
        return _target(name, None, goal, None, "; ".join(r["error"] for r in rows if r and r.get("error")))
    return _target(name, value, goal, passes(value))


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's targets, each met (True), missed (False: too slow, too big, or its run failed) or not measured."""
    t, by = TARGETS, {r["config"]: r for r in rows}
    compiled, int4, big, off = by.get(COMPILED), by.get(INT4), by.get(NF4_8B), by.get(OFFLOAD_8B)
    out = [_check("llama-3.2-1b bf16 + compiled step: fraction of the bandwidth bound", [compiled],
                  _ok(compiled, "fraction_of_bound"), f"≥ {t['fraction_min']:.0%}", lambda v: v >= t["fraction_min"])]
    fast, base = _ok(int4, "decode_tokens_per_s"), _ok(compiled, "decode_tokens_per_s")
    out.append(_check("int4 weight-only + compiled step vs bf16 + compiled step (decode tokens/s)", [int4, compiled],
                      fast / base if fast is not None and base else None, f"≥ {t['int4_speedup_min']}x",
                      lambda v: v >= t["int4_speedup_min"]))
    for key, what in (("weights_bytes", "weights"), ("peak_gpu_bytes", "peak GPU memory")):
        value = _ok(big, key)
        out.append(_check(f"llama-3.1-8b in nf4: {what} (GiB)", [big], value / GIB if value is not None else None,
                          f"< {t['big_gib_max']:g} GiB", lambda v: v < t["big_gib_max"]))
    moved = _ok(off, "offloaded_bytes")
    out.append(_check("llama-3.1-8b in nf4 with max_memory cuda:0=4GiB: runs with layers off the GPU (GiB)", [off],
                      moved / GIB if moved is not None else None, "runs, > 0 GiB off the GPU", lambda v: v > 0))
    silent = [r["config"] for r in slower_than_eager(rows) if not r["warnings"]]
    out.append(_check("configurations slower than bf16 eager without a warning saying why", [by.get(EAGER)],
                      float(len(silent)), "0", lambda v: v == 0))
    out[-1]["note"] = ", ".join(silent) or out[-1]["note"]
    return out


def _num(x: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if x is None else format(x, fmt) + suffix


def _bytes(n: float | None) -> str:
    return "–" if n is None else human_bytes(n)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def note(row: dict[str, Any], slow: set[str]) -> str:
    """The last column of a speed row: its error, why it was skipped, or the warning a slow row carries."""
    if row["status"] != "ok":
        return row["error"] or row["status"]
    parts = [f"{human_bytes(row['offloaded_bytes'])} of weights off the GPU"] if row.get("offloaded_bytes") else []
    if row["config"] in slow:
        parts.append("⚠ slower than bf16 eager: " + (row["warnings"][0] if row["warnings"] else
                                                    "**no warning says why**"))
    if row.get("joules_per_token") is None and row.get("energy_note"):
        parts.append(row["energy_note"])
    return "; ".join(parts)


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    """The speed table: one row per configuration, errors and skips included."""
    base = next((r.get("decode_tokens_per_s") for r in rows if r["config"] == EAGER), None)
    slow = {r["config"] for r in slower_than_eager(rows)}
    lines = ["| configuration | model | decode tok/s | vs bf16 eager | of the bound | bound | GPU busy | "
             "kernels' share of BW | J/token | weights | peak GPU | note |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        rate = r.get("decode_tokens_per_s")
        model = (r.get("model") or "").removeprefix("preset:")
        lines.append(f"| {r['config']} | {model} | {_num(rate, ',.1f')} | "
                     f"{_num(rate / base if rate is not None and base else None, '.2f', 'x')} | "
                     f"{_num(r.get('fraction_of_bound'), '.1%')} | {r.get('bound') or '–'} | "
                     f"{_num(r.get('busy_share'), '.0%')} | {_num(r.get('kernel_fraction_of_bound'), '.0%')} | "
                     f"{_num(r.get('joules_per_token'), '.4f')} | {_bytes(r.get('weights_bytes'))} | "
                     f"{_bytes(r.get('peak_gpu_bytes'))} | {_cell(note(r, slow))} |")
    return lines


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Perplexity and KL against the fp32 model of each technique on `tiny`."""
    lines = ["| technique (bf16, tiny) | perplexity | KL vs fp32 | top-1 agree | weights | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['config']} | {_num(r.get('perplexity'), '.3f')} | {_num(r.get('kl_vs_baseline'), '.5f')} | "
              f"{_num(r.get('top1_agreement'), '.1%')} | {_bytes(r.get('weights_bytes'))} | "
              f"{_cell(r.get('error') or '')} |" for r in rows]
    return lines


def target_row(t: dict[str, Any]) -> str:
    """One row of the targets table: what, the number, the goal, met / missed."""
    extra = f" ({t['note']})" if t["note"] else ""
    verdict = "not measured" if t["met"] is None else "met" if t["met"] else "**missed**"
    return f"| {t['target']}{_cell(extra)} | {_num(t['measured'], '.3g')} | {t['goal']} | {verdict} |"


def markdown(result: dict[str, Any]) -> str:
    """docs/gpu-results.md: where it ran, the speed, accuracy and target tables, each run's warnings."""
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in result["versions"].items())
    head = (f"# GPU results\n\nMeasured by `python bench/gpu.py` on {result['gpu'] or 'an unnamed GPU'} "
            f"({result['driver'] or 'driver unknown'}), {result['date']}; {versions}. "
            f"{result['duration_s']:.0f} s of a {result['budget_s']:.0f} s budget.\n\n"
            f"Speed (batch 1 unless named, {result['new_tokens']} new tokens, 1 warm-up and {result['repeats']} "
            "timed calls; `preset:` models have random weights; peak GPU memory is the allocator's largest "
            "(loading or running, reserved included); J/token is the GPU board's energy over the timed calls):\n\n")
    warned = [f"- **{r['config']}**: " + "; ".join(r["warnings"]) for r in result["speed"] if r.get("warnings")]
    bounds = [f"- **{r['config']}**: {r['bound_explanation']}" for r in result["speed"] if r.get("bound_explanation")]
    return (head + "\n".join(speed_table(result["speed"]))
            + f"\n\nAccuracy on `tiny` ({result['eval_tokens']} held-out tokens, eager, KL against the fp32 "
              "model):\n\n" + "\n".join(accuracy_table(result["accuracy"]))
            + "\n\nTargets:\n\n| target | measured | goal | |\n| --- | ---: | ---: | --- |\n"
            + "\n".join(target_row(t) for t in result["targets"])
            + ("\n\nWhich bound holds:\n\n" + "\n".join(bounds) if bounds else "")
            + ("\n\nWarnings of the runs:\n\n" + "\n".join(warned) if warned else "") + "\n")
