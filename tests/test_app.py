"""The app without a kernel or a browser: a fake runner emits scripted events; buttons are clicked."""

from __future__ import annotations

import html
import threading

import pytest

from workbench.config import RunConfig
from workbench.errors import ModelSourceError
from workbench.events import MetricEvent, RepeatEvent, StageEvent, TokenEvent, WarningEvent
from workbench.result import (AccuracyStats, LatencyStats, MemoryStats, ModelInfo, Percentiles, RepeatTiming,
                              RooflineStats, RunResult)
from workbench.store import Store

TEXT = ["The", " for", " statement", " is", " used"]


def fake_result(config: RunConfig, status: str = "ok", scale: float = 1.0, ppl: float = 20.0) -> RunResult:
    """A complete, plausible result whose numbers a test can predict."""
    p = lambda v: Percentiles(v, v * 1.1, v * 1.2)  # noqa: E731
    sample = RepeatTiming(3.0 * scale, 20.0 * scale, tuple((3.0 + 4 * i) * scale for i in range(5)))
    lat = LatencyStats(p(3.0 * scale), p(4.0 * scale), p(4.0 * scale), p(20.0 * scale), 2000.0, 250.0 / scale, 0.02,
                       1, 3, 5, 6, 1, 0.06, (sample,))
    mem = MemoryStats(24_000_000 * scale, 400_000, 400_000_000, 410_000_000, None, None, 390_000_000, None, None,
                      "VmHWM")
    acc = AccuracyStats(ppl, 0.4, 0.01 * scale, 0.97, 1.0, 2048, "test")
    roof = RooflineStats(15e9, 24_000_000, 600.0, 0.4, "test")
    model = ModelInfo(config.model, 6_000_000, int(24_000_000 * scale), False, config.dtype, "cpu", "LlamaForCausalLM")
    return RunResult(config, model, techniques=(), env=None, status=status,
                     sections=dict(latency=lat, memory=mem, accuracy=acc, roofline=roof),
                     output_text="".join(TEXT), outputs=("".join(TEXT),), started_at="2026-11-25T00:00:00",
                     duration_s=0.1)


class ScriptedRunner:
    """Emits the stage / token / metric events of a run, optionally waiting or stopping like the real one."""

    def __init__(self, repeats: int = 2, block: threading.Event | None = None, fail: Exception | None = None):
        self.repeats, self.block, self.fail = repeats, block, fail
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, config, on_event, should_stop):
        self.calls += 1
        self.started.set()
        if self.block is not None:
            self.block.wait(10)
        if self.fail is not None:
            raise self.fail
        on_event(StageEvent("load", "start", "loading"))
        on_event(StageEvent("load", "end"))
        on_event(WarningEvent("CV 12% > 10%: noisy machine", "latency"))
        for r in range(self.repeats):
            for i, piece in enumerate(TEXT):
                if should_stop():
                    result = fake_result(config, status="stopped")
                    return result
                on_event(TokenEvent("measure", r, i, 3.0 + 4 * i, piece, 3.0 if i == 0 else 4.0))
            on_event(RepeatEvent(r, 3.0, 20.0, 250.0))
        result = fake_result(config)
        for section in ("latency", "memory", "accuracy", "roofline"):
            on_event(MetricEvent(section, getattr(result, section)))
        on_event(StageEvent("evaluate", "end"))
        return result


@pytest.fixture
def app(tmp_path, monkeypatch):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)

    def make(runner=None, **kwargs):
        return Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=runner or ScriptedRunner(), **kwargs)

    return make


