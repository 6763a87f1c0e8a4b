"""Hostile inputs and faults (docs/reliability.md): each row of that table is pinned by a test, here or elsewhere.

The last test reads the table and checks that every test it cites exists, so the table cannot cite a missing one.
"""

from __future__ import annotations

import ast
import gc
import html
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.config import RunConfig
from workbench.errors import ConfigError, InsufficientMemory, ModelSourceError, RunFailed, StoreError
from workbench.events import StageEvent
from workbench.models.sources import TINY_DIR, ModelSource, resolve
from workbench.store import Store

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(warmup=0, repeats=1, min_duration_s=0.0, max_new_tokens=4, eval_tokens=0, threads=1)


def stages(events: list) -> set[str]:
    return {e.stage for e in events if isinstance(e, StageEvent)}


def one_line(err: str) -> str:
    """stderr of a refused command: exactly one line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- model sources ----------------------------------------------------------------------------------------

@pytest.fixture
def pickle_folder(tmp_path) -> Path:
    """The reference model with its weights re-saved as a pickle checkpoint (pytorch_model.bin) only."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(TINY_DIR, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_checkpoint_is_refused_unless_opted_in(pickle_folder, monkeypatch, fast):
    from workbench.runner import run

    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read without --allow-pickle"))
    events: list = []
    with pytest.raises(ModelSourceError, match=r"has only a pickle checkpoint \(pytorch_model.bin\), no safetensors "
                                               r"weights; pickle files can carry code: pass --allow-pickle only"):
        run(fast(model=str(pickle_folder), eval_tokens=0), events.append)
    assert "measure" not in stages(events)
    monkeypatch.setattr(torch, "load", real_load)
    opted_in = run(fast(model=str(pickle_folder), eval_tokens=0, allow_pickle=True))
    reference = run(fast(eval_tokens=0))
    assert opted_in.status == "ok" and opted_in.outputs == reference.outputs  # the same weights, the same tokens
    from workbench.cli import build_parser
    from workbench.flags import config_from_args

    assert config_from_args(build_parser().parse_args(["run", "--allow-pickle"])).allow_pickle
    assert not RunConfig().allow_pickle


def test_hub_model_without_safetensors_names_the_pickle_option():
    from workbench.models.loader import _weights_error

    error = OSError("someorg/old-model does not appear to have a file named model.safetensors")
    message = str(_weights_error(ModelSource("someorg/old-model", "hub", "someorg/old-model"), error))
    assert "has no safetensors weights" in message and "--allow-pickle only if you trust" in message


def test_a_file_instead_of_a_model_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelSourceError, match="is a file; give the folder that holds config.json and the weights"):
        resolve(str(weights))


