"""Readable text tables of results (for the CLI and the README)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.measure import tracker
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


def num(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    """A number in `fmt` with its suffix; None -> '-'."""
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def pct(p: Percentiles | None) -> str:
    """'p50 / p90 / p99' in ms; None -> '-'."""
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
    m = r.model
    head = f"run {r.run_id if r.run_id is not None else '-'}: {r.status}"
    if m:
        head += (f" — {m.name} ({m.architecture}, {m.params / 1e6:.2f} M params, {m.dtype} on {m.device}"
                 f"{', random weights' if m.random_weights else ''})")
    out.append(head)
    if r.techniques:
        out.append("techniques: " + "; ".join(
            f"{t.name}{' (simulated)' if t.simulated else ''}" for t in r.techniques))
    rows = []
    for t in tracker.trackers():
        stats = r.sections.get(t.section)
        rows += t.rows(stats) if stats is not None else []
    rows += _parallel_rows(r)
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
        torch_side = (f", {c.attn_implementation} attention, {c.kv_cache} KV cache{', torch.compile' if c.compile else ''}"
                      if c.engine == "hf" else "")  # PyTorch settings; llama.cpp has its own kernels and cache
        rows.append(("execution", f"{c.engine} engine, {c.threads or 'all'} threads{torch_side}"))
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
                                         f"{num(k.busy, '.0%')}, {num(k.decode_tokens_per_s, '.1f')} tokens/s"))
    return rows


def summary_cells(rows: list[dict[str, Any]], dash: str = "-") -> tuple[list[str], list[list[str]]]:
    """Header and cells of a listing of stored runs: identity, every tracker's labelled columns, the error."""
    from workbench.analysis import technique_labels

    columns = [c for c in tracker.columns() if c.label]
    header = ["id", "when (UTC)", "status", "model", "engine", "dtype", "techniques"] + [c.label for c in columns]
    body = [[str(r["id"]), (r["created_at"] or "")[:19].replace("T", " "), r["status"], r["model"],
             r.get("engine") or "hf", r["dtype"],
             technique_labels(r["techniques"].split(" + ")) if r["techniques"] else dash]
            + [c.fmt(r[c.name]) if r.get(c.name) is not None else dash for c in columns] for r in rows]
    return header + ["error"], [b + [r["error"] or ""] for b, r in zip(body, rows)]


def format_summaries(rows: list[dict[str, Any]]) -> str:
    """The `workbench results` listing."""
    header, body = summary_cells(rows)
    return table([b[:-1] + [b[-1][:60]] for b in body], header)


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
    out += [f"{r.layer}: KL {r.kl:.2e}, SQNR {num(r.sqnr_db, '.1f')} dB" for r in outside]
    if report.histogram:
        h = report.histogram
        out.append(f"histogram of {h.layer}: {len(h.before)} bins over [{h.edges[0]:.3g}, {h.edges[-1]:.3g}], "
                   f"{h.distinct_after} distinct values after")
    out.append(report.definition)
    return "\n".join(out)
