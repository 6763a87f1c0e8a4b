"""What `workbench models` lists: the reference model, the presets, and how to use any other model."""

from __future__ import annotations

import json
from typing import Any

from workbench.models.presets import PRESETS
from workbench.models.sources import TINY_DIR


def reference_report() -> dict[str, Any] | None:
    """The reference model's build report (recipe.json), if present."""
    try:
        return json.loads((TINY_DIR / "recipe.json").read_text())
    except (OSError, ValueError):
        return None


def describe_sources() -> list[dict[str, Any]]:
    """One row per source: name, kind, parameter count and a note."""
    from workbench.models.loader import count_params

    rows = []
    report = reference_report()
    if report:
        m = report["metrics"]
        rows.append({"source": "tiny", "kind": "reference", "params": m["params"],
                     "notes": f"shipped Llama trained on the stdlib docs; held-out perplexity "
                              f"{m['heldout_perplexity']:.1f} (unigram {m['unigram_perplexity']:.0f})"})
    else:
        rows.append({"source": "tiny", "kind": "reference", "params": None,
                     "notes": "missing: run `workbench build-reference`"})
    for name, preset in sorted(PRESETS.items()):
        rows.append({"source": f"preset:{name}", "kind": "preset", "params": count_params(preset.make_config()),
                     "notes": "random weights: speed and memory only. " + preset.about})
    from workbench.distill.students import describe_students

    rows.extend(describe_students())
    rows.append({"source": "ORG/NAME or ./folder", "kind": "hub / local", "params": None,
                 "notes": "any causal LM through AutoModelForCausalLM.from_pretrained (needs network or a local copy)"})
    return rows
