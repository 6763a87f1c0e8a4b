"""The command line: one JSON object on stdout, readable tables, and one clear sentence per bad input."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from workbench.cli import main
from workbench.models.sources import TINY_DIR

FAST = ["--warmup", "0", "--repeats", "2", "--min-duration-s", "0", "--max-new-tokens", "4", "--eval-tokens", "200",
        "--eval-context", "64"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_run_json_prints_exactly_one_object_with_the_design_keys(tmp_path):
    from test_runner import check_design_keys

    p = cli("run", "--model", "tiny", *FAST, "--store", str(tmp_path / "r.sqlite"), "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)  # the whole stdout is one JSON document
    check_design_keys(data)
    assert data["run_id"] == 1 and data["status"] == "ok"


def test_run_prints_a_readable_table(tmp_path, capsys):
    assert main(["run", "--model", "tiny", *FAST, "--store", str(tmp_path / "r.sqlite")]) == 0
    out = capsys.readouterr().out
    for label in ("TTFT p50/p90/p99", "decode", "weights", "KV cache", "perplexity", "roofline"):
        assert label in out


def one_sentence(text: str) -> str:
    """The single error line of stderr (progress lines may precede it; no traceback)."""
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, text
    assert lines[0] == text.strip().splitlines()[-1]
    return lines[0]


def test_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--colour", "blue"])
    assert e.value.code == 2
    assert "unrecognized arguments: --colour" in one_sentence(capsys.readouterr().err)


def test_bad_choice(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--dtype", "int3"])
    assert e.value.code == 2 and "invalid choice" in one_sentence(capsys.readouterr().err)


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "0"], "max_new_tokens must be in 1.."),
    (["--prompt", ""], "prompt is empty"),
    (["--model", "preset:gpt5"], "unknown preset"),
    (["--quant", "magnitude"], "pass it with --prune"),
])
def test_invalid_values_exit_2_with_one_sentence(args, fragment, capsys, tmp_path):
    assert main(["run", *args, "--store", str(tmp_path / "r.sqlite")]) == 2
    assert fragment in one_sentence(capsys.readouterr().err)
    assert not (tmp_path / "r.sqlite").exists()  # refused before the store was even opened


def failing_run(capsys, tmp_path, *args: str) -> str:
    store = tmp_path / "r.sqlite"
    assert main(["run", *args, *FAST, "--store", str(store)]) == 1
    line = one_sentence(capsys.readouterr().err)
    with sqlite3.connect(store) as conn:  # only a complete error record, nothing half-written
        rows = conn.execute("SELECT status, error, config_json, result_json FROM runs").fetchall()
    assert len(rows) == 1 and rows[0][0] == "error" and rows[0][1] and rows[0][2] and rows[0][3] is None
    return line


def test_nonexistent_path(capsys, tmp_path):
    assert "no model folder at './no/such/model'" in failing_run(capsys, tmp_path, "--model", "./no/such/model")


def test_offline_hub_id_fails_fast_with_one_sentence(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = failing_run(capsys, tmp_path, "--model", "someorg/some-model")
    assert "not in the Hugging Face cache" in line and "cannot be reached" in line


def test_corrupt_safetensors(capsys, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(TINY_DIR, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated download
    assert "corrupt or truncated" in failing_run(capsys, tmp_path, "--model", str(folder))


def test_garbage_safetensors_header(capsys, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(TINY_DIR, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "corrupt or truncated" in failing_run(capsys, tmp_path, "--model", str(folder))


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in failing_run(capsys, tmp_path, "--model", str(tmp_path / "empty"))


def test_remote_code_is_refused_unless_opted_in(capsys, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "totally-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    assert "--trust-remote-code" in failing_run(capsys, tmp_path, "--model", str(folder))


def test_batch_too_large_is_refused_by_estimate(capsys, tmp_path):
    line = failing_run(capsys, tmp_path, "--model", "preset:llama-3.2-1b", "--batch-size", "4096",
                       "--prompt-tokens", "16000")
    assert "needs about" in line and "GiB" in line and "lower --batch-size" in line


def test_prompt_longer_than_the_context(capsys, tmp_path):
    assert "exceeds the model's context" in failing_run(capsys, tmp_path, "--prompt-tokens", "5000")


def test_models_lists_reference_and_presets(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["source"] for r in rows]
    for name in ("tiny", "preset:llama-124m", "preset:gpt2-124m", "preset:smollm2-135m", "preset:qwen2.5-0.5b",
                 "preset:llama-3.2-1b"):
        assert name in names
    assert next(r for r in rows if r["source"] == "preset:llama-124m")["params"] == 123_551_232


def test_results_list_and_exports(capsys, tmp_path):
    store = str(tmp_path / "r.sqlite")
    assert main(["run", "--model", "tiny", *FAST, "--store", store, "--json"]) == 0
    capsys.readouterr()
    assert main(["results", "--store", store]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["results", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run_id"] == 1
    assert main(["results", "--store", store, "--csv"]) == 0
    assert capsys.readouterr().out.startswith("id,")
    assert main(["results", "--store", store, "--show", "1"]) == 0
    assert "TTFT" in capsys.readouterr().out


def test_results_on_a_corrupt_store(capsys, tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    assert main(["results", "--store", str(bad)]) == 1
    assert "left untouched" in one_sentence(capsys.readouterr().err)
    assert bad.read_bytes() == b"garbage" * 1000
