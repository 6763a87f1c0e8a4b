"""Which bound holds: the device's busy share per decode step (profiled), FLOPs per byte against the ridge."""

from __future__ import annotations

import json
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import workbench.measure.busy as busy_mod
import workbench.measure.flops as fl
import workbench.measure.roofline as rl
from workbench.config import RunConfig
from workbench.engines.hf_compile import WITHOUT_CUDA_GRAPHS, plan_compile
from workbench.measure import probes, tracker
from workbench.measure.busy import Busy, Span
from workbench.result import RooflineStats, RunResult
from workbench.runner import run
from workbench.serde import from_dict

CPU = torch.device("cpu")
RooflineTracker = {t.section: t for t in tracker.trackers()}["roofline"]
QUICK = dict(model="tiny", warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=4, eval_tokens=0)


def _bandwidth(bytes_per_s: float = 10e9) -> rl.Bandwidth:
    return rl.Bandwidth(bytes_per_s, "copy (read + write)", 1, False, "10.0 GB/s from the copy.")


def _peak(flops_per_s: float) -> fl.Peak:
    return fl.Peak(flops_per_s, 1024, "fp32", 1, False, "Peak from a test.")


def _busy(share: float | None, who: str = "CPU", why: str = "") -> Busy:
    return Busy(share, None if share is None else 5.0 * share, 16 if share else 0, who, why)


# ---- the classification over synthetic numbers -----------------------------------------------------------------

@pytest.mark.parametrize("has_bound, share, intensity, ridge, expected", [
    (True, 0.12, 0.5, 9.0, "launch"),  # idle most of the step: launching, whatever the intensity
    (True, 0.12, 40.0, 9.0, "launch"),
    (True, 0.9, 40.0, 9.0, "compute"),  # busy, and more FLOP per byte than the ridge
    (True, 0.9, 0.5, 9.0, "bandwidth"),
    (True, None, 40.0, 9.0, "compute"),  # unknown share: the launch test is skipped
    (True, 0.9, None, None, "bandwidth"),  # unknown ridge: the compute test is skipped
    (False, 0.12, 40.0, 9.0, None),  # no bound at all
])
def test_the_bound_is_launch_below_half_busy_else_compute_above_the_ridge_else_bandwidth(
        has_bound, share, intensity, ridge, expected):
    assert rl.classify(has_bound, share, intensity, ridge) == expected


