"""Readable text tables of results (for the CLI and the README)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.result import Percentiles, RunResult


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _num(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _pct(p: Percentiles | None) -> str:
    return "-" if p is None else f"{p.p50:.2f} / {p.p90:.2f} / {p.p99:.2f}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_result(r: RunResult) -> str:
    """The result of one run as labelled sections."""
    out = []
    m, lat, mem, acc, roof = r.model, r.latency, r.memory, r.accuracy, r.roofline
    head = f"run {r.run_id if r.run_id is not None else '-'}: {r.status}"
    if m:
        head += (f" — {m.name} ({m.architecture}, {m.params / 1e6:.2f} M params, {m.dtype} on {m.device}"
                 f"{', random weights' if m.random_weights else ''})")
    out.append(head)
    if r.techniques:
        out.append("techniques: " + "; ".join(
            f"{t.name}{' (simulated)' if t.simulated else ''}" for t in r.techniques))
    rows = []
    if lat:
        rows += [("TTFT p50/p90/p99", _pct(lat.ttft_ms) + " ms"), ("TPOT p50/p90/p99", _pct(lat.tpot_ms) + " ms"),
                 ("ITL p50/p90/p99", _pct(lat.itl_ms) + " ms"), ("E2E p50/p90/p99", _pct(lat.e2e_ms) + " ms"),
                 ("prefill", _num(lat.prefill_tokens_per_s, ".0f", " tokens/s")),
                 ("decode", _num(lat.decode_tokens_per_s, ".1f", " tokens/s")
                  + (f" aggregate, {_num(lat.decode_tokens_per_s_per_sequence, '.1f')} per sequence"
                     if lat.batch_size > 1 else "")),
                 ("repeats", f"{lat.repeats} timed (+{lat.warmup} warm-up), {lat.batch_size} x {lat.new_tokens} "
                             f"new tokens after {lat.prompt_tokens} prompt tokens, CV {_num(lat.cv, '.1%')}")]
    if lat and lat.cold_start_s is not None:
        rows.append(("cold start", f"{lat.cold_start_s:.2f} s (load, apply, compile, warm-up; not in the latency)"))
    rows += _parallel_rows(r)
    if mem:
        rows += [("weights", human_bytes(mem.weights_bytes)), ("KV cache", human_bytes(mem.kv_cache_bytes)),
                 ("host peak: load / run", f"{human_bytes(mem.load_peak_host_bytes)} / {human_bytes(mem.peak_host_bytes)}")]
        if mem.peak_gpu_allocated_bytes is not None:
            rows.append(("GPU peak: allocated / reserved",
                         f"{human_bytes(mem.peak_gpu_allocated_bytes)} / {human_bytes(mem.peak_gpu_reserved_bytes)}"))
    if acc:
        rows += [("perplexity", _num(acc.perplexity)), ("next-token accuracy", _num(acc.next_token_accuracy, ".3f")),
                 ("KL vs unmodified", _num(acc.kl_vs_baseline, ".4f", " nats")),
                 ("top-1 / greedy agreement", f"{_num(acc.top1_agreement_vs_baseline, '.1%')} / "
                                              f"{_num(acc.greedy_match_vs_baseline, '.1%')}")]
    if roof and roof.decode_bound_tokens_per_s:
        rows.append(("roofline", f"{_num(roof.fraction_of_bound, '.0%')} of {roof.decode_bound_tokens_per_s:.0f} "
                                 f"tokens/s ({human_bytes(roof.bandwidth_bytes_per_s)}/s, "
                                 f"{human_bytes(roof.bytes_per_token)} per token)"))
    out.append(table(rows))
    if r.output_text:
        out.append("output: " + r.output_text.replace("\n", "\\n")[:200])
    out += [f"warning: {w}" for w in r.warnings]
    if r.error:
        out.append(f"error: {r.error}")
    return "\n".join(out)


def _parallel_rows(r: RunResult) -> list[tuple[str, str]]:
    """Execution settings, where layers live, and each rank's share."""
    c, p, rows = r.config, r.parallel, []
    if c is not None:
        rows.append(("execution", f"{c.threads or 'all'} threads, {c.attn_implementation} attention, "
                                  f"{c.kv_cache} KV cache{', torch.compile' if c.compile else ''}"))
    if p is None:
        return rows
    if p.placement:
        by_device: dict[str, int] = {}
        for device in p.placement.values():
            by_device[device] = by_device.get(device, 0) + 1
        rows.append(("placement", ", ".join(f"{n} modules on {d} ({human_bytes(p.bytes_by_device.get(d))})"
                                            for d, n in by_device.items())))
    if p.kind in ("tensor", "data"):
        rows.append((f"{p.kind} parallel", f"{p.world_size} ranks over {p.backend}"
                     + (f", aggregate {p.aggregate_decode_tokens_per_s:.1f} decode tokens/s"
                        if p.aggregate_decode_tokens_per_s else "")))
    for k in p.ranks if p.world_size > 1 else ():
        rows.append((f"  rank {k.rank}", f"{k.device}, {k.threads} threads, {k.rows} prompts, busy "
                                         f"{_num(k.busy, '.0%')}, {_num(k.decode_tokens_per_s, '.1f')} tokens/s"))
    return rows


def format_summaries(rows: list[dict[str, Any]]) -> str:
    """The `workbench results` listing."""
    from workbench.analysis import technique_labels

    body = [(r["id"], (r["created_at"] or "")[:19].replace("T", " "), r["status"], r["model"], r["dtype"],
             technique_labels(r["techniques"].split(" + ")) if r["techniques"] else "-",
             _num(r["decode_tokens_per_s"], ".1f"), _num(r["ttft_ms_p50"], ".1f"), human_bytes(r["weights_bytes"]),
             _num(r["perplexity"]), _num(r["kl_vs_baseline"], ".4f"), (r["error"] or "")[:60]) for r in rows]
    return table(body, ("id", "when (UTC)", "status", "model", "dtype", "techniques", "decode tok/s", "TTFT ms",
                        "weights", "perplexity", "KL", "error"))


def format_sensitivity(report) -> str:  # SensitivityReport
    """Per-layer KL (and SQNR) as a block x module table, plus the histogram's summary."""
    blocks, modules, kl = report.matrix("kl")
    _, _, sq = report.matrix("sqnr_db")
    rows = [[f"block {b}"] + [f"{k:.2e} / {s:.1f}" if k is not None and s is not None else
                              (f"{k:.2e}" if k is not None else "-") for k, s in zip(kl[i], sq[i])]
            for i, b in enumerate(blocks)]
    from workbench.techniques import parse_spec

    out = [f"{parse_spec(report.technique).label()} on {report.model}: KL (nats/token) / weight SQNR (dB) per layer",
           table(rows, ["layer"] + modules)]
    outside = [r for r in report.layers if r.block is None]
    out += [f"{r.layer}: KL {r.kl:.2e}, SQNR {_num(r.sqnr_db, '.1f')} dB" for r in outside]
    if report.histogram:
        h = report.histogram
        out.append(f"histogram of {h.layer}: {len(h.before)} bins over [{h.edges[0]:.3g}, {h.edges[-1]:.3g}], "
                   f"{h.distinct_after} distinct values after")
    out.append(report.definition)
    return "\n".join(out)
