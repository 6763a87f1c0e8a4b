"""Imports a library makes at start-up that the workbench defers until they are used.

Modules that every run or app imports import optional libraries at their top whenever those are installed:
- transformers' `cache_utils` (imported by almost every transformers module) imports `hqq.core.quantize` (the
  `kvquant` extra: the quantized KV cache's default backend). hqq's module calls `torch.compile` while defining its
  classes: on 2 CPU cores `import workbench.runner` took 4.2-4.6 s with it and 1.9-2.3 s without, and a CLI run of
  `tiny` 12.2 s with it and 10.7 s without (medians; torch's compiler is imported later in a run anyway).
- `quantizers.quantizer_torchao` (imported with `modeling_utils`, so by every model load) imports torchao's
  safetensors helpers, and with them torchao, which probes its compiled kernels and logs what it cannot load.
- six `loss` modules (also imported with `modeling_utils`) import scipy's `linear_sum_assignment` for the losses
  of object-detection models; `scipy.optimize` alone took 0.34 s.
- jsonschema's format checkers (imported by nbformat, so by plotly: every app, dashboard page and notebook kernel)
  import `rfc3987_syntax` when it is installed (Jupyter's own `jsonschema[format-nongpl]` brings it), which builds
  an Earley parser of RFC 3987 at import: 2.2 s of the 2.3 s `import jsonschema` took here. It only checks the
  `iri` formats of a schema. While `jsonschema._format` loads, `rfc3987_syntax` is a stub whose names are
  stand-ins; the real module is imported when a stand-in is first called.

`install()` makes each transformers module load as if its library were absent: transformers' availability check
(`is_hqq_available`, `is_torchao_available`, `is_scipy_available`) answers False while the module's top runs,
and is restored for every later call. Each name the module would have imported under that check gets a stand-in
that imports the library the first time it is used (an attribute, a call) and then puts the real object in its
place. So the workbench's own runs and any other code in the process (a notebook calling `generate` with an hqq
cache, or saving a torchao-quantized model) get the library when they use it. A module whose guarded block does
anything but `from X import Y` (or that has an `else:` branch) loads as it is: only imports can be deferred safely.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import textwrap
import types
from typing import Any

# transformers' module (or every module of a package, a name ending in ".") -> the availability check (in
# `transformers.utils`) guarding its import of the library
DEFERRED = {"transformers.cache_utils": "is_hqq_available",
            "transformers.quantizers.quantizer_torchao": "is_torchao_available",
            "transformers.loss.": "is_scipy_available"}
# A module -> the library it imports inside `with suppress(ImportError)`, stubbed while the module loads
STUBBED = {"jsonschema._format": "rfc3987_syntax"}


def guarded_imports(source: str, check: str) -> dict[str, tuple[str, str]] | None:
    """What a module's top-level `if check():` blocks import: {name: (module, attribute)}; None when there is no
    such block, or one does anything but absolute `from X import Y` (no `*`), or is followed by `elif`/`else`."""
    names: dict[str, tuple[str, str]] = {}
    for match in re.finditer(rf"^if {re.escape(check)}\(\):[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)+)(\S*)", source,
                             re.MULTILINE):
        if match.group(2).startswith(("elif", "else")):
            return None
        try:
            body = ast.parse(textwrap.dedent(match.group(1))).body
        except SyntaxError:
            return None
        for node in body:
            if (not isinstance(node, ast.ImportFrom) or node.level or not node.module
                    or any(a.name == "*" for a in node.names)):  # a star import's names are unknown here
                return None
            names.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    return names or None


class _Deferred:
    """Stands in for `from source import attribute` until it is used: an attribute (hqq's `Quantizer.quantize`) or
    a call (torchao's `flatten_tensor_state_dict(...)`) imports `source` and answers from the real object. With a
    `module`, the real object then takes the stand-in's place there as `name`."""

    def __init__(self, module: Any, name: str, source: str, attribute: str) -> None:
        self.module, self.name, self.source, self.attribute = module, name, source, attribute
        self.real: Any = None

    def resolve(self) -> Any:
        """The real object, imported on the first use only (a stand-in the module keeps forwards every call)."""
        if self.real is None:
            self.real = getattr(importlib.import_module(self.source), self.attribute)
            if self.module is not None:
                setattr(self.module, self.name, self.real)
        return self.real

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy and pickle probe special names: not the library's
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred: from {self.source} import {self.attribute}>"


class _Wrapped(importlib.abc.Loader):
    """A module's own loader, with something done around executing it (`exec_module`)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename...: inspect and tracebacks read the file
        if name.startswith("__") or name == "loader":  # copy and pickle probe special names before __init__
            raise AttributeError(name)
        return getattr(self.loader, name)


class _WithoutLibrary(_Wrapped):
    """Executes a module with transformers' availability `check` answering False, then gives each name in
    `names` (what the module imports under the check) a `_Deferred` stand-in."""

    def __init__(self, loader: importlib.abc.Loader, check: str, names: dict[str, tuple[str, str]]) -> None:
        super().__init__(loader)
        self.check, self.names = check, names

    def exec_module(self, module: Any) -> None:
        import transformers.utils as utils

        available = getattr(utils, self.check, None)
        if available is None:  # another transformers: load it as it is
            self.loader.exec_module(module)
            return

        def absent(*args: Any, **kwargs: Any) -> bool:
            return False

        setattr(utils, self.check, absent)  # the module imports the name and asks it at its top
        try:
            self.loader.exec_module(module)
        finally:
            setattr(utils, self.check, available)
            if getattr(module, self.check, None) is absent:  # asked again when the library is used
                setattr(module, self.check, available)
        for name, (source, attribute) in self.names.items():
            if not hasattr(module, name):
                setattr(module, name, _Deferred(module, name, source, attribute))


class _WithStub(_Wrapped):
    """Executes a module while `library` is a stub whose every attribute is a `_Deferred` stand-in (the module
    binds them under names of its own, so the stand-ins stay and forward); afterwards `library` imports as usual."""

    def __init__(self, loader: importlib.abc.Loader, library: str) -> None:
        super().__init__(loader)
        self.library = library

    def exec_module(self, module: Any) -> None:
        if self.library in sys.modules:  # already paid for
            self.loader.exec_module(module)
            return
        stub = types.ModuleType(self.library, f"stand-in for {self.library} while {module.__name__} loads")

        def attribute(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return _Deferred(None, name, self.library, name)

        stub.__getattr__ = attribute  # type: ignore[attr-defined]  # PEP 562: `from library import name`
        sys.modules[self.library] = stub
        try:
            self.loader.exec_module(module)
        finally:
            if sys.modules.get(self.library) is stub:
                del sys.modules[self.library]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, a module without a spec
        return False


def check_for(fullname: str) -> str | None:
    """The availability check guarding `fullname`'s deferred import, or None when it is not deferred."""
    for name, check in DEFERRED.items():
        if fullname == name or (name.endswith(".") and fullname.startswith(name)):
            return check
    return None


class _Finder(importlib.abc.MetaPathFinder):
    """Finds each module of `DEFERRED` and `STUBBED` the usual way, and wraps its loader when its library is
    installed (and, for `DEFERRED`, its guarded block only imports)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        check = check_for(fullname)
        if check is None and fullname not in STUBBED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        if check is None:
            if _installed(STUBBED[fullname]):
                spec.loader = _WithStub(spec.loader, STUBBED[fullname])
            return spec
        try:
            names = guarded_imports(spec.loader.get_source(fullname) or "", check)
        except (ImportError, OSError, UnicodeDecodeError):
            return spec
        if names is None or not all(_installed(source.partition(".")[0]) for source, _ in names.values()):
            return spec  # nothing to defer, or a library that is absent: transformers' own check says so
        spec.loader = _WithoutLibrary(spec.loader, check, names)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Defer the libraries of the `DEFERRED` and `STUBBED` modules imported from now on (an imported one has
    already paid)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