def test_each_bound_says_why_in_one_sentence_before_the_bandwidth_explanation():
    per_step = 400_000_000  # 10 GB/s, 40 GB/s peak: the ridge is 4 FLOP per byte
    gpu = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(0.12, "GPU"), peak=_peak(40e9),
                      flops_per_step=2e8, who="GPU")
    assert gpu.bound == "launch" and gpu.busy_share == 0.12
    assert gpu.explanation.startswith("The GPU was busy 12 % of each decode step: launch-bound — compile with CUDA "
                                      "graphs (--compile). 10.0 GB/s from the copy. Peak from a test.")
    cpu = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(0.35), peak=_peak(40e9), flops_per_step=2e8)
    assert cpu.explanation.startswith("The CPU spent 35 % of each decode step in kernels, the rest in Python and "
                                      "dispatch: overhead-bound — try --compile.")
    compiled = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(0.35), peak=_peak(40e9), flops_per_step=2e8,
                           compiled=True)
    assert "overhead-bound — even compiled; a larger batch does more work per step." in compiled.explanation
    for graphs, advice in ((False, "use CUDA graphs (--compile-mode reduce-overhead)."),
                           (True, "even with CUDA graphs; a larger batch does more work per launch.")):
        gpu_compiled = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(0.3, "GPU"), peak=_peak(40e9),
                                   flops_per_step=2e8, who="GPU", compiled=True, cuda_graphs=graphs)
        start = "The GPU was busy 30 % of each decode step: launch-bound — "
        assert gpu_compiled.explanation.startswith(start + advice)
    compute = rl.roofline(_bandwidth(), per_step, 64, 100.0, busy=_busy(0.92), peak=_peak(40e9),
                          flops_per_step=16e9)  # 25 GFLOP/s of kernels per 40 peak while busy: 68 %
    assert (compute.bound, compute.arithmetic_intensity, compute.ridge_flop_per_byte) == ("compute", 40.0, 4.0)
    assert compute.explanation.startswith("Compute-bound: batch 64 does 40 FLOP per byte, above this CPU's ridge of "
                                          "4; the CPU spent 92 % of each decode step in kernels, and they reached 68 % "
                                          "of the peak FLOP/s while they ran.")
    memory = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(0.9), peak=_peak(40e9), flops_per_step=2e8)
    assert memory.bound == "bandwidth" and memory.peak_flops_per_s == 40e9
    assert memory.explanation.startswith("Bandwidth-bound: batch 1 does 0.5 FLOP per byte, below this CPU's ridge "
                                         "of 4; the CPU spent 90 % of each decode step in kernels, and they read at "
                                         "89 % of the bandwidth while they ran.")
    unknown = rl.roofline(_bandwidth(), per_step, 1, 20.0, busy=_busy(None, why="the llamacpp engine's kernels run "
                          "outside PyTorch"), peak=None, flops_per_step=2e8, peak_why="the fp16 matmul probe failed")
    assert unknown.bound == "bandwidth" and unknown.busy_share is None and unknown.ridge_flop_per_byte is None
    assert unknown.explanation.startswith("Bandwidth-bound (compute was not compared: the fp16 matmul probe failed); "
                                          "the CPU's busy share is unknown (the llamacpp engine's kernels run "
                                          "outside PyTorch).")
    none = rl.roofline(_bandwidth(), 0, 1, 20.0, busy=_busy(0.1), peak=_peak(40e9), flops_per_step=2e8)
    assert none.bound is None and none.explanation == "10.0 GB/s from the copy. Peak from a test."


def test_kernels_far_below_the_limit_that_applies_are_not_called_bound_by_it():
    """Busy most of the step yet at 18 % of the bound: the kernels themselves are slow, and the sentence says so
    (measured: `tiny` on a loaded 2-core machine, 5 % of the bound with the CPU 56 % busy); the same above the
    ridge, against the peak FLOP/s."""
    per_step = 400_000_000  # 10 GB/s: the bound is 25 tokens/s
    slow = rl.roofline(_bandwidth(), per_step, 1, 4.0, busy=_busy(0.9), peak=_peak(40e9), flops_per_step=2e8)
    assert slow.bound == "bandwidth" and slow.fraction_of_bound == pytest.approx(0.16)
    assert slow.kernel_fraction_of_bound == pytest.approx(0.16 / 0.9)
    assert slow.explanation.startswith(
        "Far below the bandwidth bound (batch 1 does 0.5 FLOP per byte, below this CPU's ridge of 4): the CPU spent "
        "90 % of each decode step in kernels, but while they ran they read at only 18 % of the bandwidth; the "
        "kernels, not the memory, hold this step back (too little work per kernel, unpacking quantized weights, or "
        "other processes sharing the CPU). 10.0 GB/s from the copy.")
    assert dict(RooflineTracker.rows(slow))["bound"].startswith("bandwidth: Far below the bandwidth bound (batch 1")
    gpu = rl.roofline(_bandwidth(), per_step, 1, 4.0, busy=_busy(0.9, "GPU"), peak=None, flops_per_step=2e8,
                      who="GPU", peak_why="the bf16 matmul probe failed")
    assert gpu.explanation.startswith("Far below the bandwidth bound (compute was not compared: the bf16 matmul probe "
                                      "failed): the GPU spent 90 % of each decode step in kernels, but while they "
                                      "ran they read at only 18 % of the bandwidth; the kernels, not the memory, "
                                      "hold this step back (kernels too small to fill the GPU, or kernels that "
                                      "unpack quantized weights).")
    at_half = rl.roofline(_bandwidth(), per_step, 1, 11.25, busy=_busy(0.9), peak=_peak(40e9), flops_per_step=2e8)
    assert at_half.explanation.startswith("Bandwidth-bound:") and "read at 50 % of the bandwidth" in at_half.explanation
    cached = rl.roofline(_bandwidth(), per_step, 1, 30.0, busy=_busy(0.8, "GPU"), peak=_peak(40e9), flops_per_step=2e8,
                         who="GPU")
    assert cached.kernel_fraction_of_bound == pytest.approx(1.5)
    assert cached.explanation.startswith("Bandwidth-bound: batch 1 does 0.5 FLOP per byte, below this GPU's ridge of "
                                         "4; the GPU was busy 80 % of each decode step, and its kernels read at 150 % "
                                         "of the bandwidth while they ran (the weights come from the GPU's caches).")
    for share in (None, 0.3):  # unknown share: no kernel figure; launch-bound: the launch sentence as before
        other = rl.roofline(_bandwidth(), per_step, 1, 4.0, busy=_busy(share), peak=_peak(40e9), flops_per_step=2e8)
        assert "Far below" not in other.explanation and "while they ran" not in other.explanation
    assert other.bound == "launch" and other.kernel_fraction_of_bound == pytest.approx(0.16 / 0.3)
    slow_arithmetic = rl.roofline(_bandwidth(), per_step, 64, 40.0, busy=_busy(0.92), peak=_peak(40e9),
                                  flops_per_step=16e9)  # 10 GFLOP/s in 92 % of the step: 27 % of the peak
    assert slow_arithmetic.bound == "compute" and slow_arithmetic.explanation.startswith(
        "Far below the compute bound (batch 64 does 40 FLOP per byte, above this CPU's ridge of 4): the CPU spent 92 % "
        "of each decode step in kernels, but while they ran they reached only 27 % of the peak FLOP/s; the kernels "
        "are slower than the device's arithmetic allows (matmuls of 64 rows, attention and element-wise operations, "
        "all slower than the probe's matmul, or other processes sharing the CPU). 10.0 GB/s from the copy.")


