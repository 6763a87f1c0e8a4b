"""Input panels: model, techniques (generated from the registry), and the run settings (from RunConfig)."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import torch

from widgets.forms import FieldForm, label
from workbench.config import RunConfig
from workbench.engines.base import engine_class
from workbench.models.presets import PRESETS
from workbench.techniques import TechniqueConfig, load_all

OTHER = "__other__"
RANDOM_NOTE = "random weights: speed and memory only"


def model_choices(policy: Any = None) -> list[tuple[str, str]]:
    """Dropdown options: the reference model, the presets (marked), and a free-text entry (or the policy's list)."""
    from workbench.models.sources import saved_students

    if policy is not None:
        return [(_describe(m), m) for m in policy.model_choices(saved_students())]
    options = [("tiny — the reference model (real weights)", "tiny")]
    options += [(f"student:{name} — distilled (real weights)", f"student:{name}") for name in saved_students()]
    options += [(f"preset:{name} — {RANDOM_NOTE}", f"preset:{name}") for name in sorted(PRESETS)]
    return options + [("hub id or local folder…", OTHER)]


def _describe(model: str) -> str:
    if model == "tiny":
        return "tiny — the reference model (real weights)"
    if model.startswith("preset:"):
        return f"{model} — {RANDOM_NOTE}"
    return f"{model} — distilled (real weights)" if model.startswith("student:") else model


def device_choices() -> list[str]:
    """Only the devices this machine has."""
    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class ModelPanel:
    """Which model, in which dtype."""

    def __init__(self, policy: Any = None) -> None:
        tips = {f.name: f.metadata["help"] for f in RunConfig.__dataclass_fields__.values()}
        self.policy = policy  # a PublishPolicy: only its models, and no trust/pickle inputs at all
        options = model_choices(policy)
        self.source = W.Dropdown(options=options, value=options[0][1], description="model",
                                 tooltip=tips["model"], style={"description_width": "60px"}, layout={"width": "460px"})
        self.other = W.Text(placeholder="org/name or /path/to/folder", description="hub id / folder",
                            style={"description_width": "110px"}, layout={"width": "460px", "display": "none"})
        self.form = FieldForm(RunConfig, ["dtype"] if policy else ["dtype", "trust_remote_code", "allow_pickle"])
        self.note = W.HTML()
        self.source.observe(self._on_source, "value")
        self.box = W.VBox([self.source, self.other, self.form.box, self.note])
        self._on_source()

    def _on_source(self, *_: Any) -> None:
        other = self.source.value == OTHER
        self.other.layout.display = "" if other else "none"
        random = str(self.source.value).startswith("preset:")
        self.note.value = (f"<span class='wb-note'>{RANDOM_NOTE}: accuracy is not measured for this model</span>"
                           if random else "")

    def set_model(self, model: str) -> None:
        """Select a source from the list (re-read, so new students appear), or type it as a hub id / folder."""
        self.source.options = model_choices(self.policy)
        if model in {value for _, value in self.source.options}:
            self.source.value = model
        elif self.policy is not None:
            self.policy.check_model(model)  # a locked app has no free-text source
        else:
            self.source.value, self.other.value = OTHER, model

    def model(self) -> str:
        """The --model value."""
        return self.other.value.strip() if self.source.value == OTHER else self.source.value

    def values(self) -> dict[str, Any]:
        """RunConfig fields this panel sets."""
        return {"model": self.model(), **self.form.values()}

    def observe(self, fn: Any) -> None:
        """Call fn on any change."""
        for w in (self.source, self.other):
            w.observe(fn, "value")
        self.form.observe(fn)


class TechniqueRow:
    """One technique: an enable checkbox, its summary, its parameters, or why it cannot run here."""

    def __init__(self, cls: type, device: torch.device) -> None:
        self.cls = cls
        self.reason: str | None = None
        self.enabled = W.Checkbox(value=False, description=cls.name, indent=False, layout={"width": "200px"},
                                  tooltip=cls.summary)
        self.form = FieldForm(cls)
        self.form.box.layout.display = "none"
        self.form.box.layout.margin = "0 0 0 24px"
        self.about = W.HTML()
        self.enabled.observe(lambda c: setattr(self.form.box.layout, "display", "" if c["new"] else "none"), "value")
        self.box = W.VBox([W.HBox([self.enabled, self.about]), self.form.box])
        self.refresh(device)

    def refresh(self, device: torch.device, engine: str = "hf") -> None:
        """Re-evaluate whether the technique can run on `device` with `engine`; if not, switch it off and say why."""
        self.reason = engine_class(engine).can_apply(self.cls.name) or self.cls.unavailable(device)
        if self.reason is not None:
            self.enabled.value = False
        self.enabled.disabled = self.reason is not None
        where = html.escape(f"{device} ({engine})")
        why = f" <b>unavailable on {where}:</b> {html.escape(self.reason)}" if self.reason else ""
        simulated = "" if self.cls.simulated is False else " (simulated)"
        self.about.value = f"<span class='wb-summary'>{html.escape(self.cls.summary)}{simulated}</span>{why}"

    def config(self) -> TechniqueConfig | None:
        """The technique's config when enabled (ValueError if a parameter is invalid), else None."""
        return self.cls(**self.form.values()) if self.enabled.value else None

    def spec(self) -> str | None:
        """`NAME:key=value,...` when enabled (ValueError if a parameter is invalid), else None."""
        config = self.config()
        return None if config is None else config.spec()


class TechniquesPanel:
    """Every registered technique of one kind (quant or prune), generated from the registry."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.rows = {name: TechniqueRow(cls, device) for name, cls in sorted(load_all().items()) if cls.kind == kind}
        self.box = W.VBox([r.box for r in self.rows.values()])

    def refresh(self, device: torch.device, engine: str = "hf") -> None:
        """Re-evaluate every row (called when the device or engine input, or anything that decides them, changes)."""
        for row in self.rows.values():
            row.refresh(device, engine)

    def configs(self) -> list[TechniqueConfig]:
        """Enabled techniques' configs, in panel order (what RunConfig.techniques holds)."""
        return [c for c in (r.config() for r in self.rows.values()) if c is not None]

    def specs(self) -> list[str]:
        """Enabled techniques' specs, in panel order."""
        return [c.spec() for c in self.configs()]

    def observe(self, fn: Any) -> None:
        """Call fn on any change."""
        for r in self.rows.values():
            r.enabled.observe(fn, "value")
            r.form.observe(fn)

    def set_enabled(self, specs: dict[str, dict[str, Any]]) -> None:
        """Enable these techniques (name -> parameters), disable the rest."""
        for name, row in self.rows.items():
            row.enabled.value = name in specs and row.reason is None
            if name in specs:
                row.form.set_values(specs[name])


# The inputs whose value decides which techniques can run.
AVAILABILITY_INPUTS = ("device", "engine")

SETTINGS_GROUPS = {
    "Workload": ["prompt", "prompt_tokens", "max_new_tokens", "batch_size", "seed"],
    "Execution": ["device", "engine", "threads", "interop_threads", "attn_implementation", "kv_cache", "kv_bits",
                  "kv_backend", "draft_model", "draft_tokens", "compile", "compile_mode"],
    "Parallelism": ["device_map", "max_memory", "offload_folder", "tensor_parallel", "data_parallel",
                    "pipeline_parallel", "micro_batches"],
    "Measurement": ["warmup", "repeats", "min_duration_s", "max_repeats", "token_events"],
    "Accuracy": ["eval_tokens", "eval_context"],
}


class SettingsPanel:
    """The run settings other than model and techniques, one group per RunConfig field group."""

    def __init__(self, group: str) -> None:
        self.form = FieldForm(RunConfig, SETTINGS_GROUPS[group])
        if "device" in self.form.inputs:  # a dropdown of the devices this machine has
            old = self.form.inputs["device"]
            self.form.inputs["device"] = W.Dropdown(options=device_choices(), value="auto", description=label("device"),
                                                    tooltip=old.tooltip, style=old.style, layout=old.layout)
            self.form.box.children = list(self.form.inputs.values())
        self.box = self.form.box

    def values(self) -> dict[str, Any]:
        """RunConfig fields this panel sets."""
        return self.form.values()

    def observe(self, fn: Any) -> None:
        """Call fn on any change."""
        self.form.observe(fn)
