"""Distillation students: parse a student spec, build the student from the teacher, save and list students.

A student spec is one or more steps joined by `+`, applied in order:

- `structured:heads_ratio=H,mlp_ratio=M` — the `structured` pruning technique (whole heads and MLP channels cut
  out of every layer, scored on calibration text);
- `layers:keep=N` — keep N evenly spaced decoder layers (the first and the last included), or
  `layers:indices=0|2|5` — keep exactly these layers;
- `model:SPEC` — start from an existing model (any `--model` value) instead of a copy of the teacher; it must
  use the teacher's tokenizer. First step only.

Without `model:` the student starts as a copy of the teacher, so every weight it keeps is the teacher's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.errors import ConfigError
from workbench.models.loader import Loaded, load_model
from workbench.models.sources import STUDENT_NAME, TORCH_DTYPES, resolve, saved_students
from workbench.paths import students_dir
from workbench.techniques import structured  # noqa: F401 - registers the technique students are cut with
from workbench.techniques.base import ApplyContext, TechniqueConfig, handler_for, parse_spec

logger = logging.getLogger(__name__)

CARD_FILE = "distill.json"
STEP_HELP = ("structured:heads_ratio=H,mlp_ratio=M, layers:keep=N, layers:indices=I|J|..., model:SPEC "
             "(first step only), joined by '+'")


@dataclass(frozen=True)
class KeepLayers:
    """Keep some decoder layers: `count` evenly spaced ones, or exactly `indices`."""

    name: ClassVar[str] = "layers"
    count: int | None = None
    indices: tuple[int, ...] = ()

    def chosen(self, n_layers: int) -> list[int]:
        """The layer indices kept out of `n_layers` (ConfigError when the choice does not fit)."""
        if self.indices:
            bad = [i for i in self.indices if not 0 <= i < n_layers]
            if bad:
                raise ConfigError(f"layers:indices names layer {bad[0]}, but the model has layers 0..{n_layers - 1}")
            return sorted(set(self.indices))
        if self.count > n_layers:
            raise ConfigError(f"layers:keep={self.count} asks for more layers than the model's {n_layers}")
        if self.count == 1:
            return [0]
        return [math.floor(i * (n_layers - 1) / (self.count - 1) + 0.5) for i in range(self.count)]


@dataclass(frozen=True)
class FromModel:
    """Start from an existing model (a `--model` value) instead of a copy of the teacher."""

    name: ClassVar[str] = "model"
    source: str


StudentStep = KeepLayers | FromModel | TechniqueConfig


def _parse_layers(rest: str) -> KeepLayers:
    """`keep=N` or `indices=I|J|...`."""
    key, eq, raw = (part.strip() for part in rest.partition("="))
    if not eq or key not in ("keep", "indices"):
        raise ConfigError(f"layers:{rest} is not understood; write layers:keep=N or layers:indices=I|J|...")
    try:
        numbers = tuple(int(i) for i in raw.split("|"))
    except ValueError:
        raise ConfigError(f"layers:{rest} needs whole numbers, e.g. layers:keep=4 or layers:indices=0|2|5") from None
    if key == "keep":
        if len(numbers) != 1 or numbers[0] < 1:
            raise ConfigError(f"layers:keep takes one number, at least 1; got {raw!r}")
        return KeepLayers(count=numbers[0])
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"layers:indices lists a layer twice: {raw}")
    return KeepLayers(indices=numbers)


def _parse_structured(rest: str) -> TechniqueConfig:
    """The `structured` pruning technique's own spec."""
    return parse_spec("structured" + (":" + rest if rest else ""))


def _parse_model(rest: str) -> FromModel:
    if not rest.strip():
        raise ConfigError("model: needs a model source, e.g. model:student:small or model:./my-model")
    return FromModel(rest.strip())


_PARSERS: dict[str, Callable[[str], StudentStep]] = {"layers": _parse_layers, "structured": _parse_structured,
                                                      "model": _parse_model}


def parse_student(spec: str) -> tuple[StudentStep, ...]:
    """A student spec -> its steps, validated (ConfigError with one sentence on anything wrong)."""
    parts = [p.strip() for p in spec.split("+")]
    if not spec.strip() or not all(parts):
        raise ConfigError(f"the student spec {spec!r} has an empty step; steps: {STEP_HELP}")
    steps = []
    for part in parts:
        name, _, rest = part.partition(":")
        parser = _PARSERS.get(name.strip())
        if parser is None:
            raise ConfigError(f"unknown student step {name.strip()!r}; steps: {STEP_HELP}")
        steps.append(parser(rest))
    if any(isinstance(s, FromModel) for s in steps[1:]):
        raise ConfigError("model:SPEC can only be the first step of a student spec (the model the others start from)")
    return tuple(steps)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """`model.model.layers` (Llama, Qwen2, Mistral, ... layouts); ConfigError for other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"cannot drop layers of a {type(model).__name__}: its decoder layers are not at "
                          "model.model.layers")
    return layers


def keep_layers(step: KeepLayers, ctx: ApplyContext) -> None:
    """Rebuild the decoder with only the chosen layers; re-number their KV-cache slots; update the config."""
    layers = decoder_layers(ctx.model)
    kept = step.chosen(len(layers))
    ctx.model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(ctx.model.model.layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by position in the new stack
    cfg = ctx.model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    ctx.notes.append(f"kept decoder layers {', '.join(map(str, kept))} of 0..{len(layers) - 1}")


def _apply_technique(step: TechniqueConfig, ctx: ApplyContext) -> None:
    result = handler_for(step)(step, ctx)
    if result is not None:
        ctx.model = result


_BUILDERS: dict[type, Callable[[Any, ApplyContext], None]] = {KeepLayers: keep_layers}


def check_same_tokenizer(teacher: Loaded, student: Loaded) -> None:
    """Refuse a student whose tokens are not the teacher's: the loss compares distributions token by token."""
    t_vocab, s_vocab = teacher.model.config.vocab_size, student.model.config.vocab_size
    why = "distillation compares the two models' next-token distributions token by token"
    if t_vocab != s_vocab:
        raise ConfigError(f"the student {student.source.spec!r} predicts {s_vocab} tokens and the teacher "
                          f"{teacher.source.spec!r} {t_vocab}: {why}, so both need the same tokenizer")
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ConfigError(f"the student {student.source.spec!r} uses another tokenizer than the teacher "
                          f"{teacher.source.spec!r} (same size, different tokens): {why}, so both need the same one")


