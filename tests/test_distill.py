"""Distillation: a pruned `tiny` recovers, the student saves and reloads, runs as `student:NAME`, stops cleanly."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from workbench.distill import CurvePoint, DistillConfig, DistillResult, DistillStart, distill, distill_loss
from workbench.errors import ConfigError, ModelSourceError, WorkbenchError
from workbench.events import MetricEvent, StageEvent, TrainEvent

# Small enough for a few seconds on one core, large enough for a clear recovery.
FAST = dict(steps=24, batch_size=4, seq_len=64, lr=2e-3, warmup_steps=0, eval_every=8, eval_tokens=512,
            eval_context=128)
PROBE = torch.arange(1, 33).unsqueeze(0)  # (1, 32) token ids the logits are compared on


@pytest.fixture(scope="module")
def students_root(tmp_path_factory):
    """A temporary students folder for the whole module."""
    root = tmp_path_factory.mktemp("students")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_STUDENTS_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def distilled(students_root):
    """One distillation of structured-pruned tiny: (result, events, logits of the in-memory best student)."""
    import workbench.distill.train as dt

    events, saved = [], {}
    real_save = dt.save_student

    def spy(model, *args, **kwargs):
        with torch.no_grad():
            saved["logits"] = model(input_ids=PROBE).logits.clone()  # (1, 32, V)
        return real_save(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dt, "save_student", spy)
        result = distill(DistillConfig(name="half", **FAST), events.append)
    return result, events, saved["logits"]


def test_distillation_beats_the_pruned_start(distilled):
    result, _, _ = distilled
    assert result.status == "ok" and result.steps_done == FAST["steps"]
    assert result.teacher_perplexity < result.start_perplexity  # pruning hurt
    assert result.final_perplexity < 0.9 * result.start_perplexity  # distillation won a measurable part back
    assert result.recovered > 0.2
    assert result.student_params < result.teacher_params
    assert result.final_perplexity == pytest.approx(min(p.perplexity for p in result.curve))
    assert [p.step for p in result.curve] == [0, 8, 16, 24]


def test_saved_student_reloads_with_identical_logits(distilled):
    from transformers import AutoModelForCausalLM

    result, _, logits = distilled
    folder = Path(result.path)
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "distill.json", "README.md"} <= names
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        reloaded = model(input_ids=PROBE).logits  # (1, 32, V)
    assert torch.equal(reloaded, logits)
    card = json.loads((folder / "distill.json").read_text())
    assert DistillResult.from_dict(card) == result


def test_student_is_a_model_source_for_runs(distilled):
    from workbench.config import RunConfig
    from workbench.models.catalog import describe_sources
    from workbench.models.sources import resolve
    from workbench.runner import run

    result, _, _ = distilled
    assert resolve("student:half").kind == "student"
    run_result = run(RunConfig(model="student:half", warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=4,
                               eval_tokens=FAST["eval_tokens"], eval_context=FAST["eval_context"]))
    assert run_result.status == "ok" and run_result.model.params == result.student_params
    assert not run_result.model.random_weights
    assert run_result.accuracy.perplexity == pytest.approx(result.final_perplexity, rel=1e-4)
    rows = {r["source"]: r for r in describe_sources()}
    assert rows["student:half"]["kind"] == "student" and rows["student:half"]["params"] == result.student_params
    with pytest.raises(ModelSourceError, match="no saved student named 'nobody'"):
        resolve("student:nobody")


def test_events_stream_losses_and_references(distilled):
    result, events, _ = distilled
    steps = [e for e in events if isinstance(e, TrainEvent)]
    assert [e.step for e in steps] == list(range(1, FAST["steps"] + 1))
    assert [e.step for e in steps if e.heldout_loss is not None] == [8, 16, 24]
    assert all(e.kl is not None and e.kl >= 0 and e.tokens_per_s > 0 for e in steps)
    metrics = {e.section: e.value for e in events if isinstance(e, MetricEvent)}
    assert isinstance(metrics["start"], DistillStart) and metrics["result"] == result
    assert math.exp(metrics["start"].start_heldout_loss) == pytest.approx(result.start_perplexity)
    started = [e.stage for e in events if isinstance(e, StageEvent) and e.state == "start"]
    assert started == ["load", "student", "evaluate", "train", "save"]


def test_stop_keeps_the_best_checkpoint(students_root, tmp_path):
    from workbench.textio import calibration_text

    text = tmp_path / "notes.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    seen = []
    config = DistillConfig(name="stopped", student="layers:keep=3", text=str(text), **{**FAST, "steps": 500})
    # Stop is pressed while step 3's event is drawn: the job ends within one more step.
    result = distill(config, seen.append, should_stop=lambda: sum(isinstance(e, TrainEvent) for e in seen) >= 3)
    assert result.status == "stopped" and result.steps_done in (3, 4)
    assert result.curve[-1].step == result.steps_done  # the last weights were checked before choosing the best
    assert result.final_perplexity == pytest.approx(min(p.perplexity for p in result.curve))
    assert (students_root / "stopped" / "model.safetensors").exists()
    assert "kept decoder layers 0, 3, 5" in result.notes[0]


def test_layer_dropped_student_decodes_with_its_kv_cache(tiny):
    from workbench.distill.students import build_student, parse_student

    student, _ = build_student(parse_student("layers:keep=2"), tiny, lambda *a: None)
    student.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])  # (1, 6)
    with torch.no_grad():
        full = student(input_ids=ids).logits[:, -1]  # (1, V)
        past = student(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = student(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]  # (1, V)
    assert student.config.num_hidden_layers == 2
    assert torch.allclose(full, step, atol=1e-4)


def test_loss_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)  # (B, T, V)
    y = torch.randint(0, 11, (2, 5))
    loss, ce, kl = distill_loss(s, t, y, 3.0, 0.25)
    p, log_q = torch.softmax(t / 3, -1), torch.log_softmax(s / 3, -1)
    manual_kl = (p * (p.log() - log_q)).sum(-1).mean()
    assert kl == pytest.approx(float(manual_kl), rel=1e-5)
    assert loss == pytest.approx(0.75 * 9 * float(manual_kl) + 0.25 * float(ce), rel=1e-5)
    same = distill_loss(s, s, y, 2.0, 0.0)
    assert float(same[0]) == pytest.approx(0.0, abs=1e-6)
    only_ce = distill_loss(s, None, y, 2.0, 1.0)
    assert only_ce[2] is None and float(only_ce[0]) == pytest.approx(float(ce))


def test_config_round_trips_and_carries_help():
    config = DistillConfig(student="layers:keep=4+structured:mlp_ratio=0.5", steps=7, text="x.txt")
    assert DistillConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert all(f.metadata.get("help") for f in dataclasses.fields(DistillConfig))
    point = CurvePoint(3, 1.0, 2.0, None, 10.0, 1e-3)
    assert CurvePoint(**json.loads(json.dumps(dataclasses.asdict(point)))) == point


@pytest.mark.parametrize("changes, message", [
    (dict(student="layers:keep=0"), "at least 1"),
    (dict(student="layers:keep=two"), "whole numbers"),
    (dict(student="shrink:half"), "unknown student step 'shrink'"),
    (dict(student="layers:keep=2+model:tiny"), "first step"),
    (dict(student="layers:indices=1|1"), "twice"),
    (dict(student="structured:heads_ratio=2"), "heads_ratio must be in"),
    (dict(name="my student!"), "name must be"),
    (dict(teacher="preset:llama-124m"), "random weights"),
    (dict(steps=0), "steps must be in"),
    (dict(temperature=0.0), "temperature must be in"),
    (dict(ce_weight=1.5), "ce_weight must be in"),
    (dict(text="  "), "text is empty"),
])
def test_bad_settings_fail_on_construction(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        DistillConfig(**changes)
    assert "\n" not in str(err.value)


def _tiny_llama(folder, vocab_size: int, tokenizer) -> str:
    """A 1-layer random Llama saved with `tokenizer`: a would-be student."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_bad_inputs_get_one_sentence(students_root, tmp_path, tiny):
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    short.write_text("def f(): pass")
    other = tmp_path / "other-tok"
    shutil.copytree(_tiny_llama(tmp_path / "tmp-other", 4096, tiny.tokenizer), other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    ids = vocab["model"]["vocab"]
    first, second = list(ids)[300:302]
    ids[first], ids[second] = ids[second], ids[first]  # same size, two tokens swapped
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    cases = [
        (dict(student="layers:keep=6"), "not fewer than the teacher's"),
        (dict(student="structured:heads_ratio=0,mlp_ratio=0"), "not fewer than the teacher's"),
        (dict(text=str(tmp_path / "missing.txt")), "does not exist"),
        (dict(text=str(empty)), "is empty"),
        (dict(text=str(binary)), "is not UTF-8"),
        (dict(text=str(short)), "too few for one training window"),
        (dict(student=f"model:{_tiny_llama(tmp_path / 'wide', 5000, tiny.tokenizer)}"), "predicts 5000 tokens"),
        (dict(student=f"model:{other}"), "another tokenizer"),
        (dict(name="half-again", teacher="student:nobody"), "no saved student named"),
    ]
    (students_root / "taken").mkdir(exist_ok=True)
    cases.append((dict(name="taken"), "already exists"))
    for changes, message in cases:
        with pytest.raises(WorkbenchError, match=message) as err:
            distill(DistillConfig(**{"name": "bad", **FAST, "steps": 1, **changes}))
        assert "\n" not in str(err.value), changes
    assert not (students_root / "bad").exists()


def test_cli_json_and_usage_errors(students_root, capsys):
    from workbench.cli import main

    args = ["distill", "--student", "layers:keep=2", "--name", "cli-student", "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--eval-every", "1", "--eval-tokens", "64", "--eval-context", "64", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "ok" and out["model"] == "student:cli-student" and out["steps_done"] == 2
    assert len(out["curve"]) == 3 and "recovered" in out
    assert main(args) == 1  # the name is taken now
    failed = json.loads(capsys.readouterr().out)
    assert failed["status"] == "error" and "already exists" in failed["error"]
    assert main(["distill", "--name", "no spaces please"]) == 2
    assert "name must be" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        DistillConfig(student="")
