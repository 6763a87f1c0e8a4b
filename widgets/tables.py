"""Small HTML tables the app shows beside its plots (views of result dataclasses)."""

from __future__ import annotations

import html
import re
from collections import defaultdict

from workbench.report import human_bytes
from workbench.result import ParallelInfo


def _compress(names: list[str]) -> str:
    """model.layers.0, model.layers.1, model.layers.2 -> model.layers.0-2."""
    groups: dict[str, list[int]] = defaultdict(list)
    others = []
    for name in names:
        match = re.match(r"^(.*\.)(\d+)$", name)
        if match:
            groups[match.group(1)].append(int(match.group(2)))
        else:
            others.append(name)
    parts = [f"{prefix}{min(ix)}-{max(ix)}" if len(ix) > 1 else f"{prefix}{ix[0]}" for prefix, ix in groups.items()]
    return ", ".join(parts + others)


def parallel_html(info: ParallelInfo | None) -> str:
    """Where each part of the model lived, and how busy each rank was."""
    if info is None:
        return ""
    rows = "".join(
        f"<tr><td>{r.rank}</td><td>{html.escape(r.device)}</td><td>{r.threads}</td><td>{r.rows}</td>"
        f"<td>{'–' if r.busy is None else f'{r.busy:.0%}'}</td>"
        f"<td>{'–' if r.decode_tokens_per_s is None else f'{r.decode_tokens_per_s:.1f}'}</td></tr>"
        for r in info.ranks)
    out = (f"<b>Execution: {html.escape(info.kind)}</b>"
           + (f", {info.world_size} ranks ({html.escape(info.backend or '')})" if info.world_size > 1 else "")
           + "<table class='wb-table'><thead><tr><th>rank</th><th>device</th><th>threads</th><th>prompts</th>"
             "<th>busy</th><th>decode tok/s</th></tr></thead><tbody>" + rows + "</tbody></table>")
    if info.placement:
        by_device: dict[str, list[str]] = defaultdict(list)
        for module, device in info.placement.items():
            by_device[device].append(module)
        out += "<table class='wb-table'><thead><tr><th>device</th><th>bytes</th><th>layers</th></tr></thead><tbody>"
        out += "".join(f"<tr><td>{html.escape(d)}</td><td>{human_bytes(info.bytes_by_device.get(d))}</td>"
                       f"<td>{html.escape(_compress(m))}</td></tr>" for d, m in sorted(by_device.items()))
        out += "</tbody></table>"
    return out
