"""Deferred imports: transformers' start-up imports of hqq and torchao wait until something uses them."""

from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest

from workbench import deferred

_TORCHAO_BLOCK = """import re

if is_torchao_available():
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
    )


logger = 1
"""


@pytest.mark.parametrize("source, expected", [
    (_TORCHAO_BLOCK, {"flatten_tensor_state_dict": ("torchao.prototype.safetensors.safetensors_support",
                                                    "flatten_tensor_state_dict")}),
    ("if is_torchao_available():\n    from hqq.core.quantize import Quantizer as HQQQuantizer\n",
     {"HQQQuantizer": ("hqq.core.quantize", "Quantizer")}),
    ("x = 1\n", None),  # no guarded block
    ("if is_torchao_available():\n    import torchao\n", None),  # a module bound by `import`: not deferred
    ("if is_torchao_available():\n    from torchao import a\n    A = a.b\n", None),  # code beside the import
    ("if is_torchao_available():\n    from torchao import a\nelse:\n    a = None\n", None),  # the else branch runs
    ("if is_torchao_available():\n    from .torchao import a\n", None),  # relative
    ("if is_torchao_available():\n    from torchao import *\n", None),  # names unknown until imported
    ("if is_torchao_available('0.4'):\n    from torchao import a\n", None),  # a check with arguments
    ("def f():\n    if is_torchao_available():\n        from torchao import a\n", None),  # not at the top
])
def test_only_a_top_level_block_of_plain_imports_is_deferred(source, expected):
    assert deferred.guarded_imports(source, "is_torchao_available") == expected


@pytest.mark.parametrize("module", ["transformers.cache_utils", "transformers.quantizers.quantizer_torchao",
                                    "transformers.loss.loss_for_object_detection", "transformers.loss.loss_rt_detr"])
def test_the_installed_transformers_guards_each_deferred_import_with_plain_imports(module):
    """If a transformers release changes these blocks, the module loads as it is (and this test says so)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert deferred.guarded_imports(spec.loader.get_source(module), deferred.check_for(module))


def test_which_modules_are_deferred():
    assert deferred.check_for("transformers.cache_utils") == "is_hqq_available"
    assert deferred.check_for("transformers.loss.loss_grounding_dino") == "is_scipy_available"
    assert deferred.check_for("transformers.loss") is None  # the package itself imports no library
    assert deferred.check_for("transformers.cache_utils_x") is None and deferred.check_for("scipy") is None


class _Loader:
    """Stands in for a deferred module's loader: imports transformers' check as the module does, and asks it."""

    def __init__(self, check: str) -> None:
        self.check, self.seen = check, []

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        import transformers.utils

        check = getattr(transformers.utils, self.check, None)
        if check is not None:
            setattr(module, self.check, check)
            self.seen.append(check())


@pytest.mark.parametrize("check", ["is_hqq_available", "is_torchao_available"])
def test_the_check_answers_false_only_while_the_module_loads(monkeypatch, check):
    import transformers.utils

    names = {"Thing": ("json", "JSONDecoder")}
    real, module, loader = getattr(transformers.utils, check), types.SimpleNamespace(), _Loader(check)
    deferred._WithoutLibrary(loader, check, names).exec_module(module)
    assert loader.seen == [False]  # at the module's top: the library looks absent
    assert getattr(transformers.utils, check) is real and getattr(module, check) is real  # asked again later
    stand_in = module.Thing
    assert copy.copy(stand_in).module is module  # special names are not the library's: no import, no recursion
    monkeypatch.delattr(transformers.utils, check)  # another transformers: loaded as it is
    other = _Loader(check)
    deferred._WithoutLibrary(other, check, names).exec_module(types.SimpleNamespace())
    assert other.seen == []


def test_a_stand_in_imports_on_first_use_and_gives_way_to_the_real_object():
    import json

    module = types.SimpleNamespace()
    module.loads = deferred._Deferred(module, "loads", "json", "loads")
    assert module.loads("[1]") == [1] and module.loads is json.loads  # a call
    module.Decoder = deferred._Deferred(module, "Decoder", "json", "JSONDecoder")
    assert module.Decoder.decode is json.JSONDecoder.decode and module.Decoder is json.JSONDecoder  # an attribute


class _ImportsColorsys:
    """Stands in for `jsonschema._format`'s loader: imports a library's function under a name of its own."""

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        from colorsys import rgb_to_hsv as to_hsv

        module.to_hsv = to_hsv


def test_a_stubbed_library_is_imported_when_its_stand_in_is_first_called(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    module = types.SimpleNamespace(__name__="user")
    deferred._WithStub(_ImportsColorsys(), "colorsys").exec_module(module)
    assert "colorsys" not in sys.modules and isinstance(module.to_hsv, deferred._Deferred)  # the stub is gone
    assert module.to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0) and "colorsys" in sys.modules  # the real one answered
    again = types.SimpleNamespace(__name__="user")
    deferred._WithStub(_ImportsColorsys(), "colorsys").exec_module(again)  # imported already: nothing to defer
    assert again.to_hsv is sys.modules["colorsys"].rgb_to_hsv


def test_a_finder_that_refuses_a_library_reads_as_the_library_absent(monkeypatch):
    """A GPU image without the extras (tests/test_bench_gpu.py blocks them with a finder that raises)."""

    def refuse(name, package=None):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(deferred.importlib.util, "find_spec", refuse)
    assert deferred._installed("hqq") is False


_START_UP = """
import sys
import workbench.runner  # imports transformers.cache_utils, as every run does
import transformers.modeling_utils  # imports transformers.quantizers.quantizer_torchao, as every model load does
import transformers.cache_utils
from transformers.quantizers import quantizer_torchao
from transformers.loss import loss_for_object_detection
print(sorted(m for m in ("hqq", "torchao", "scipy") if m in sys.modules))
print(quantizer_torchao.is_torchao_available(), transformers.cache_utils.is_hqq_available(),
      loss_for_object_detection.is_scipy_available())