def test_run_button_fills_every_plot_text_progress_and_history(app, tmp_path):
    w = app()
    assert w.run_button.description == "Run" and w.stop_button.description == "Stop"
    w.run_button.click()
    w.wait(10)
    arrival, gap, ttft = w.latency_plot.traces
    assert list(arrival.x) == [0, 1, 2, 3, 4] and list(arrival.y) == [3.0, 7.0, 11.0, 15.0, 19.0]
    assert list(gap.y) == [4.0] * 4 and ttft.text[0].startswith("TTFT 3.0")
    assert "TTFT p50 3.0 ms" in w.latency_plot.cell.title
    assert "weights" in w.memory_plot.bar.x
    assert list(w.accuracy_plot.bar.y) == [0.4, 0.97, 1.0]
    assert "perplexity 20.00" in w.accuracy_plot.cell.title
    assert list(w.roofline_plot.bar.x) == [600.0, 250.0]
    assert w.progress.value == 1.0 and w.progress.description == "done"
    assert "The for statement is used" in w.text.value
    assert "noisy machine" in w.latency_notes.value  # the warning sits next to the latency plot
    assert w.last_result.run_id == 1 and Store(tmp_path / "runs.sqlite").summaries()[0]["status"] == "ok"
    assert list(w.history.pareto.widget.data[0].x) == [20.0]
    assert "tiny" in w.history.table.value
    assert not w.run_button.disabled and w.stop_button.disabled


def test_plot_state_survives_a_late_page(app):
    """plotly #4998: the synced state (what a view that connects later draws) matches the figure."""
    w = app()
    w.start()
    w.wait(10)
    assert w.sensitivity.plots is None  # created on the first analysis: every figure costs page load
    fresh = app()  # before any run, too: a page that connects now must get every painter's traces
    assert len(fresh.live._widget_data) == len(fresh.live.data) == 6
    for fig in (w.live, w.history.pareto.widget):
        synced = fig._widget_data
        assert len(synced) == len(fig.data)
        for trace, state in zip(fig.data, synced):
            assert list(trace.x or ()) == list(state.get("x", ()))
    assert w.live._widget_layout["annotations"][0]["text"] == w.latency_plot.cell.title


def test_token_redraws_are_throttled(app, monkeypatch):
    w = app(redraw_interval_s=0.5)
    calls = []
    original = w.latency_plot.add
    monkeypatch.setattr(w.latency_plot, "add", lambda events: (calls.append(len(events)), original(events)))
    w.start()
    w.wait(10)
    assert sum(calls) == 10 and len(calls) <= 4  # 10 tokens in a few batches, not 10 redraws


def test_stop_keeps_the_partial_result(app, tmp_path):
    gate = threading.Event()
    runner = ScriptedRunner(repeats=100, block=gate)
    w = app(runner)
    w.start()
    runner.started.wait(5)
    w.stop_button.click()
    gate.set()
    w.wait(10)
    assert w.last_result.status == "stopped"
    assert w.progress.description == "stopped" and "partial result kept" in w.status.value
    assert Store(tmp_path / "runs.sqlite").summaries()[0]["status"] == "stopped"


def test_second_run_is_refused_politely(app):
    gate = threading.Event()
    runner = ScriptedRunner(block=gate)
    w = app(runner)
    assert w.start()
    runner.started.wait(5)
    assert w.run_button.disabled
    assert not w.start()
    assert "already in progress" in w.status.value
    gate.set()
    w.wait(10)
    assert runner.calls == 1


@pytest.mark.parametrize("error, expected", [
    (ModelSourceError("no model folder at './nope'"), "no model folder at './nope'"),
    (RuntimeError("boom\nwith a second line"), "unexpected RuntimeError: boom"),
])
def test_errors_become_one_message_and_an_error_record(app, tmp_path, error, expected):
    w = app(ScriptedRunner(fail=error))
    w.start()
    w.wait(10)
    message = html.unescape(w.error.value)
    assert expected in message and "Traceback" not in message and "second line" not in message
    rows = Store(tmp_path / "runs.sqlite").summaries()
    assert rows[0]["status"] == "error" and expected in rows[0]["error"]
    assert not w.run_button.disabled  # the app stays usable
    w.runner = ScriptedRunner()
    assert w.start()
    w.wait(10)
    assert w.last_result.status == "ok" and w.error.value == ""


def test_unavailable_techniques_are_disabled_with_the_reason(app):
    w = app()
    row = w.quant.rows["torchao-int4-weight"]
    assert row.enabled.disabled and "need a CUDA GPU" in row.about.value
    assert not w.quant.rows["sim"].enabled.disabled