def test_weights_that_do_not_match_the_config(tmp_path, fast):
    from workbench.runner import run

    folder = tmp_path / "mismatch"
    shutil.copytree(TINY_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    with pytest.raises(ModelSourceError, match="do not match its config.json"):
        run(fast(model=str(folder), eval_tokens=0))


def test_a_model_too_large_for_memory_is_refused_by_estimate_before_loading(tmp_path, monkeypatch, fast):
    """The config of a 405B-parameter model next to a tokenizer: refused from the numbers alone."""
    import workbench.engines.hf
    import workbench.measure.baseline
    import workbench.runner

    folder = tmp_path / "huge"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, folder / name)
    config = json.loads((TINY_DIR / "config.json").read_text())
    config.update(hidden_size=16384, num_hidden_layers=126, intermediate_size=53248, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    for module in (workbench.engines.hf, workbench.measure.baseline):  # the run's model, the accuracy baseline
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    events: list = []
    with pytest.raises(InsufficientMemory, match=r"needs about \d+\.\d GiB on this machine \(weights .*the weights "
                                                 r"alone do not fit: .*--device-map auto"):
        workbench.runner.run(fast(model=str(folder)), events.append)
    assert not stages(events) & {"baseline", "load"}


# --- out of memory in the middle of a run ------------------------------------------------------------------

class OomInjector:
    """While armed, every run's model raises torch.OutOfMemoryError on its 10th forward (mid-generation, as a
    GPU would); `models` holds weak references to the models the runs generated with."""

    def __init__(self) -> None:
        self.armed = True
        self.models: list[weakref.ref] = []


@pytest.fixture
def oom_in_measure(monkeypatch) -> OomInjector:
    from workbench.engines.hf_generate import Generator

    injector, original = OomInjector(), Generator.__init__

    def init(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)
        injector.models.append(weakref.ref(model))
        calls = [0]

        def hook(module, inputs):
            calls[0] += 1
            if injector.armed and calls[0] == 10:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.model.layers[0].register_forward_pre_hook(hook)

    monkeypatch.setattr(Generator, "__init__", init)
    return injector


def test_out_of_memory_mid_run_is_one_sentence_and_frees_the_model(oom_in_measure, fast):
    from workbench.runner import run

    with pytest.raises(RunFailed) as info:
        run(fast(eval_tokens=0, repeats=3))
    assert str(info.value).startswith("out of memory during measure: CUDA out of memory. Tried to allocate 2.00 GiB;"
                                      " memory was freed")
    gc.collect()
    assert oom_in_measure.models[0]() is None  # nothing holds the model, not even the exception being handled


def test_the_app_survives_out_of_memory_and_runs_again(oom_in_measure, tmp_path, monkeypatch):
    from widgets import Workbench
    from workbench.runner import run

    monkeypatch.chdir(tmp_path)
    w = Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=run)
    w.set_values(**{**QUICK, "max_new_tokens": 16})  # the 10th forward is mid-generation
    assert w.start()
    w.wait(300)
    assert "Run failed: out of memory during measure" in html.unescape(w.error.value)
    assert not w.run_button.disabled and w.stop_button.disabled and w.progress.description == "failed"
    gc.collect()
    assert oom_in_measure.models[0]() is None
    oom_in_measure.armed = False
    assert w.start()
    w.wait(300)
    assert w.last_result is not None and w.last_result.status == "ok" and w.error.value == ""
    assert [r["status"] for r in Store(tmp_path / "runs.sqlite").summaries()] == ["ok", "error"]


# --- prompts -----------------------------------------------------------------------------------------------

UNUSUAL = {
    "emoji": "Family: 👩\u200d👩\u200d👧, flags 🇫🇷🇯🇵, and a snake 🐍 in",
    "right-to-left": "שלום עולם مرحبا بالعالم \u202eoverride\u202c then",
    "combining": "Z\u0336\u0337a\u0301\u0301\u0301l\u0489g\u0308o",
    "invisible": "\ufeffa\x00b\u200bc\u2028d\x1b[31m",
    "noncharacters": "\uffff\ufffe \U0010ffff end",
}


def test_unusual_unicode_prompts_run_and_round_trip(tmp_path, capsys, fast):
    from workbench.runner import run

    store = Store(tmp_path / "r.sqlite")
    for name, prompt in UNUSUAL.items():
        result = run(fast(prompt=prompt, eval_tokens=0, max_new_tokens=4))
        assert result.status == "ok" and result.latency.prompt_tokens > 0, name
        assert isinstance(result.output_text, str)
        back = store.get(store.add(result))
        assert back.config.prompt == prompt and back == result.with_id(back.run_id)
    assert main(["run", *sum((["--" + k.replace("_", "-"), str(v)] for k, v in QUICK.items()), []),
                 "--prompt", UNUSUAL["right-to-left"], "--store", str(tmp_path / "r.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["prompt"] == UNUSUAL["right-to-left"]


def test_undecodable_text_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="prompt is not valid Unicode text: character 1 is a lone surrogate"):
        RunConfig(prompt="a\ud800b")  # what a browser can send for half an emoji
    with pytest.raises(ValueError, match="model is not valid Unicode text"):
        RunConfig(model="./m\udcff")
    p = subprocess.run([sys.executable, "-m", "workbench", "run", "--prompt", b"caf\xe9 latin-1".decode(
        sys.getfilesystemencoding(), "surrogateescape"), "--store", str(tmp_path / "r.sqlite")],
        capture_output=True, text=True, timeout=300, errors="replace")
    assert p.returncode == 2
    assert "prompt is not valid Unicode text: character 3 is a lone surrogate" in one_line(p.stderr)
    assert not (tmp_path / "r.sqlite").exists()


def test_undecodable_text_in_the_app_disables_run(tmp_path, monkeypatch):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    w = Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=lambda *a, **k: pytest.fail("a run started"))
    w.settings["Workload"].form.inputs["prompt"].value = "half an emoji \ud83d"
    assert "not valid Unicode text" in w.problems.value and w.run_button.disabled
    assert not w.start()


def test_an_empty_prompt_is_refused_and_a_blank_box_means_the_default(tmp_path, monkeypatch):
    for empty in ("", "   ", "\n\t "):
        with pytest.raises(ValueError, match="prompt is empty: give some text, or prompt_tokens=N"):
            RunConfig(prompt=empty)
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    w = Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=lambda *a, **k: pytest.fail("a run started"))
    box = w.settings["Workload"].form.inputs["prompt"]
    for blank in ("", "   "):
        box.value = blank
        assert w.config().prompt is None and not w.run_button.disabled  # the default prompt, as the box says
    assert box.placeholder == "(default)"


