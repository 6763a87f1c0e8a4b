"""Latency: TTFT, TPOT, ITL and E2E percentiles and throughput over the timed calls."""

from __future__ import annotations

from workbench.measure.latency import latency_warnings, summarize
from workbench.measure.tracker import Axis, Column, Tracker, register
from workbench.report import num, pct
from workbench.result import LatencyStats


@register
class LatencyTracker(Tracker):
    """Summarizes the runner's timed calls (a stopped run: its partial call) once measuring ends."""

    section, stats, ready_after, order = "latency", LatencyStats, "measure", 10
    axes = (Axis("ttft_ms_p50", "TTFT p50", "ms", "lower", lambda s: s.ttft_ms.p50),
            Axis("tpot_ms_p50", "TPOT p50", "ms", "lower", lambda s: s.tpot_ms.p50),
            Axis("e2e_ms_p50", "E2E p50", "ms", "lower", lambda s: s.e2e_ms.p50),
            Axis("decode_tokens_per_s", "decode", "tokens/s", "higher", lambda s: s.decode_tokens_per_s),
            Axis("prefill_tokens_per_s", "prefill", "tokens/s", "higher", lambda s: s.prefill_tokens_per_s))
    columns = (Column("decode_tokens_per_s", "REAL", lambda s: s.decode_tokens_per_s, "decode tok/s",
                      lambda v: num(v, ".1f")),
               Column("ttft_ms_p50", "REAL", lambda s: s.ttft_ms.p50 if s.ttft_ms else None, "TTFT ms",
                      lambda v: num(v, ".1f")),
               Column("e2e_ms_p50", "REAL", lambda s: s.e2e_ms.p50 if s.e2e_ms else None))

    def finish(self) -> LatencyStats | None:
        run = self.run
        samples = run.calls.samples or ([run.calls.partial] if run.calls.partial and run.calls.partial.token_ms else [])
        if not samples:
            return None
        cfg = run.config
        stats = summarize(samples, batch=len(run.prompt_ids), prompt_tokens=len(run.prompt_ids[0]),
                          warmup=cfg.warmup, cold_start_s=run.calls.cold_start_s)
        for warning in latency_warnings(stats, cfg.max_new_tokens if not run.stopped else 0):
            run.warn(warning, "latency")
        return stats

    @classmethod
    def rows(cls, lat: LatencyStats) -> list[tuple[str, str]]:
        rows = [("TTFT p50/p90/p99", pct(lat.ttft_ms) + " ms"), ("TPOT p50/p90/p99", pct(lat.tpot_ms) + " ms"),
                ("ITL p50/p90/p99", pct(lat.itl_ms) + " ms"), ("E2E p50/p90/p99", pct(lat.e2e_ms) + " ms"),
                ("prefill", num(lat.prefill_tokens_per_s, ".0f", " tokens/s")),
                ("decode", num(lat.decode_tokens_per_s, ".1f", " tokens/s")
                 + (f" aggregate, {num(lat.decode_tokens_per_s_per_sequence, '.1f')} per sequence"
                    if lat.batch_size > 1 else "")),
                ("repeats", f"{lat.repeats} timed (+{lat.warmup} warm-up), {lat.batch_size} x {lat.new_tokens} "
                            f"new tokens after {lat.prompt_tokens} prompt tokens, CV {num(lat.cv, '.1%')}")]
        if lat.cold_start_s is not None:
            rows.append(("cold start", f"{lat.cold_start_s:.2f} s (load, apply, compile, warm-up; not in the latency)"))
        return rows