def test_technique_rows_follow_the_chosen_device(app, monkeypatch):
    """On a (faked) CUDA machine: dynamic-int8 is CPU-only, torchao-int4-weight CUDA-only; the rows follow the input."""
    import torch

    import widgets.panels
    import workbench.execution

    monkeypatch.setattr(widgets.panels, "device_choices", lambda: ["auto", "cpu", "cuda:0"])
    monkeypatch.setattr(workbench.execution, "resolve_device",
                        lambda spec: torch.device("cuda:0" if spec == "auto" else spec))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    w = app()
    device = w.settings["Execution"].form.inputs["device"]
    int8, int4 = w.quant.rows["dynamic-int8"], w.quant.rows["torchao-int4-weight"]
    cpu_only, cuda_only = "run on the CPU only", "int4 weight-only kernels need a CUDA GPU"
    assert int8.enabled.disabled and "unavailable on cuda:0 (hf):</b> " in int8.about.value and cpu_only in int8.about.value
    assert not int4.enabled.disabled and "unavailable" not in int4.about.value
    device.value = "cpu"
    assert not int8.enabled.disabled and "unavailable" not in int8.about.value
    assert int4.enabled.disabled and "unavailable on cpu (hf):</b> " in int4.about.value and cuda_only in int4.about.value
    int8.enabled.value = True
    assert w.config().technique_specs[0].startswith("dynamic-int8") and not w.run_button.disabled
    device.value = "cuda:0"  # enabled, then impossible: switched off with the reason, and the run stays valid
    assert not int8.enabled.value and int8.enabled.disabled and cpu_only in int8.about.value
    assert w.config().techniques == () and w.problems.value == "" and not w.run_button.disabled
    device.value = "auto"
    assert int8.enabled.disabled and not int4.enabled.disabled
    from workbench.engines.hf import HFEngine  # the engine decides too: one that cannot apply sim

    monkeypatch.setattr(HFEngine, "can_apply", classmethod(lambda cls, name: "no sim here" if name == "sim" else None))
    w.refresh_availability()
    assert w.quant.rows["sim"].enabled.disabled and "unavailable on cuda:0 (hf):</b> no sim here" in \
        w.quant.rows["sim"].about.value


def test_engine_input_switches_pytorch_quantizers_off_and_leaves_pruning_and_gguf(app):
    """llamacpp: every PyTorch quantizer greyed out with the engine's reason, pruning and gguf stay; hf: gguf off."""
    import torch

    from workbench.engines.base import engine_class

    w = app()
    w.settings["Execution"].form.inputs["device"].value = "cpu"
    engine = w.settings["Execution"].form.inputs["engine"]  # an Engine input, its choices from the field
    assert tuple(engine.options) == RunConfig.__dataclass_fields__["engine"].metadata["choices"]
    gguf, int8 = w.quant.rows["gguf"], w.quant.rows["dynamic-int8"]
    why = engine_class("hf").can_apply("gguf")
    assert why and gguf.enabled.disabled and f"unavailable on cpu (hf):</b> {html.escape(why)}" in gguf.about.value
    int8.enabled.value = True
    engine.value = "llamacpp"
    assert not int8.enabled.value  # switched off: the new engine cannot run it
    for name, row in w.quant.rows.items():
        why = engine_class("llamacpp").can_apply(name)
        if name == "gguf":
            assert why is None and not row.enabled.disabled and "unavailable" not in row.about.value
        else:
            assert why and row.enabled.disabled, name
            assert f"unavailable on cpu (llamacpp):</b> {html.escape(why)}" in row.about.value
    for name, row in w.prune.rows.items():  # the engine refuses no pruning (the device may)
        assert row.reason == row.cls.unavailable(torch.device("cpu"))
        assert row.enabled.disabled == (row.reason is not None)
    assert {"structured", "magnitude", "wanda"} <= {n for n, r in w.prune.rows.items() if not r.enabled.disabled}
    gguf.enabled.value = True
    gguf.form.inputs["type"].value = "Q4_K_M"
    w.prune.rows["magnitude"].enabled.value = True
    config = w.config()
    assert config.engine == "llamacpp" and config.technique_specs[-1] == "gguf:type=Q4_K_M"
    assert [s.split(":")[0] for s in config.technique_specs] == ["magnitude", "gguf"]
    assert w.problems.value == "" and not w.run_button.disabled
    engine.value = "hf"  # back: gguf switched off with the reason, the PyTorch quantizers available again
    assert not gguf.enabled.value and gguf.enabled.disabled and "unavailable on cpu (hf)" in gguf.about.value
    assert not int8.enabled.disabled and [s.split(":")[0] for s in w.config().technique_specs] == ["magnitude"]
    assert w.problems.value == "" and not w.run_button.disabled


