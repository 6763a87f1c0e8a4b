"""Roofline: the measured decode rate against the memory-bandwidth bound of this device, and which limit holds."""

from __future__ import annotations

from workbench.measure.busy import Busy, profile_decode
from workbench.measure.flops import Peak, probe_flops
from workbench.measure.roofline import probe_bandwidth, roofline
from workbench.measure.tracker import Axis, Tracker, register
from workbench.report import human_bytes, num
from workbench.result import LatencyStats, RooflineStats


@register
class RooflineTracker(Tracker):
    """Every byte the engine reads per decode step, over the device's probed read bandwidth; the device's busy
    share of a step (one profiled call after the timed ones) and the step's FLOPs against its peak FLOP/s."""

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
        batch, prompt, new = len(run.prompt_ids), len(run.prompt_ids[0]), run.config.max_new_tokens
        per_step = run.engine.bytes_per_step(prompt, new, run.calls.kv_bytes)
        peak, peak_why = self.peak()
        cuda = run.device.type == "cuda"
        return roofline(bandwidth, per_step, batch, latency.decode_tokens_per_s, busy=self.busy(latency),
                        peak=peak, flops_per_step=run.engine.flops_per_step(prompt, new, batch),
                        who="GPU" if cuda else "CPU", compiled=run.engine.compiled_mode() is not None,
                        cuda_graphs=run.engine.uses_cuda_graphs(), peak_why=peak_why)

    def busy(self, latency: LatencyStats) -> Busy:
        """The device's share of a decode step from one profiled call (unknown where it cannot be measured)."""
        run, who = self.run, "GPU" if self.run.device.type == "cuda" else "CPU"
        if getattr(run, "stopped", False):
            return Busy(None, None, 0, who, "the run was stopped before it could be profiled")
        if run.config.tensor_parallel > 1 or run.config.data_parallel > 1 or run.config.pipeline_parallel > 1:
            return Busy(None, None, 0, who, "a distributed run is not profiled (its ranks would have to profile "
                                            "one call together)")
        busy = profile_decode(run.engine, run.device, run.config.max_new_tokens,
                              latency.tpot_ms.p50 if latency.tpot_ms else None)
        if busy.failed:
            run.warn(f"busy share per decode step unknown: {busy.why}; the bound is decided without it", "roofline")
        return busy

    def peak(self) -> tuple[Peak | None, str]:
        """The device's peak FLOP/s in the run's dtype (None, and why, when the matmul probe fails)."""
        run = self.run
        try:
            peak = probe_flops(run.device, run.config.dtype)
        except (RuntimeError, TypeError) as e:  # a dtype this device's matmul does not support
            run.warn(f"peak FLOP/s not probed ({run.config.dtype} matmul failed: {str(e)[:160]}); compute vs "
                     "bandwidth is not decided", "roofline")
            return None, f"the {run.config.dtype} matmul probe failed"
        if peak.uncertain:
            run.warn(f"ridge point uncertain: {peak.explanation}", "roofline")
        return peak, ""

    @classmethod
    def rows(cls, roof: RooflineStats) -> list[tuple[str, str]]:
        if not roof.decode_bound_tokens_per_s:
            return []
        rows = [("roofline", f"{num(roof.fraction_of_bound, '.0%')} of {roof.decode_bound_tokens_per_s:.0f} "
                             f"tokens/s ({human_bytes(roof.bandwidth_bytes_per_s)}/s, "
                             f"{human_bytes(roof.bytes_per_token)} per token)"
                             + (" (uncertain: the machine was busy while the bandwidth was probed; a run probes "
                                "again once it is calm)" if roof.uncertain else ""))]
        if roof.bound:
            rows.append(("bound", f"{roof.bound}: {roof.explanation.split('. ')[0].rstrip('.')}."))
        return rows