"""

_DEFERRED_HQQ = """
import sys
import torch
import workbench.runner
import transformers.cache_utils
from transformers.cache_utils import QuantizedCache
from workbench.models.loader import load_model
from workbench.models.sources import resolve
tiny = load_model(resolve("tiny"), "fp32", torch.device("cpu"))
cache = QuantizedCache(backend="hqq", config=tiny.model.config, nbits=4)  # transformers' own API, as a notebook would
with torch.no_grad():
    tiny.model(input_ids=torch.arange(16)[None], past_key_values=cache, use_cache=True)
assert cache.layers[0]._quantized_keys is not None  # hqq quantized the prompt
from hqq.core.quantize import Quantizer
assert transformers.cache_utils.HQQQuantizer is Quantizer  # the stand-in gave way to hqq's class
print("ok")
"""

_DEFERRED_SCIPY = """
import workbench.runner
import transformers.modeling_utils
from transformers.loss import loss_for_object_detection as loss
import scipy.optimize
print(loss.linear_sum_assignment([[1.0, 0.0], [0.0, 1.0]])[1].tolist())  # an object-detection model's matcher
assert loss.linear_sum_assignment is scipy.optimize.linear_sum_assignment
"""

_DEFERRED_TORCHAO = """
import torch
import workbench.runner
import transformers.modeling_utils
from transformers.quantizers import quantizer_torchao
state = quantizer_torchao.flatten_tensor_state_dict({"w": torch.ones(2)})  # saving a torchao-quantized model
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
assert quantizer_torchao.flatten_tensor_state_dict is flatten_tensor_state_dict  # the stand-in gave way
assert torch.equal(state[0]["w"], torch.ones(2)), state
print("ok")
"""


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_no_optional_library_is_imported_at_start_up_and_transformers_still_finds_them():
    """transformers imports hqq, torchao and scipy at start-up when they are installed; the workbench defers them,
    and transformers' checks answer truly afterwards."""
    listed, checks = _python(_START_UP).splitlines()
    assert listed == "[]"
    assert checks == " ".join(str(deferred._installed(m)) for m in ("torchao", "hqq", "scipy"))


@pytest.mark.skipif(not deferred._installed("hqq"), reason="hqq (the kvquant extra) is not installed")
def test_hqq_is_imported_when_an_hqq_cache_first_quantizes_whoever_made_it():
    assert _python(_DEFERRED_HQQ) == "ok"


@pytest.mark.skipif(not deferred._installed("torchao"), reason="torchao is not installed")
def test_torchao_is_imported_when_transformers_first_uses_it():
    assert _python(_DEFERRED_TORCHAO) == "ok"


@pytest.mark.skipif(not deferred._installed("scipy"), reason="scipy is not installed")
def test_scipy_is_imported_when_an_object_detection_loss_first_matches():
    assert _python(_DEFERRED_SCIPY) == "[1, 0]"


_JSONSCHEMA = """
import sys
import workbench
from jsonschema import FormatChecker
assert "rfc3987_syntax" not in sys.modules, "rfc3987_syntax was imported with jsonschema"
checker = FormatChecker()
print(checker.conforms("http://example.com/\u00e4", "iri"), checker.conforms("no scheme", "iri"))
assert "rfc3987_syntax" in sys.modules
"""


@pytest.mark.skipif(not deferred._installed("rfc3987_syntax"), reason="rfc3987_syntax is not installed")
def test_jsonschema_checks_iris_with_rfc3987_syntax_imported_only_when_it_checks_one():
    """rfc3987_syntax builds a parser as it is imported (2.2 s here), with jsonschema, so with nbformat and plotly."""
    assert _python(_JSONSCHEMA) == "True False"


_APP = """
import sys
from widgets import Workbench
Workbench()
print(sorted(m for m in ("rfc3987_syntax", "hqq", "torchao", "scipy") if m in sys.modules))
"""


@pytest.mark.skipif(not deferred._installed("ipywidgets"), reason="the app extra is not installed")
def test_the_app_starts_without_the_deferred_libraries():
    """Every dashboard page and app kernel pays for what the app imports: `from widgets import Workbench` took
    4.1-5.0 s here with rfc3987_syntax and 2.1-2.8 s without."""
    assert _python(_APP) == "[]"
