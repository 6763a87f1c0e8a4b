"""Imports a library makes at start-up that the workbench defers until they are used.

transformers' `cache_utils` (imported by almost every transformers module) imports `hqq.core.quantize` at the
top whenever hqq is installed (the `kvquant` extra: the quantized KV cache's default backend). hqq's module
calls `torch.compile` while defining its classes, which cost every process that imports transformers, whether
or not it quantizes a KV cache: on 2 CPU cores `import workbench.runner` took 4.2-4.6 s with it and 1.9-2.3 s
without, and a CLI run of `tiny` 12.2 s with it and 10.7 s without (medians; torch's compiler is imported
later in a run anyway). `install()` makes `cache_utils` load as if hqq were absent and gives it a stand-in
for hqq's quantizer, which imports hqq the first time an hqq cache layer uses it: the workbench's own runs and any
other code in the process (a notebook calling `generate` with an hqq cache) get hqq when they quantize.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

CACHE_UTILS = "transformers.cache_utils"


class _WithoutHQQ(importlib.abc.Loader):
    """Executes `transformers.cache_utils` with transformers' hqq check answering False."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        import transformers.utils as utils

        available = getattr(utils, "is_hqq_available", None)
        if available is None:  # another transformers: load it as it is
            self.loader.exec_module(module)
            return

        def absent(*args: Any, **kwargs: Any) -> bool:
            return False

        utils.is_hqq_available = absent  # `cache_utils` imports the name and asks it at its top
        try:
            self.loader.exec_module(module)
        finally:
            utils.is_hqq_available = available
            if getattr(module, "is_hqq_available", None) is absent:  # asked again when an hqq layer is made
                module.is_hqq_available = available
        if not hasattr(module, "HQQQuantizer"):  # the name its hqq layers use
            module.HQQQuantizer = _HQQQuantizer(module)


class _HQQQuantizer:
    """Stands in for `hqq.core.quantize.Quantizer` in `cache_utils` until an hqq layer uses it (its `quantize`,
    `dequantize`, `cuda`): then imports hqq, puts the real class in its place, and answers from it."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy and pickle probe special names: not hqq's
            raise AttributeError(name)
        from hqq.core.quantize import Quantizer

        self.module.HQQQuantizer = Quantizer
        return getattr(Quantizer, name)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, a module without a spec
        return False


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `transformers.cache_utils` once, the usual way, and wraps its loader."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != CACHE_UTILS:
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not _installed("hqq"):
            return spec
        spec.loader = _WithoutHQQ(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Defer hqq's import, unless `transformers.cache_utils` is already imported (then nothing is gained)."""
    if CACHE_UTILS not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)