# --- devices -----------------------------------------------------------------------------------------------

def test_a_gpu_that_does_not_exist_is_refused_before_loading(fast):
    from workbench.runner import run

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    events: list = []
    with pytest.raises(ConfigError, match=r"device 'cuda:7' (asked for, but this machine has no CUDA GPU|does not "
                                          r"exist: this machine has \d GPU)"):
        run(fast(device="cuda:7"), events.append)
    assert not stages(events)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N; got 'gpu0'"):
        RunConfig(device="gpu0")


# --- the results store -------------------------------------------------------------------------------------

def test_a_store_written_by_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path).add_error(RunConfig(), "an earlier failure")  # a store file exists from its first row on
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE workbench_meta SET value='99' WHERE key='schema_version'")
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"was written by a newer workbench \(schema 99\)"):
        Store(path)
    assert path.read_bytes() == before


def test_run_refuses_a_corrupt_store_before_measuring(tmp_path, monkeypatch, capsys):
    import workbench.runner

    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database " * 500)
    monkeypatch.setattr(workbench.runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main(["run", "--store", str(bad)]) == 1
    assert "it was left untouched" in one_line(capsys.readouterr().err)
    assert bad.read_bytes() == b"not a database " * 500


def test_the_app_on_a_corrupt_store_says_so_and_never_recreates_it(tmp_path, monkeypatch):
    from test_app import ScriptedRunner
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database " * 500)
    w = Workbench(store_path=str(bad), runner=ScriptedRunner())
    assert "unusable" in w.history.message.value and "left untouched" in w.history.message.value
    assert w.start()
    w.wait(10)
    assert "Run failed: results store" in html.unescape(w.error.value) and not w.run_button.disabled
    assert bad.read_bytes() == b"not a database " * 500


def test_a_damaged_baseline_cache_is_recomputed(fast, tmp_path, monkeypatch):
    from workbench.measure import baseline
    from workbench.runner import run

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))  # a cache of its own, damaged below
    monkeypatch.setattr(baseline, "_memory", {})
    config = fast(eval_tokens=200, max_new_tokens=5)
    first = run(config)
    files = sorted((tmp_path / "cache" / "baselines").iterdir())
    assert {f.suffix for f in files} == {".safetensors", ".json"}
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a disk that filled up, a killed write
    baseline._memory.clear()
    again = run(config)
    assert again.accuracy.kl_vs_baseline == pytest.approx(0.0, abs=1e-6)
    assert again.accuracy.greedy_match_vs_baseline == first.accuracy.greedy_match_vs_baseline == 1.0


# --- stopping ----------------------------------------------------------------------------------------------

def test_ctrl_c_during_a_cli_run_keeps_the_partial_result(tmp_path):
    store = tmp_path / "r.sqlite"
    err = tmp_path / "err.txt"
    with open(tmp_path / "out.txt", "w") as out, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "run", "--warmup", "0", "--repeats", "1000",
                                 "--min-duration-s", "600", "--max-new-tokens", "64", "--eval-tokens", "0",
                                 "--threads", "1", "--store", str(store)], stdout=out, stderr=e)
    try:
        deadline = time.monotonic() + 240
        while "measure:" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping after the current token" in err.read_text() and "Traceback" not in err.read_text()
    assert "stopped" in (tmp_path / "out.txt").read_text()
    assert [r["status"] for r in Store(store).summaries()] == ["stopped"]


