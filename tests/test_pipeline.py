"""Pipeline parallelism: stages over gloo CPU ranks, a GPipe schedule, per-stage busy time and the bubble.

Run under torchrun by `test_stage_generator_greedy_tokens_equal_one_process`:
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_pipeline.py OUT.pt
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench import errors
from workbench.config import RunConfig
from workbench.measure.trackers.pipeline import PipelineStats, PipelineTracker, StageBusy
from workbench.parallel import distributed as d
from workbench.parallel.distributed import check_stages
from workbench.parallel.pipeline import predicted_bubble, stage_layers

ROOT = Path(__file__).resolve().parents[1]
needs_two_cores = pytest.mark.skipif(d.cpu_cores() < 2, reason="needs 2 CPU cores (one per rank)")
PP = dict(model="tiny", pipeline_parallel=2, micro_batches=2, batch_size=4)


# --- settings refused in one sentence -----------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(micro_batches=1), r"micro_batches 1 < pipeline_parallel 2 would leave the stages idle 50% .* must be "
                            r"at least 2"),
    (dict(micro_batches=3, pipeline_parallel=3, batch_size=4), "batch_size 4 must be a multiple of micro_batches 3"),
    (dict(micro_batches=8), "batch_size 4 is smaller than micro_batches 8"),
    (dict(engine="llamacpp", batch_size=2), "the llamacpp engine runs in one process: pipeline_parallel needs "
                                            "engine hf"),
    (dict(tensor_parallel=2), "pipeline_parallel does not combine with tensor_parallel"),
    (dict(data_parallel=2), "pipeline_parallel does not combine with tensor_parallel, data_parallel"),
    (dict(device_map="auto"), "or a device_map"),
    (dict(kv_cache="static"), "dynamic KV cache per stage"),
    (dict(kv_cache="quantized"), "dynamic KV cache per stage"),
    (dict(draft_model="tiny"), "batch_size must be 1"),  # speculative decoding's own rule: pipelines need M >= 2
    (dict(pipeline_parallel=1), "micro_batches 2 splits the batch between pipeline stages"),
])
def test_bad_pipeline_settings_are_refused_in_one_sentence(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{**PP, **changes})


def test_more_stages_than_layers_is_refused_before_a_rank_starts():
    config = RunConfig(model="tiny", pipeline_parallel=7, micro_batches=7, batch_size=7)
    with pytest.raises(errors.ConfigError, match="tiny has 6 layers: use at most 6 stages"):
        d.layout(config)
    check_stages(RunConfig(model="tiny", pipeline_parallel=6, micro_batches=6, batch_size=6), 6)  # one layer each


def test_a_model_that_is_not_a_llama_style_decoder_is_refused_before_a_rank_starts():
    """Checked on the model built on the meta device: GPT-2 is refused by layout(), before any rank loads it."""
    config = RunConfig(model="preset:gpt2-124m", pipeline_parallel=2, micro_batches=2, batch_size=2)
    with pytest.raises(errors.ConfigError, match="GPT2LMHeadModel is not one: use data_parallel"):
        d.layout(config)


def test_cli_flags_reach_the_config():
    import argparse

    from workbench.flags import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    config = config_from_args(parser.parse_args(["--pipeline-parallel", "2", "--micro-batches", "4",
                                                 "--batch-size", "8"]))
    assert (config.pipeline_parallel, config.micro_batches) == (2, 4)
    with pytest.raises(ValueError, match="must be at least 2"):
        config_from_args(parser.parse_args(["--pipeline-parallel", "2"]))


def test_worker_names_pipeline_parallel_when_the_world_does_not_match():
    from workbench.parallel.worker import _check_world, _Ctx

    with pytest.raises(errors.ConfigError, match="asks for pipeline_parallel 2"):
        _check_world(_Ctx(RunConfig(**PP), 0, 3, 0, 3))


def test_published_dashboards_count_pipeline_ranks_as_processes():
    from workbench.serve.publish import PublishPolicy, check_run

    with pytest.raises(errors.ConfigError, match="parallel processes"):
        check_run(PublishPolicy(max_processes=1), RunConfig(**PP))


def test_parallelism_panel_has_the_pipeline_inputs():
    from widgets.panels import SettingsPanel

    form = SettingsPanel("Parallelism").form
    form.inputs["pipeline_parallel"].value, form.inputs["micro_batches"].value = 2, 4
    assert {k: form.values()[k] for k in ("pipeline_parallel", "micro_batches")} == {"pipeline_parallel": 2,
                                                                                     "micro_batches": 4}


def test_a_model_that_is_not_a_llama_style_decoder_is_refused_in_one_sentence():
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.parallel.pipeline import PipelineGenerator

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    config = SimpleNamespace(max_new_tokens=2, micro_batches=2, attn_implementation="sdpa")
    with pytest.raises(errors.ConfigError, match="GPT2LMHeadModel is not one: use data_parallel"):
        PipelineGenerator(model, torch.device("cpu"), config, [[1, 2], [3, 4]], lambda: False, 0, 2)


# --- the split and the bubble ------------------------------------------------------------------------

def test_stages_are_contiguous_and_cover_every_layer_once():
    assert stage_layers(6, 2) == [range(0, 3), range(3, 6)]
    assert stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert [i for r in stage_layers(30, 4) for i in r] == list(range(30))


def test_predicted_bubble_is_gpipes():
    assert predicted_bubble(2, 1) == pytest.approx(0.5)
    assert predicted_bubble(2, 4) == pytest.approx(0.2)
    assert predicted_bubble(4, 8) == pytest.approx(3 / 11)


def test_ranks_merge_into_every_stage_and_the_measured_bubble():
    def rank(stage, first, last, busy, wall):
        return PipelineStats((StageBusy(stage, first, last, busy),), 4, 10, wall, None, 0.2)

    merged = PipelineTracker.merge([rank(0, 0, 2, 0.6, 1.0), rank(1, 3, 5, 0.8, 1.1)], "pipeline")
    assert [s.stage for s in merged.stages] == [0, 1] and merged.wall_s == 1.1
    assert merged.measured_bubble == pytest.approx(1 - 1.4 / (2 * 1.1))
    assert merged.predicted_bubble == pytest.approx(0.2)
    rows = dict(PipelineTracker.rows(merged))
    assert "bubble 36% measured, 20% predicted" in rows["pipeline"]
    assert "stage 1 (layers 3-5) 0.800 s" in rows["stage busy"]
    assert PipelineTracker.merge([rank(0, 0, 2, 0.6, 1.0), None], "pipeline") is None


# --- real ranks ----------------------------------------------------------------------------------------

def _eos_first(logits: torch.Tensor, eos: int) -> torch.Tensor:
    """logits (B, T, V) with EOS above every other token."""
    logits = logits.clone()
    logits[..., eos] = logits.abs().max() * 10 + 10
    return logits


def _ranks_main(out: str) -> None:
    """Under torchrun: every rank builds its stage; rank 0 saves the pipelined greedy tokens for M = 1, 2, 4."""
    from workbench.measure.latency import TokenClock
    from workbench.models.loader import load_model
    from workbench.models.sources import resolve
    from workbench.parallel.pipeline import PipelineGenerator

    d.init_process_group(torch.device("cpu"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    loaded = load_model(resolve("tiny"), "fp32", torch.device("cpu"))
    prompts = ["def main():\n    return", "The for statement is", "import os\nimport", "class Point:\n    def"]
    ids = [loaded.tokenizer(p).input_ids[:4] for p in prompts]
    saved = {"ids": torch.tensor(ids)}
    for attn in ("sdpa", "eager"):
        loaded.model.config._attn_implementation = attn
        for m in (1, 2, 4):
            # M = 1 < N is refused by RunConfig, but the schedule runs it: what the generator reads of a config
            config = SimpleNamespace(max_new_tokens=10, micro_batches=m, attn_implementation=attn)
            gen = PipelineGenerator(loaded.model, torch.device("cpu"), config, ids, lambda: False, rank, world)
            rows = gen.generate(TokenClock(torch.device("cpu"))).rows
            saved[f"{attn}/{m}"] = torch.tensor(rows)
            saved[f"{attn}/{m}/busy"] = gen.counters.busy_s > 0 and gen.counters.steps == 10
    # EOS the top logit everywhere: the stages must pick what fixed-length decoding picks, never EOS
    eos = loaded.tokenizer.eos_token_id
    loaded.model.config._attn_implementation = "sdpa"  # the loop above left it eager
    loaded.model.lm_head.register_forward_hook(lambda module, args, out: _eos_first(out, eos))
    config = SimpleNamespace(max_new_tokens=10, micro_batches=2, attn_implementation="sdpa")
    gen = PipelineGenerator(loaded.model, torch.device("cpu"), config, ids, lambda: False, rank, world,
                            eos_token_id=eos)
    saved["eos-first"] = torch.tensor(gen.generate(TokenClock(torch.device("cpu"))).rows)
    if rank == 0:
        torch.save(saved, out)
    d.destroy()


@needs_two_cores
def test_stage_generator_greedy_tokens_equal_one_process(tiny, tmp_path):
    out = tmp_path / "pp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/test_pipeline.py", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out)
    with torch.no_grad():
        greedy = tiny.model.generate(saved["ids"], attention_mask=torch.ones_like(saved["ids"]), max_new_tokens=10,
                                     min_new_tokens=10, do_sample=False)[:, saved["ids"].shape[1]:]
    for attn in ("sdpa", "eager"):
        for m in (1, 2, 4):
            assert torch.equal(saved[f"{attn}/{m}"], greedy), (attn, m)
            assert saved[f"{attn}/{m}/busy"]
    eos = tiny.tokenizer.eos_token_id
    hook = tiny.model.lm_head.register_forward_hook(lambda module, args, out: _eos_first(out, eos))
    try:
        with torch.no_grad():
            fixed = tiny.model.generate(saved["ids"], attention_mask=torch.ones_like(saved["ids"]), max_new_tokens=10,
                                        min_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    finally:
        hook.remove()
    assert torch.equal(saved["eos-first"], fixed[:, saved["ids"].shape[1]:])
    assert not (saved["eos-first"] == eos).any()


@needs_two_cores
def test_pipeline_run_matches_one_process_and_reports_the_bubble(fast):
    from workbench.report import format_result
    from workbench.runner import run

    config = fast(device="cpu", pipeline_parallel=2, micro_batches=2, batch_size=4, eval_tokens=0, threads=1)
    result = run(config)
    single = run(fast(device="cpu", batch_size=4, eval_tokens=0, threads=1))
    assert result.status == "ok", result.error
    assert result.parallel.kind == "pipeline" and result.parallel.world_size == 2
    assert result.outputs == single.outputs  # the same greedy continuation of every prompt
    p = result.pipeline
    assert [(s.stage, s.first_layer, s.last_layer) for s in p.stages] == [(0, 0, 2), (1, 3, 5)]
    assert all(s.busy_s > 0 for s in p.stages) and p.steps == 2 * config.max_new_tokens  # two timed calls
    assert 0 < p.measured_bubble < 1 and p.predicted_bubble == pytest.approx(1 / 3)
    assert sum(s.busy_s for s in p.stages) <= 2 * p.wall_s
    data = json.loads(result.to_json())
    assert data["pipeline"]["micro_batches"] == 2 and len(data["pipeline"]["stages"]) == 2
    assert "2 stages x 2 micro-batches" in format_result(result)
    assert single.pipeline is None
    assert any(w.startswith("pipeline parallel: each of the 2 ranks loads the whole model") for w in result.warnings)


@pytest.mark.gpu
def test_more_stages_than_gpus_is_refused():
    n = torch.cuda.device_count() + 1
    config = RunConfig(model="tiny", device="cuda", pipeline_parallel=n, micro_batches=n, batch_size=n)
    with pytest.raises(errors.ConfigError, match=f"pipeline_parallel {n} needs {n} GPUs"):
        d.layout(config)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one stage each, NCCL)")
def test_two_gpu_stages_over_nccl_match_one_gpu(fast):
    from workbench.runner import run

    config = fast(device="cuda", pipeline_parallel=2, micro_batches=2, batch_size=4, eval_tokens=0)
    result, single = run(config), run(fast(device="cuda", batch_size=4, eval_tokens=0))
    assert result.parallel.backend == "nccl" and result.outputs == single.outputs
    assert result.pipeline is not None and 0 < result.pipeline.measured_bubble < 1


if __name__ == "__main__":
    _ranks_main(sys.argv[1])