def test_the_new_fields_round_trip_and_results_stored_without_them_still_load():
    roof = rl.roofline(_bandwidth(), 400_000_000, 1, 20.0, busy=_busy(0.35), peak=_peak(40e9), flops_per_step=2e8)
    result = RunResult(RunConfig(model="tiny"), None, (), None, sections={"roofline": roof})
    data = json.loads(result.to_json())["roofline"]
    assert (data["bound"], data["busy_share"], data["arithmetic_intensity"], data["ridge_flop_per_byte"]) == (
        "launch", 0.35, 0.5, 4.0)
    assert RunResult.from_dict(json.loads(result.to_json())).roofline == roof
    old = from_dict(RooflineStats, {"bandwidth_bytes_per_s": 1e10, "bytes_per_token": 10, "fraction_of_bound": 0.5,
                                    "decode_bound_tokens_per_s": 1e9, "bound": "bandwidth", "explanation": "x"})
    assert (old.busy_share, old.arithmetic_intensity, old.ridge_flop_per_byte, old.peak_flops_per_s,
            old.kernel_fraction_of_bound) == (None,) * 5


def test_the_report_adds_the_bound_sentence():
    roof = rl.roofline(_bandwidth(), 400_000_000, 1, 20.0, busy=_busy(0.35), peak=_peak(40e9), flops_per_step=2e8)
    rows = dict(RooflineTracker.rows(roof))
    assert rows["bound"] == ("launch: The CPU spent 35 % of each decode step in kernels, the rest in Python and "
                             "dispatch: overhead-bound — try --compile.")


# ---- FLOPs per step ----------------------------------------------------------------------------------------------

def test_decode_flops_count_the_weights_twice_per_row_and_attention_over_the_mean_kv_length():
    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
                          tie_word_embeddings=False)
    weights = 2 * (10_000 - 100 * 64)  # the untied input embedding is a lookup
    attention = 4 * 2 * 4 * 16 * (10 + 8 / 2)  # QK^T and AV per layer and head, over the mean KV length
    assert fl.decode_flops(10_000, cfg, 1, 10, 8) == weights + attention
    assert fl.decode_flops(10_000, cfg, 3, 10, 8) == 3 * (weights + attention)
    tied = SimpleNamespace(**{**vars(cfg), "tie_word_embeddings": True, "head_dim": 8})
    assert fl.decode_flops(10_000, tied, 1, 10, 8) == 2 * 10_000 + 4 * 2 * 4 * 8 * 14