def test_impossible_combinations_are_explained_before_run(app):
    w = app()
    w.quant.rows["sim"].enabled.value = True
    w.quant.rows["dynamic-int8"].enabled.value = True
    assert "two quantizations" in w.problems.value and w.run_button.disabled
    w.quant.rows["sim"].enabled.value = False
    assert w.problems.value == "" and not w.run_button.disabled
    w.model_panel.form.inputs["dtype"].value = "bf16"
    assert "dynamic-int8" in w.problems.value and w.run_button.disabled
    w.model_panel.form.inputs["dtype"].value = "fp32"
    w.prune.rows["magnitude"].enabled.value = True
    assert w.problems.value == ""
    assert [s.split(":")[0] for s in w.config().technique_specs] == ["magnitude", "dynamic-int8"]  # prune first


def test_panels_are_generated_from_the_config_fields(app):
    import dataclasses

    w = app()
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    new_tokens = w.settings["Workload"].form.inputs["max_new_tokens"]
    assert new_tokens.tooltip == fields["max_new_tokens"].metadata["help"]
    assert (new_tokens.min, new_tokens.max) == (1, 32768)
    new_tokens.value = 7
    assert w.config().max_new_tokens == 7
    sim = w.quant.rows["sim"].form.inputs
    assert sim["granularity"].options == ("per-tensor", "per-channel", "per-group") and sim["bits"].max == 8
    w.quant.rows["sim"].enabled.value = True
    sim["bits"].value = 3
    assert w.config().technique_specs[0].startswith("sim:bits=3")
    w.settings["Workload"].form.inputs["prompt"].value = "hello"
    w.settings["Workload"].form.inputs["prompt_tokens"].value = 5  # an optional field: set it
    assert "either prompt or prompt_tokens" in w.problems.value and w.run_button.disabled


def test_model_panel_marks_presets_and_takes_hub_ids(app):
    w = app()
    w.model_panel.source.value = "preset:llama-124m"
    assert "random weights: speed and memory only" in w.model_panel.note.value
    assert any("random weights: speed and memory only" in label for label, _ in w.model_panel.source.options)
    w.model_panel.source.value = "__other__"
    w.model_panel.other.value = "someorg/some-model"
    assert w.config().model == "someorg/some-model"


def test_set_values_fills_the_inputs(app):
    w = app()
    w.set_values(model="preset:gpt2-124m", dtype="bf16", threads=2, max_new_tokens=9,
                 techniques=("magnitude:sparsity=0.25", "sim:bits=4"))
    cfg = w.config()
    assert (cfg.model, cfg.dtype, cfg.threads, cfg.max_new_tokens) == ("preset:gpt2-124m", "bf16", 2, 9)
    assert [s.split(",")[0] for s in cfg.technique_specs] == ["magnitude:sparsity=0.25", "sim:bits=4"]
    w.set_values(model="./my-model")
    assert w.config().model == "./my-model"
    with pytest.raises(ValueError, match="not RunConfig fields"):
        w.set_values(colour="blue")


def test_budget_line_follows_the_input(app):
    w = app()
    w.budget.value = 50
    assert w.live.layout.shapes[0].y0 == 50
    assert [a.text for a in w.live.layout.annotations if a.name == "budget"] == ["budget 50 ms"]
    assert w.live.layout.annotations[0].text.startswith("Per-token latency")  # subplot titles kept


