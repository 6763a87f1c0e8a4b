"""Widgets generated from config dataclass fields: labels, tooltips, ranges and choices come from the field."""

from __future__ import annotations

import dataclasses
import html
import typing
from typing import Any

import ipywidgets as W

_STYLE = {"description_width": "150px"}
_LAYOUT = {"width": "330px"}


def error_html(text: str) -> str:
    """A message shown in red (escaped)."""
    return f"<span class='wb-error'>{html.escape(text)}</span>"


def warning_html(text: str) -> str:
    """A message shown as a warning (escaped)."""
    return f"<span class='wb-warning'>{html.escape(text)}</span>"


def label(name: str) -> str:
    """`max_new_tokens` -> `max new tokens`."""
    return name.replace("_", " ")


def _scalar(hint: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotation."""
    args = typing.get_args(hint)
    optional = type(None) in args
    types = [a for a in args if a is not type(None)] or [hint]
    return types[0], optional


class OptionalValue(W.HBox):
    """An 'auto' checkbox in front of a value widget: unticked means None (the config's default)."""

    def __init__(self, inner: W.ValueWidget, tooltip: str) -> None:
        self.auto = W.Checkbox(value=True, description="auto", indent=False, layout={"width": "60px"},
                               tooltip="Leave to the default (" + tooltip + ")")
        self.inner = inner
        inner.disabled = True
        self.auto.observe(lambda change: setattr(inner, "disabled", change["new"]), "value")
        super().__init__([inner, self.auto])

    @property
    def value(self) -> Any:
        """None when auto, else the inner widget's value."""
        return None if self.auto.value else self.inner.value

    @value.setter
    def value(self, v: Any) -> None:
        self.auto.value = v is None
        if v is not None:
            self.inner.value = v

    def observe_value(self, fn: Any) -> None:
        """Call fn when either part changes."""
        self.auto.observe(fn, "value")
        self.inner.observe(fn, "value")


def field_widget(f: dataclasses.Field, hint: Any) -> W.Widget:
    """One input widget for a dataclass field, honouring its choices, bounds and help."""
    meta, tp, optional = f.metadata, *_scalar(hint)
    tooltip = meta.get("help", "")
    common = {"description": label(f.name), "style": _STYLE, "layout": _LAYOUT, "tooltip": tooltip}
    default = f.default if f.default is not dataclasses.MISSING else None
    if meta.get("choices"):  # an optional choice starts at its first option, behind the 'auto' box below
        w = W.Dropdown(options=list(meta["choices"]), value=meta["choices"][0] if default is None else default,
                       **common)
    elif tp is bool:
        w = W.Checkbox(value=bool(default), indent=True, **common)
    elif tp is int:
        lo, hi = meta.get("min"), meta.get("max")
        w = W.BoundedIntText(value=default if default is not None else (lo or 0),
                             min=int(lo) if lo is not None else -(2 ** 31), max=int(hi) if hi is not None else 2 ** 31,
                             **common)
    elif tp is float:
        lo, hi = meta.get("min"), meta.get("max")
        w = W.BoundedFloatText(value=default if default is not None else (lo or 0.0),
                               min=lo if lo is not None else -1e18, max=hi if hi is not None else 1e18, **common)
    else:
        w = W.Text(value=default or "", placeholder="(default)" if optional else "", **common)
    return OptionalValue(w, tooltip) if optional and (tp is not str or meta.get("choices")) else w


def widget_value(w: W.Widget) -> Any:
    """The value a generated widget stands for (empty optional text -> None)."""
    value = w.value
    if isinstance(w, W.Text) and w.placeholder == "(default)" and not value.strip():
        return None
    return value


def observe(w: W.Widget, fn: Any) -> None:
    """Call fn(change) whenever the widget's value changes."""
    if isinstance(w, OptionalValue):
        w.observe_value(fn)
    else:
        w.observe(fn, "value")


class FieldForm:
    """Inputs for some fields of a config dataclass; `values()` gives kwargs for its constructor."""

    def __init__(self, cls: type, names: typing.Sequence[str] | None = None) -> None:
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if names is None or f.name in names]
        if names is not None:
            fields.sort(key=lambda f: list(names).index(f.name))
        self.cls = cls
        self.inputs: dict[str, W.Widget] = {f.name: field_widget(f, hints[f.name]) for f in fields}
        self.box = W.VBox(list(self.inputs.values()))

    def values(self) -> dict[str, Any]:
        """Field name -> current value."""
        return {name: widget_value(w) for name, w in self.inputs.items()}

    def set_values(self, values: dict[str, Any]) -> None:
        """Fill the inputs (unknown names ignored)."""
        for name, v in values.items():
            if name in self.inputs:
                w = self.inputs[name]
                w.value = "" if (v is None and isinstance(w, W.Text)) else v

    def observe(self, fn: Any) -> None:
        """Call fn(change) on any change."""
        for w in self.inputs.values():
            observe(w, fn)

    def set_disabled(self, disabled: bool) -> None:
        """Grey out every input."""
        for w in self.inputs.values():
            if isinstance(w, OptionalValue):
                w.auto.disabled = disabled
                w.inner.disabled = disabled or w.auto.value
            else:
                w.disabled = disabled