# ---- the FLOP/s probe, cached like the bandwidth -----------------------------------------------------------------

class Matmuls:
    """Scripted matmul rates and load: `rate` FLOP/s at every size, other processes use `others` CPUs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rate: float) -> None:
        self.rate, self.others, self.calls, self.clock = rate, 0.0, 0, 0.0
        monkeypatch.setattr(fl, "_matmul_flops", self._matmul)
        monkeypatch.setattr(probes, "cpu_times", self._cpu_times)
        monkeypatch.setattr(probes.os, "cpu_count", lambda: 2)

    def _matmul(self, n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
        self.calls += 1
        return self.rate

    def _cpu_times(self) -> tuple[float, float, float]:
        self.clock += 1.0
        return self.clock * (1.0 + self.others), self.clock, self.clock


@pytest.fixture
def flops_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    return tmp_path / "flops.json"


def test_the_flops_probe_is_cached_per_dtype_and_probed_again_when_busy_or_old(flops_cache, monkeypatch):
    m = Matmuls(monkeypatch, 50e9)
    peak = fl.probe_flops(CPU, "fp32")
    assert (peak.flops_per_s, peak.uncertain, peak.probes, peak.dtype) == (50e9, False, 1, "fp32")
    assert "Peak 50 GFLOP/s from a" in peak.explanation and "fp32 matmul" in peak.explanation
    calls = m.calls
    m.rate = 99e9  # calm and under a day old: served from the cache
    assert fl.probe_flops(CPU, "fp32").flops_per_s == 50e9 and m.calls == calls
    entries = json.loads(flops_cache.read_text())
    assert list(entries) == [f"{probes.machine_key(CPU)}:fp32"]
    m.others = 1.5  # another dtype is another entry; a busy probe is uncertain ...
    bf16 = fl.probe_flops(CPU, "bf16")
    assert bf16.uncertain and "Uncertain: other processes used 1.5 of 2 CPUs" in bf16.explanation
    m.others, m.rate = 0.0, 30e9  # ... and probed again on the next call
    again = fl.probe_flops(CPU, "bf16")
    assert not again.uncertain and again.flops_per_s == 30e9 and len(json.loads(flops_cache.read_text())) == 2
    data = json.loads(flops_cache.read_text())
    for entry in data.values():
        entry["measured_at"] -= probes.REMEASURE_AFTER_S + 1
    flops_cache.write_text(json.dumps(data))
    m.rate, calls = 20e9, m.calls  # a day old: probed again
    assert fl.probe_flops(CPU, "fp32").flops_per_s == 20e9 and m.calls > calls


def test_a_corrupt_flops_cache_is_probed_again(flops_cache, monkeypatch):
    m = Matmuls(monkeypatch, 42e9)
    flops_cache.write_text(json.dumps({f"{probes.machine_key(CPU)}:fp32": {"version": 1, "flops_per_s": -1,
                                       "measured_at": time.time(), "probes": 1, "uncertain": False}}))
    assert fl.probe_flops(CPU, "fp32").flops_per_s == 42e9 and m.calls > 0


def test_the_real_matmul_probe_grows_until_a_call_takes_long_enough(flops_cache, monkeypatch):
    monkeypatch.setattr(fl, "CPU_SIZES", (32, 128))
    monkeypatch.setattr(fl, "REPEATS", {"cpu": 1})
    peak = fl.probe_flops(CPU, "fp32")
    entry = next(iter(json.loads(flops_cache.read_text()).values()))
    assert peak.flops_per_s > 0 and entry["size"] in (32, 64, 128) and peak.size == entry["size"]
    monkeypatch.setattr(fl, "TARGET_S", 1e9)  # never long enough: it stops at the largest size
    assert fl.probe_flops(CPU, "bf16").size == 128


# ---- the busy share: spans, union, window ------------------------------------------------------------------------

def test_the_union_counts_overlapping_or_nested_intervals_once():
    assert busy_mod.union_us([(0, 10), (2, 5), (8, 12), (20, 21)]) == 13
    assert busy_mod.union_us([]) == 0


def test_the_recorded_window_sits_in_the_middle_of_the_decode_steps(monkeypatch):
    monkeypatch.setattr(busy_mod, "PROFILED_STEPS", 16)
    assert busy_mod.window(4) == (1, 3)  # 3 decode steps: all of them
    assert busy_mod.window(128) == (56, 16)  # 127 decode steps: 56..71


def _spans(device: DeviceType) -> list[Span]:
    return [Span("ProfilerStep#2", DeviceType.CPU, 100, 200, False), Span("ProfilerStep#3", DeviceType.CPU, 200, 300,
                                                                           False),
            Span("ProfilerStep#2", DeviceType.CUDA, 100, 300, False),  # kineto's GPU copy of the annotation
            Span("aten::mm", device, 110, 150, True), Span("aten::t", device, 120, 130, True),  # nested
            Span("aten::add", device, 290, 320, True),  # clipped at the last step's end
            Span("aten::early", device, 0, 90, True), Span("python", device, 150, 180, False)]


@pytest.mark.parametrize("device", [DeviceType.CPU, DeviceType.CUDA])
def test_device_time_is_the_union_of_the_work_inside_the_recorded_steps(device):
    assert busy_mod.device_time(_spans(device), cuda=device == DeviceType.CUDA) == (40 + 10, 2)
    assert busy_mod.device_time(_spans(DeviceType.CPU), cuda=True) == (0.0, 2)  # a CPU op is no GPU kernel
    assert busy_mod.device_time([], cuda=False) == (0.0, 0)


def test_without_kineto_results_the_profilers_function_events_are_read():
    event = lambda name, device, start, end, annotation=False: SimpleNamespace(  # noqa: E731
        name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
        is_user_annotation=annotation, is_async=False)
    profile = SimpleNamespace(profiler=SimpleNamespace(), events=lambda: [
        event("ProfilerStep*", DeviceType.CPU, 0, 100, True), event("aten::mm", DeviceType.CPU, 10, 40)])
    spans = busy_mod.spans(profile)
    assert spans == [Span("ProfilerStep*", DeviceType.CPU, 0, 100, False), Span("aten::mm", DeviceType.CPU, 10, 40,
                                                                                 True)]
    assert busy_mod.device_time(spans, cuda=False) == (30, 1)


class FakeEngine:
    """Generates `tokens` by calling the clock like `generate` does; `work` runs torch ops per token."""

    def __init__(self, tokens: int = 4, refusal: str | None = None, fail: Exception | None = None,
                 mode: str | None = None, graphs: bool = False) -> None:
        self.tokens, self.refusal, self.fail, self.calls = tokens, refusal, fail, 0
        self.mode, self.graphs = mode, graphs

    def profile_refusal(self) -> str | None:
        return self.refusal

    def compiled_mode(self) -> str | None:
        return self.mode

    def uses_cuda_graphs(self) -> bool:
        return self.graphs

    def generate(self, clock, *, want_cache: bool, interruptible: bool):
        self.calls += 1
        if self.fail:
            raise self.fail
        clock.begin()
        clock.put(torch.tensor([1, 2, 3]))  # the prompt
        x = torch.ones(64, 64)
        for _ in range(self.tokens):
            for _ in range(20):
                x = (x @ x).clamp_(max=1.0)  # (64, 64)
            clock.put(torch.tensor([7]))
        return None


def test_a_profiled_call_measures_the_cpu_kernel_share_of_each_step():
    engine = FakeEngine(tokens=6)
    b = busy_mod.profile_decode(engine, CPU, 6, tpot_ms=1e6)  # a huge TPOT: a tiny share, never above 1
    assert engine.calls == 1 and b.steps == 5 and b.device == "CPU" and not b.failed
    assert 0 < b.share < 0.01 and b.device_ms_per_step > 0
    capped = busy_mod.profile_decode(FakeEngine(tokens=6), CPU, 6, tpot_ms=1e-6)
    assert capped.share == 1.0


def test_the_profiled_call_reads_the_kineto_events_without_building_the_function_event_tree(monkeypatch):
    """Building the profiler's FunctionEvent tree took 2-4 s per run (acc_events=True parses it as the trace stops);
    the share is read from the raw kineto events, so the tree is never built."""
    def parse(*args, **kwargs):
        raise AssertionError("the FunctionEvent tree was built")

    monkeypatch.setattr(torch.autograd.profiler.profile, "_parse_kineto_results", parse)
    b = busy_mod.profile_decode(FakeEngine(tokens=6), CPU, 6, tpot_ms=1e6)
    assert not b.failed and b.steps == 5 and b.share > 0, b.why


class WarningEngine(FakeEngine):
    """Warns as torch <= 2.12's profiler does when its schedule has one cycle."""

    def generate(self, clock, *, want_cache: bool, interruptible: bool):
        warnings.warn("Warning: Profiler clears events at the end of each cycle. Only events from the current cycle "
                      "will be reported.", UserWarning)
        return super().generate(clock, want_cache=want_cache, interruptible=interruptible)