def test_history_pareto_frontier_selection_comparison_and_export(app, tmp_path):
    store = Store(tmp_path / "runs.sqlite")  # runs made elsewhere (e.g. the CLI)
    cfg = RunConfig()
    fast_bad = store.add(fake_result(cfg, scale=0.5, ppl=40.0))  # fast, small, worse accuracy: frontier
    slow_good = store.add(fake_result(cfg, scale=2.0, ppl=10.0))  # slow, big, best accuracy: frontier
    dominated = store.add(fake_result(cfg, scale=2.0, ppl=50.0))  # slower and worse than fast_bad: not
    store.add_error(cfg, "it broke")
    w = app()
    pareto = w.history.pareto
    assert sorted(pareto.run_ids) == [fast_bad, slow_good, dominated]
    assert pareto.frontier_ids == [fast_bad, slow_good]
    assert list(pareto.widget.data[1].x) == [10.0, 40.0]
    assert "it broke" in w.history.table.value
    run_index = pareto.run_ids.index(dominated)
    pareto._clicked(pareto.widget.data[0], type("P", (), {"point_inds": [run_index]})(), None)
    w.history.select(fast_bad)
    assert w.history.selected == [dominated, fast_bad]
    assert "B / A" in w.history.comparison.value and "✓" in w.history.comparison.value
    assert len(pareto.widget.data[2].x) == 2
    w.history.y.value = "kl_vs_baseline"
    assert pareto.widget.layout.yaxis.title.text.startswith("KL vs unmodified")
    text = w.history.export_csv()
    assert text.count("\n") >= 5 and "data:text/csv;base64," in w.history.export_link.value
    assert (tmp_path / "workbench-results.csv").exists()


def test_sensitivity_panel_draws_a_report(app):
    from workbench.sensitivity import LayerSensitivity, SensitivityReport, WeightHistogram

    report = SensitivityReport("tiny", "sim:bits=3", 100, (
        LayerSensitivity("model.layers.0.mlp.up_proj", 0, "mlp.up_proj", 10, 12.0, 0.1),
        LayerSensitivity("model.layers.1.mlp.up_proj", 1, "mlp.up_proj", 10, 11.0, 0.3)),
        WeightHistogram("model.layers.1.mlp.up_proj", (0.0, 0.5, 1.0), (3, 7), (5, 5), 8), "test")
    calls = []
    w = app(analyzer=lambda model, spec, **kw: (calls.append(spec), report)[1])
    assert not w.sensitivity.start()  # nothing enabled yet, nothing typed
    assert "Enable a technique" in w.sensitivity.status.value
    w.quant.rows["sim"].enabled.value = True
    assert w.sensitivity.start()
    w.sensitivity.thread.join(10)
    assert calls[0].startswith("sim:") and [list(r) for r in w.sensitivity.plots.heatmap.z] == [[0.1], [0.3]]
    assert list(w.sensitivity.plots.before.y) == [3, 7]


@pytest.mark.slow
def test_real_core_through_the_app_fills_every_plot(app):
    from workbench.runner import run

    w = app(run)
    form = {**w.settings["Workload"].form.inputs, **w.settings["Measurement"].form.inputs,
            **w.settings["Accuracy"].form.inputs}
    form["max_new_tokens"].value, form["warmup"].value, form["repeats"].value = 6, 0, 2
    form["min_duration_s"].value, form["eval_tokens"].value, form["eval_context"].value = 0.0, 300, 64
    w.prune.rows["magnitude"].enabled.value = True
    assert w.start()
    w.wait(300)
    assert w.last_result is not None and w.last_result.status == "ok", w.error.value
    assert len(w.latency_plot.arrival.x) == 6
    assert len(w.memory_plot.bar.x) >= 4
    assert len(w.accuracy_plot.bar.x) == 3
    assert len(w.roofline_plot.bar.x) == 2
    assert len(w.history.pareto.widget.data[0].x) == 1
    assert w.text.value.count("wb-output") == 1 and len(w.last_result.output_text) > 0
    assert w.sensitivity.start()
    w.sensitivity.thread.join(300)
    assert w.sensitivity.last_report is not None and len(w.sensitivity.plots.heatmap.z) == 6


