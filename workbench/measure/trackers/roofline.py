"""Roofline: the measured decode rate against the memory-bandwidth bound of this device."""

from __future__ import annotations

from workbench.measure.roofline import probe_bandwidth, roofline
from workbench.measure.tracker import Axis, Tracker, register
from workbench.report import human_bytes, num
from workbench.result import RooflineStats


@register
class RooflineTracker(Tracker):
    """Every byte the engine reads per decode step, over the device's probed read bandwidth."""

    section, stats, ready_after, order = "roofline", RooflineStats, "finish", 40
    axes = (Axis("fraction_of_bound", "share of the roofline", "", "higher", lambda s: s.fraction_of_bound),)

    def finish(self) -> RooflineStats | None:
        run = self.run
        latency = run.sections.get("latency")
        if run.model_info is None or latency is None or not latency.decode_tokens_per_s:
            return None
        bandwidth = probe_bandwidth(run.device)
        if bandwidth.uncertain:
            run.warn(f"roofline bound uncertain: {bandwidth.explanation}", "roofline")
        per_step = run.engine.bytes_per_step(len(run.prompt_ids[0]), run.config.max_new_tokens, run.calls.kv_bytes)
        return roofline(bandwidth, per_step, len(run.prompt_ids), latency.decode_tokens_per_s)

    @classmethod
    def rows(cls, roof: RooflineStats) -> list[tuple[str, str]]:
        if not roof.decode_bound_tokens_per_s:
            return []
        return [("roofline", f"{num(roof.fraction_of_bound, '.0%')} of {roof.decode_bound_tokens_per_s:.0f} "
                             f"tokens/s ({human_bytes(roof.bandwidth_bytes_per_s)}/s, "
                             f"{human_bytes(roof.bytes_per_token)} per token)"
                             + (" (uncertain: the machine was busy while the bandwidth was probed; the next run "
                                "probes again)" if roof.uncertain else ""))]
