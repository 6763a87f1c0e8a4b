"""A self-contained, offline HTML comparison of stored runs (`workbench report`, the app's Export report button).

One page: the runs, their settings (rows that differ are marked), then one section per measured metric (latency,
memory, accuracy, roofline with its bound, energy, ...) with a table of every run's numbers and one figure
comparing them, and each run's warnings. plotly.js is inlined once (no CDN, no network); plotly is imported
lazily so the core stays importable without it.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench import __version__
from workbench.errors import ExportError, StoreError
from workbench.measure import tracker
from workbench.result import RunResult
from workbench.store import Store

from widgets.figures import export_path, write_bytes

logger = logging.getLogger(__name__)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:13px}th{background:#f3f3f3}tr.differs td:first-child{font-weight:bold}
tr.differs td{background:#fff7e0}.warn{color:#a15c00}.note{color:#666;font-size:13px}
"""


def _label(r: RunResult) -> str:
    return f"run {r.run_id}" if r.run_id is not None else "run"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], differs: Sequence[bool] = ()) -> str:
    """An HTML table; rows flagged in `differs` are marked."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr{' class=differs' if i < len(differs) and differs[i] else ''}>"
                   + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _runs_table(results: Sequence[RunResult]) -> str:
    rows = []
    for r in results:
        m = r.model
        rows.append([str(r.run_id), (r.started_at or "")[:19].replace("T", " "), r.status, r.config.model,
                     r.config.engine, r.config.dtype, m.device if m else r.config.device,
                     " + ".join(r.config.technique_specs) or "-"])
    return _table(["id", "when (UTC)", "status", "model", "engine", "dtype", "device", "techniques"], rows)


def _settings_table(results: Sequence[RunResult]) -> str:
    """Every RunConfig field as a row, one column per run; rows whose values differ are marked."""
    configs = [r.config.to_dict() for r in results]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    rows = [[k] + [_short(c.get(k)) for c in configs] for k in keys]
    differs = [len({row[i] for i in range(1, len(row))}) > 1 for row in rows]
    return _table(["setting"] + [_label(r) for r in results], rows, differs)


def _short(value: Any) -> str:
    text = "-" if value is None or value == "" or value == [] else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _section_table(t: type[tracker.Tracker], results: Sequence[RunResult]) -> str:
    """The tracker's labelled rows (the text report's), one column per run."""
    per_run = [dict(t.rows(r.sections[t.section])) if r.sections.get(t.section) is not None else {} for r in results]
    labels = list(dict.fromkeys(k for rows in per_run for k in rows))
    rows = [[label] + [rows.get(label, "-") for rows in per_run] for label in labels]
    return _table(["metric"] + [_label(r) for r in results], rows) if rows else ""


def _axis_value(axis: tracker.Axis, stats: Any) -> float | None:
    try:
        value = axis.get(stats) if stats is not None else None
    except (AttributeError, TypeError):  # e.g. a percentile that was not measured
        return None
    return None if value is None else float(value)


def section_figure(t: type[tracker.Tracker], results: Sequence[RunResult]) -> Any:
    """One plotly figure comparing the runs on the tracker's axes (a bar chart per axis); None without data."""
    from plotly.subplots import make_subplots

    names = [_label(r) for r in results]
    panels = []
    for axis in t.axes:
        values = [_axis_value(axis, r.sections.get(t.section)) for r in results]
        if any(v is not None for v in values):
            mib = axis.unit == "bytes"
            values = [v / 2**20 if mib and v is not None else v for v in values]
            panels.append((axis, values, "MiB" if mib else axis.unit))
    if t.section == "roofline":
        panels += _roofline_panels(results)
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = make_subplots(rows=rows, cols=cols, vertical_spacing=0.2 if rows > 1 else 0.1, subplot_titles=[
        f"{a.label}{f' ({u})' if u else ''} — {a.better} is better" for a, _, u in panels])
    for i, (axis, values, _) in enumerate(panels):
        fig.add_bar(x=names, y=values, name=axis.label, showlegend=False, row=i // cols + 1, col=i % cols + 1,
                    text=[f"{v:.4g}" if v is not None else "n/a" for v in values], textposition="auto")
    fig.update_layout(height=290 * rows, width=max(420, 330 * cols), margin=dict(t=50, b=40, l=50, r=20))
    return fig