def test_execution_panel_shows_where_layers_live_and_how_busy_ranks_were(app, tmp_path):
    from dataclasses import replace

    from workbench.result import ParallelInfo, RankInfo

    info = ParallelInfo("split", 1, None, {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                           "model.layers.1": "disk", "model.layers.2": "disk"},
                        {"cpu": 1000, "disk": 3 * 1024 * 1024}, (RankInfo(0, "cpu", 2, 1, 0.87, 250.0),))

    class SplitRunner(ScriptedRunner):
        def __call__(self, config, on_event, should_stop):
            return replace(super().__call__(config, on_event, should_stop), parallel=info)

    w = app(SplitRunner())
    w.start()
    w.wait(10)
    text = w.execution.value
    assert "Execution: split" in text and "87%" in text and "model.layers.1-2" in text and "3.0 MiB" in text
    assert set(w.settings["Parallelism"].form.inputs) == {"device_map", "max_memory", "offload_folder",
                                                          "tensor_parallel", "data_parallel", "pipeline_parallel",
                                                          "micro_batches"}
    w.set_values(device_map="model.layers.0-2=disk", offload_folder=str(tmp_path / "offload"))
    assert w.config().device_map == "model.layers.0-2=disk"
    assert w.config().offload_folder == str(tmp_path / "offload")
    w.set_values(compile=True)
    assert "compile needs kv_cache=static" in w.problems.value and w.run_button.disabled


@pytest.mark.slow
def test_tensor_parallel_run_streams_live_in_the_app(app):
    from workbench.parallel.distributed import cpu_cores
    from workbench.runner import run

    if cpu_cores() < 2:
        pytest.skip("needs 2 CPU cores (one per rank)")
    w = app(run)
    drawn: list[int] = []
    original = w.latency_plot.add

    def spy(events):
        drawn.extend(events)
        return original(events)

    w.latency_plot.add = spy
    w.set_values(device="cpu", tensor_parallel=2, max_new_tokens=6, warmup=0, repeats=2, min_duration_s=0.0,
                 eval_tokens=0)
    assert w.start()
    w.wait(300)
    assert w.last_result is not None and w.last_result.status == "ok", w.error.value
    assert any(e.phase == "measure" for e in drawn)  # rank 0's tokens reached the plot while the ranks ran
    assert "Execution: tensor</b>, 2 ranks (gloo)" in w.execution.value and "<tr><td>1</td>" in w.execution.value


class ScriptedDistiller:
    """Emits a start metric and train steps like workbench.distill.distill; stops when asked."""

    def __init__(self, steps: int = 6, block: threading.Event | None = None):
        self.steps, self.block, self.configs = steps, block, []

    def __call__(self, config, on_event, should_stop):
        from types import SimpleNamespace

        from workbench.distill import DistillStart
        from workbench.events import MetricEvent, TrainEvent

        self.configs.append(config)
        on_event(MetricEvent("start", DistillStart(3.0, 4.0, 6_000_000, 3_000_000, "4 of 6 layers")))
        done = 0
        for step in range(1, self.steps + 1):
            if self.block is not None:
                self.block.wait(5)
            if should_stop():
                break
            on_event(TrainEvent(step, self.steps, 5.0 - 0.1 * step, 3.9 - 0.05 * step if step % 2 == 0 else None,
                                1000.0, 1e-3))
            done = step
        return SimpleNamespace(status="stopped" if done < self.steps else "ok", steps_done=done, wall_s=1.0,
                               best_step=done, model=f"student:{config.name}", teacher_perplexity=20.0,
                               start_perplexity=55.0, final_perplexity=30.0, teacher_params=6_000_000,
                               student_params=3_000_000, recovered=0.6, parallel=None)