# --- nothing is executed as code ---------------------------------------------------------------------------

def test_a_sweep_file_with_python_tags_is_refused_not_executed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "grid.yaml").write_text(f"grid:\n  dtype: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["sweep", "grid.yaml", "--store", "r.sqlite"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "sweep file 'grid.yaml' is not valid YAML" in line and "python/object/apply" in line
    assert not marker.exists() and not (tmp_path / "r.sqlite").exists()


CODE = "__import__('os').system('touch pwned')"


def test_code_in_a_value_is_only_ever_text(tmp_path, monkeypatch, capsys):
    from widgets import Workbench
    from workbench.techniques import parse_spec

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="is not a valid int"):
        parse_spec(f"sim:bits={CODE}")
    with pytest.raises(ValueError, match="threads must be an integer"):
        RunConfig.from_dict({"threads": CODE})
    with pytest.raises(ModelSourceError, match="no model folder at"):
        resolve(CODE)
    assert main(["dashboard", "--set", f"threads={CODE}"]) == 2
    assert "threads must be an integer" in capsys.readouterr().err
    w = Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=lambda *a, **k: pytest.fail("a run started"))
    w.set_values(model=CODE, prompt=CODE)
    assert w.config().model == CODE and w.config().prompt == CODE  # text, passed on as text
    assert not (tmp_path / "pwned").exists()


_FORBIDDEN = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads", "dill.load",
              "yaml.load", "yaml.unsafe_load", "yaml.full_load", "shelve.open", "os.system", "os.popen"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_code_path_executes_what_it_reads():
    """No eval/exec/pickle/unsafe YAML, shell=True, torch.load without weights_only, or trust_remote_code=True
    in the shipped code: data from widgets and files stays data."""
    found = []
    for path in sorted([*ROOT.glob("workbench/**/*.py"), *ROOT.glob("widgets/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in _FORBIDDEN:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
            if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                             and keywords["weights_only"].value is True):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
            for key in ("shell", "trust_remote_code"):
                if isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {key}=True")
    assert found == []


# --- the dashboard -----------------------------------------------------------------------------------------

def test_the_dashboard_command_binds_localhost_unless_told_otherwise(monkeypatch, capsys):
    import workbench.serve.dashboard

    commands: list[list[str]] = []
    monkeypatch.setattr(workbench.serve.dashboard.subprocess, "call", lambda cmd, env: commands.append(cmd) or 0)
    assert main(["dashboard"]) == 0
    assert main(["dashboard", "--ip", "0.0.0.0", "--port", "9000"]) == 0
    assert "--Voila.ip=127.0.0.1" in commands[0] and not any("0.0.0.0" in c for c in commands[0])
    assert "--Voila.ip=0.0.0.0" in commands[1]
    assert "dashboard: http://127.0.0.1:8866/" in capsys.readouterr().out


# --- the table in docs/reliability.md ----------------------------------------------------------------------

TABLE = ROOT / "docs" / "reliability.md"
_NODE = re.compile(r"`(tests/test_\w+\.py)::(\w+)(\[[^\]`]*\])?`")


def table_rows() -> list[str]:
    """The table's data rows (lines starting with '| <number> |')."""
    return [line for line in TABLE.read_text().splitlines() if re.match(r"^\|\s*\d+\s*\|", line)]


def test_every_row_of_the_reliability_table_cites_tests_that_exist():
    rows = table_rows()
    assert len(rows) >= 25
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row
        nodes = _NODE.findall(cells[3])
        assert nodes, f"row {cells[0]} cites no test"
        for file, name, _ in nodes:
            module = ast.parse((ROOT / file).read_text())
            defined = {n.name for n in module.body if isinstance(n, ast.FunctionDef)}
            assert name.startswith("test_") and name in defined, f"row {cells[0]}: {file}::{name} does not exist"