def build_student(steps: tuple[StudentStep, ...], teacher: Loaded,
                  on_progress: Callable[[str, float | None], None]) -> tuple[torch.nn.Module, list[str]]:
    """The student (fp32, on the teacher's device, train-ready) and notes on what each step did."""
    rest, notes = steps, []
    if steps and isinstance(steps[0], FromModel):
        student = load_model(resolve(steps[0].source), "fp32", teacher.device, seed=0)
        check_same_tokenizer(teacher, student)
        model, rest = student.model, steps[1:]
        notes.append(f"started from {steps[0].source}")
    else:
        model = copy.deepcopy(teacher.model).float()
    ctx = ApplyContext(model, teacher.tokenizer, teacher.device, "fp32", on_progress)
    for step in rest:
        _BUILDERS.get(type(step), _apply_technique)(step, ctx)
    for p in ctx.model.parameters():
        p.requires_grad_(True)
    return ctx.model, notes + ctx.notes


def layout(model: torch.nn.Module) -> str:
    """`4 layers, 4 heads (4 KV), MLP 384, hidden 256` from a model's config."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return (f"{c.num_hidden_layers} layers, {heads} heads ({kv} KV), MLP {getattr(c, 'intermediate_size', '?')}, "
            f"hidden {c.hidden_size}")


def check_name_free(name: str, overwrite: bool) -> Path:
    """The folder a student named `name` goes to; ConfigError when it is taken and overwrite is off."""
    if not STUDENT_NAME.match(name):
        raise ConfigError(f"{name!r} is not a student name: use letters, digits, '-' and '_'")
    folder = students_dir() / name
    if folder.exists() and not overwrite:
        raise ConfigError(f"a student named {name!r} already exists in {folder.parent}; choose another name or "
                          "pass overwrite (--overwrite)")
    return folder


def save_student(model: torch.nn.Module, tokenizer: Any, name: str, overwrite: bool, save_dtype: str,
                 card: dict[str, Any]) -> Path:
    """Write the student as a Hugging Face folder (safetensors, config, tokenizer, distill.json, README.md)."""
    final = check_name_free(name, overwrite)
    partial = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    dtype = TORCH_DTYPES[save_dtype]
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    to_save.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / CARD_FILE).write_text(json.dumps(card, indent=1), encoding="utf-8")
    (partial / "README.md").write_text(model_card(card), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    logger.info("saved student %s to %s", name, final)
    return final


def model_card(card: dict[str, Any]) -> str:
    """The README saved beside a student's weights."""
    c = card["config"]
    return (f"# `student:{card['name']}`\n\nDistilled by `workbench distill` from `{c['teacher']}` with student "
            f"`{c['student']}` ({card['student_layout']}, {card['student_params']:,} parameters; teacher "
            f"{card['teacher_params']:,}).\n\n| held-out perplexity | value |\n| --- | --- |\n"
            f"| teacher | {card['teacher_perplexity']:.2f} |\n| student before distillation | "
            f"{card['start_perplexity']:.2f} |\n| student after {card['best_step']} steps (saved) | "
            f"{card['final_perplexity']:.2f} |\n\nPerplexity on {card['eval_tokens']} tokens of the reference corpus's "
            f"held-out split, in windows of {c['eval_context']}. {card['steps_done']} of {c['steps']} steps of "
            f"{c['batch_size']} x {c['seq_len']} tokens, lr {c['lr']:g}, temperature {c['temperature']:g}, CE weight "
            f"{c['ce_weight']:g}. `{CARD_FILE}` holds every setting and the curve.\n")


def describe_students() -> list[dict[str, Any]]:
    """Rows for `workbench models`: one per saved student, from its distill.json."""
    rows = []
    for name in saved_students():
        try:
            card = json.loads((students_dir() / name / CARD_FILE).read_text(encoding="utf-8"))
            note = (f"distilled from {card['config']['teacher']} ({card['config']['student']}); held-out perplexity "
                    f"{card['final_perplexity']:.1f} (before {card['start_perplexity']:.1f}, teacher "
                    f"{card['teacher_perplexity']:.1f})")
            params = card["student_params"]
        except (OSError, ValueError, KeyError, TypeError):
            note, params = "saved student (no readable distill.json)", None
        rows.append({"source": f"student:{name}", "kind": "student", "params": params, "notes": note})
    return rows