def test_distillation_panel_draws_live_losses_and_offers_the_student(app):
    distiller = ScriptedDistiller()
    w = app(distiller=distiller)
    panel = w.distill
    panel.form.set_values({"steps": 6, "name": "my-student"})
    assert panel.start()
    panel.wait(10)
    assert distiller.configs[0].name == "my-student" and distiller.configs[0].steps == 6
    assert list(panel.plot.train.x) == [1, 2, 3, 4, 5, 6] and list(panel.plot.heldout.x) == [2, 4, 6]
    assert len(panel.plot.widget.layout.shapes) == 2  # teacher and untrained-student reference lines
    assert "55.00" in panel.summary.value and "30.00" in panel.summary.value and "student:my-student" in panel.summary.value
    assert not panel.use_button.disabled and not panel.start_button.disabled and panel.stop_button.disabled
    panel.use()
    assert w.model_panel.model() == "student:my-student"


def test_distillation_stop_and_bad_input(app):
    block = threading.Event()
    distiller = ScriptedDistiller(steps=50, block=block)
    w = app(distiller=distiller)
    panel = w.distill
    panel.form.set_values({"name": "no spaces allowed"})
    assert not panel.start() and "name" in panel.status.value and not distiller.configs
    panel.form.set_values({"name": "ok-name", "steps": 50})
    assert panel.start()
    assert not panel.start() and "already running" in panel.status.value
    panel.stop()
    block.set()
    panel.wait(10)
    assert panel.last_result.status == "stopped" and panel.last_result.steps_done < 50
    assert not panel.start_button.disabled


def test_run_and_stop_are_the_only_buttons_of_those_names(app):
    import ipywidgets as W

    def buttons(widget):
        if isinstance(widget, W.Button):
            yield widget
        for child in getattr(widget, "children", ()):
            yield from buttons(child)

    labels = [b.description for b in buttons(app())]
    assert labels.count("Run") == 1 and labels.count("Stop") == 1  # what DESIGN.md and the browser tests look for


def test_a_view_registered_before_the_first_app_keeps_the_built_in_views(monkeypatch):
    """The view modules were imported only while no view was registered: a user's view registered first (or this
    module's probe view, when its test built the worker's first app) hid every built-in one."""
    import sys

    from widgets import views

    class ProbeView(views.View):
        section = "probe"

    views.views()  # the real registry holds the built-in views, whatever this test imports again below
    for name in [m for m in sys.modules if m.startswith("widgets.views.")]:
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process (put back afterwards)
    monkeypatch.setattr(views, "VIEWS", {"probe": ProbeView})
    sections = [v.section for v in views.views()]
    assert "probe" in sections and "energy" in sections and len(sections) > 2


def test_each_section_is_drawn_by_its_registered_view(app, monkeypatch):
    """No if/elif over section names: a view registered for a section gets its events; energy has its line."""
    from dataclasses import replace as changed

    from widgets import views
    from workbench.measure.trackers.energy import EnergyStats

    shown = []

    class ProbeView(views.View):
        section = "probe"

        def show(self, value, seen):
            shown.append((value, sorted(seen)))

    class WithEnergy(ScriptedRunner):
        def __call__(self, config, on_event, should_stop):
            result = super().__call__(config, on_event, should_stop)
            energy = EnergyStats(0.0125, 31.5, "a test counter", 1.5, 120, 0.05, "package")
            on_event(MetricEvent("energy", energy))
            on_event(MetricEvent("probe", 7))
            return changed(result, sections={**result.sections, "energy": energy})

    monkeypatch.setitem(views.VIEWS, "probe", ProbeView)
    w = app(runner=WithEnergy())
    energy_view = next(v for v in w.views if v.section == "energy")
    assert "no run yet" in energy_view.widget.value and energy_view.widget in w.children[2].children
    w.run_button.click()
    w.wait(10)
    assert shown[0] == (7, ["accuracy", "energy", "latency", "memory", "probe", "roofline"])
    assert shown[-1][0] is None  # the final result has no probe section
    assert "0.0125 J per token, 31.5 W average" in energy_view.widget.value
    assert ("energy per token", "joules_per_token") in w.history.x.options