def _roofline_panels(results: Sequence[RunResult]) -> list[tuple[tracker.Axis, list, str]]:
    """The measured decode speed next to the bandwidth bound (tokens/s), per run."""
    bound = tracker.Axis("decode_bound", "decode bound", "tokens/s", "higher",
                         lambda s: s.decode_bound_tokens_per_s)
    values = [_axis_value(bound, r.sections.get("roofline")) for r in results]
    return [(bound, values, "tokens/s")] if any(v is not None for v in values) else []


def _warnings(results: Sequence[RunResult]) -> str:
    items = [f"<li><b>{html.escape(_label(r))}</b>: {html.escape(w)}</li>" for r in results for w in r.warnings]
    items += [f"<li><b>{html.escape(_label(r))}</b>: error: {html.escape(r.error)}</li>" for r in results if r.error]
    return f"<ul class=warn>{''.join(items)}</ul>" if items else "<p class=note>No warnings.</p>"


def render_report(results: Sequence[RunResult], title: str = "") -> str:
    """The whole HTML page comparing `results` (plotly.js inlined once)."""
    try:
        import plotly.io as pio
    except ImportError:
        raise ExportError("the HTML report needs plotly: pip install 'llm-inference-workbench[app]'") from None
    if not results:
        raise ExportError("no runs to report: give at least one run id")
    ids = ", ".join(str(r.run_id) for r in results)
    title = title or f"Workbench report: runs {ids}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=note>Written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by workbench "
             f"{html.escape(__version__)}. Every number comes from the results store; timings depend on the machine "
             "and how busy it was (see each run's CV and warnings).</p>",
             "<h2>Runs</h2>", _runs_table(results), "<h2>Settings</h2>",
             "<p class=note>Highlighted rows differ between the runs.</p>", _settings_table(results)]
    plotlyjs_inlined = False
    for t in tracker.trackers():
        if all(r.sections.get(t.section) is None for r in results):
            continue
        parts += [f"<h2>{html.escape(t.section.capitalize())}</h2>", _section_table(t, results)]
        fig = section_figure(t, results)
        if fig is not None:
            parts.append(pio.to_html(fig, include_plotlyjs=not plotlyjs_inlined, full_html=False, validate=False,
                                     config={"displaylogo": False}))
            plotlyjs_inlined = True
    parts += ["<h2>Warnings</h2>", _warnings(results)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")


def parse_run_ids(values: Sequence[str | int]) -> list[int]:
    """Run ids as `workbench results` lists them (numbers; "#12" too); ExportError names a bad one."""
    if not values:
        raise ExportError("no run ids given: name the runs to compare, as `workbench results` lists them")
    ids = []
    for v in values:
        text = str(v).strip().lstrip("#")
        if not text.isdigit():
            raise ExportError(f"run id {str(v)!r} is not a number: use the ids `workbench results` lists")
        ids.append(int(text))
    return list(dict.fromkeys(ids))


def load_runs(store: Store, ids: Sequence[int]) -> list[RunResult]:
    """The stored results of `ids`, in that order; an unknown id names a few known ones."""
    known = [row["id"] for row in store.summaries(limit=None)]
    missing = [i for i in ids if i not in known]
    if missing:
        few = ", ".join(map(str, known[:8])) + (", ..." if len(known) > 8 else "")
        raise ExportError(f"no run {', '.join(map(str, missing))} in {str(store.path)!r}: "
                          + (f"known runs are {few} (`workbench results` lists them)" if known
                             else "it has no runs yet"))
    try:
        return [store.get(i) for i in ids]
    except StoreError as e:  # e.g. a failed run: it has no measurements to compare
        raise ExportError(str(e)) from None


def write_report(ids: Sequence[str | int], out: str | Path, store: Store | str | Path | None = None) -> Path:
    """Write the HTML report of stored runs `ids` to `out` (.html); returns the path. ExportError on bad input."""
    path = export_path(out, (".html",))
    st = store if isinstance(store, Store) else Store(store)
    results = load_runs(st, parse_run_ids(ids))
    write_bytes(path, render_report(results).encode("utf-8"))
    logger.info("report of %d runs written to %s", len(results), path)
    return path