def test_the_profilers_spurious_warning_stays_quiet_after_the_filters_were_reset():
    """pytest restores the warning filters after each test, dropping a filter made when busy.py was first imported
    inside one: under torch 2.11 the GPU suite showed the warning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # what a restore leaves: every warning shown
        b = busy_mod.profile_decode(WarningEngine(tokens=6), CPU, 6, tpot_ms=1e6)
    assert not b.failed and not [w for w in seen if "Profiler clears events" in str(w.message)]


def test_an_engine_the_profiler_cannot_see_or_a_failing_profiler_leaves_the_share_unknown():
    engine = FakeEngine(refusal="the llamacpp engine's kernels run outside PyTorch")
    b = busy_mod.profile_decode(engine, CPU, 4, tpot_ms=5.0)
    assert b.share is None and engine.calls == 0 and "outside PyTorch" in b.why and not b.failed
    one = busy_mod.profile_decode(FakeEngine(), CPU, 1, tpot_ms=5.0)
    assert one.why == "one new token has no decode step to profile"
    assert busy_mod.profile_decode(FakeEngine(), CPU, 4, tpot_ms=None).why == "no time per output token was measured"
    broken = busy_mod.profile_decode(FakeEngine(fail=RuntimeError("Profiler is already enabled")), CPU, 4, 5.0)
    assert broken.share is None and broken.failed
    assert broken.why == "the PyTorch profiler failed (RuntimeError: Profiler is already enabled)"


def _tracker_run(engine, warnings, **config):
    settings = {**dict(max_new_tokens=4, dtype="fp32", compile=False, tensor_parallel=1, data_parallel=1,
                       pipeline_parallel=1), **config}
    latency = SimpleNamespace(decode_tokens_per_s=150.0, tpot_ms=SimpleNamespace(p50=5.0))
    engine.bytes_per_step = lambda prompt, new, kv: 100_000_000
    engine.flops_per_step = lambda prompt, new, batch: 2e8
    return SimpleNamespace(model_info=object(), sections={"latency": latency}, device=CPU, engine=engine,
                           prompt_ids=[[1, 2, 3]], config=SimpleNamespace(**settings), stopped=False,
                           calls=SimpleNamespace(kv_bytes=0), warn=lambda message, section: warnings.append(message))


def test_the_tracker_warns_when_the_profiler_or_the_flops_probe_fails(monkeypatch):
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_bandwidth", lambda device: _bandwidth())
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_flops", lambda device, dtype: _peak(40e9))
    warnings: list[str] = []
    roof = RooflineTracker(_tracker_run(FakeEngine(fail=RuntimeError("boom")), warnings)).finish()
    assert roof.busy_share is None and roof.bound == "bandwidth"
    assert warnings == ["busy share per decode step unknown: the PyTorch profiler failed (RuntimeError: boom); "
                        "the bound is decided without it"]

    def no_matmul(device, dtype):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_flops", no_matmul)
    warnings.clear()
    roof = RooflineTracker(_tracker_run(FakeEngine(refusal="not profiled"), warnings, dtype="fp16")).finish()
    assert roof.ridge_flop_per_byte is None and "compute was not compared: the fp16 matmul probe failed" in \
        roof.explanation
    assert len(warnings) == 1 and warnings[0].startswith("peak FLOP/s not probed (fp16 matmul failed:")


@pytest.mark.parametrize("compile_mode, advice", [(None, "even with CUDA graphs"), ("max-autotune", "even with CUDA"),
                                                  ("default", "use CUDA graphs (--compile-mode reduce-overhead)")])
def test_the_gpu_advice_follows_the_compile_mode(monkeypatch, compile_mode, advice):
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_bandwidth", lambda device: _bandwidth())
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_flops", lambda device, dtype: _peak(40e9))
    monkeypatch.setattr("workbench.measure.trackers.roofline.profile_decode", lambda *a: _busy(0.2, "GPU"))
    mode = plan_compile(True, compile_mode, "cuda", ()).mode  # the engine's decision, as HFEngine takes it
    gpu_run = _tracker_run(FakeEngine(mode=mode, graphs=mode in WITHOUT_CUDA_GRAPHS), [], compile=True,
                           compile_mode=compile_mode)
    gpu_run.device = torch.device("cuda")  # nothing runs on it: the probes and the profiler are scripted
    roof = RooflineTracker(gpu_run).finish()
    assert roof.bound == "launch" and roof.explanation.startswith("The GPU was busy 20 % of each decode step: "
                                                                  "launch-bound — " + advice)


def test_distributed_or_stopped_runs_are_not_profiled(monkeypatch):
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_bandwidth", lambda device: _bandwidth())
    monkeypatch.setattr("workbench.measure.trackers.roofline.probe_flops", lambda device, dtype: _peak(40e9))
    engine, warnings = FakeEngine(), []
    for ranks in ({"tensor_parallel": 2}, {"pipeline_parallel": 2}):
        roof = RooflineTracker(_tracker_run(engine, warnings, **ranks)).finish()
        assert engine.calls == 0 and "a distributed run is not profiled" in roof.explanation and not warnings
    stopped = _tracker_run(engine, warnings)
    stopped.stopped = True
    assert "the run was stopped" in RooflineTracker(stopped).finish().explanation and engine.calls == 0


# ---- real runs ---------------------------------------------------------------------------------------------------

def test_a_real_cpu_run_says_which_bound_holds_and_how_busy_the_cpu_was():
    r = run(RunConfig(**QUICK))
    roof = r.roofline
    assert roof.bound in ("bandwidth", "launch", "compute") and 0 < roof.busy_share <= 1
    assert "of each decode step in kernels" in roof.explanation
    assert roof.arithmetic_intensity > 0 and roof.ridge_flop_per_byte > 0 and roof.peak_flops_per_s > 0
    assert r.latency.repeats == 1 and len(r.latency.samples) == 1  # the profiled call is not a timed one
    assert not any("busy share" in w for w in r.warnings)


def test_the_llamacpp_engine_says_its_busy_share_is_unknown():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash dev.sh setup builds it)")
    r = run(RunConfig(**{**QUICK, "engine": "llamacpp"}))
    roof = r.roofline
    assert roof.busy_share is None and roof.bound in ("bandwidth", "compute")
    assert "the CPU's busy share is unknown (the llamacpp engine's kernels run outside PyTorch" in roof.explanation


@pytest.mark.gpu
def test_a_real_gpu_run_profiles_the_kernels_of_each_decode_step():
    r = run(RunConfig(**{**QUICK, "device": "cuda", "warmup": 1, "repeats": 2, "max_new_tokens": 16}))
    roof = r.roofline
    assert roof.bound in ("bandwidth", "launch", "compute") and 0 < roof.busy_share <= 1
    assert "The GPU was busy" in roof.explanation or "the GPU was busy" in roof.explanation
    assert roof.ridge_flop_per_byte > 0 and not any("busy share" in w for w in r.warnings)
