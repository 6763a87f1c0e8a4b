"""Command-line flags from config dataclasses: one flag per field, and the `workbench run` flags to a RunConfig.

Shared by the CLI (`workbench.cli`) and a torchrun rank started on its own (`workbench.parallel.worker`),
which parses the same `workbench run` flags without importing the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from workbench.config import RunConfig, spell_fields
from workbench.paths import STORE_HELP
from workbench.techniques import load_all, parse_spec


def flag(name: str) -> str:
    """A field's flag: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def flags_in(message: str, cls: type) -> str:
    """`message` with `cls`'s field names written as the flags the user typed (max_new_tokens -> --max-new-tokens)."""
    return spell_fields(message, cls, flag)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per dataclass field: type, choices and help from the field; unset flags keep the default."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        group = groups.setdefault(meta.get("group", "options"), parser.add_argument_group(meta.get("group", "options")))
        help_text = meta.get("help", "") + (f" (default: {f.default})" if f.default is not None else "")
        types = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None)]
        if types == [bool]:
            name = flag(f.name) if not f.default else "--no-" + f.name.replace("_", "-")
            text = meta.get("help", "")
            if f.default:  # a --no-FLAG turns the field off: its help says what that does, not what "on" does
                text = meta.get("help_off") or f"Turn this off (it is on by default): {text}"
            group.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true",
                               default=argparse.SUPPRESS, help=text)
            continue
        group.add_argument(flag(f.name), dest=f.name, type=types[0], choices=meta.get("choices"),
                           default=argparse.SUPPRESS, help=help_text,
                           metavar=None if meta.get("choices") else f.name.upper())


class TechniqueAction(argparse.Action):
    """--quant / --prune: append (kind, spec) to one ordered list, so the order of flags is the order applied."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, "technique_flags", []) or [])
        items.append((self.const, value))
        namespace.technique_flags = items


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `workbench run`: one per RunConfig field, --quant/--prune, and where the result goes."""
    add_dataclass_arguments(parser, RunConfig, skip=("techniques",))
    t = parser.add_argument_group("Techniques")
    t.add_argument("--quant", action=TechniqueAction, const="quant", metavar="SPEC",
                   help="quantization technique NAME or NAME:key=value,... (repeatable; see `workbench techniques`)")
    t.add_argument("--prune", action=TechniqueAction, const="prune", metavar="SPEC",
                   help="pruning technique NAME or NAME:key=value,... (repeatable, applied in order)")
    o = parser.add_argument_group("Output")
    o.add_argument("--store", default=None, help=STORE_HELP)
    o.add_argument("--no-store", action="store_true", help="do not record this run")
    o.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` built from the parsed flags named like its fields (ValueError with one sentence when invalid)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed `workbench run` flags (ValueError with one sentence when invalid)."""
    load_all()
    specs = []
    for kind, spec in getattr(args, "technique_flags", []) or []:
        technique = parse_spec(spec)
        if technique.kind != kind:
            what, name = ("pruning", "--prune") if technique.kind == "prune" else ("quantization", "--quant")
            raise ValueError(f"{technique.name} is a {what} technique: pass it with {name}")
        specs.append(technique)
    return dataclass_from_args(RunConfig, args, techniques=tuple(specs))
