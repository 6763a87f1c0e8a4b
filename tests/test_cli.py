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
    (["--max-new-tokens", "0"], "--max-new-tokens must be in 1.."),
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


def refused_run(capsys, tmp_path, monkeypatch, *args: str) -> str:
    """A run refused before loading: exit 2, one sentence, no weights read, no store created."""
    import workbench.engines.hf
    import workbench.measure.baseline

    for module in (workbench.engines.hf, workbench.measure.baseline):  # the run's model, the accuracy baseline
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    store = tmp_path / "r.sqlite"
    assert main(["run", *args, *FAST, "--store", str(store)]) == 2
    assert not store.exists()
    return one_sentence(capsys.readouterr().err)


def test_batch_too_large_is_refused_by_estimate(capsys, tmp_path, monkeypatch):
    line = refused_run(capsys, tmp_path, monkeypatch, "--model", "preset:llama-3.2-1b", "--batch-size", "4096",
                       "--prompt-tokens", "16000")
    assert "needs about" in line and "GiB" in line and "lower --batch-size" in line


def test_a_batch_whose_logits_do_not_fit_is_refused_with_the_numbers(capsys, tmp_path, monkeypatch):
    """llama-124m at batch 4096: the KV cache, activations and the last position's fp32 logits (2.3 GiB) are
    counted; with 6 GiB free it is refused before loading (without the logits it would fit), every term said."""
    import workbench.engines.hf

    monkeypatch.setattr(workbench.engines.hf, "available_bytes", lambda device: 6 << 30)
    line = refused_run(capsys, tmp_path, monkeypatch, "--model", "preset:llama-124m", "--batch-size", "4096",
                       "--prompt", "The for statement is used to")
    assert "workbench run: error: this run needs about 7.0 GiB" in line and "but only 6.0 GiB is free" in line
    for term in ("weights 0.5 GiB", "KV cache ", "GiB for batch 4096 x ", "activations ",
                 "logits 2.3 GiB for batch 4096 x vocabulary 50257 in fp32", "lower --batch-size"):
        assert term in line, term


def test_prompt_longer_than_the_context(capsys, tmp_path, monkeypatch):
    line = refused_run(capsys, tmp_path, monkeypatch, "--prompt-tokens", "5000")
    assert "exceeds the model's context" in line and "--max-new-tokens (4)" in line


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


def test_results_names_the_store_and_listing_creates_none(capsys, tmp_path):
    store = tmp_path / "r.sqlite"
    for args in ([], ["--json"], ["--csv"]):
        assert main(["results", "--store", str(store), *args]) == 0
    out = capsys.readouterr().out
    assert f"no runs yet in {store}" in out and "[]" in out
    assert main(["results", "--store", str(store), "--show", "1"]) == 1
    assert f"no run 1 in '{store}': no runs yet" in one_sentence(capsys.readouterr().err)
    assert not store.exists()  # listing never creates a store


def test_every_entry_point_shares_one_default_store(capsys, tmp_path, monkeypatch):
    """No --store: `run` in one folder and `results` in another meet in the user's data folder, which both name."""
    from widgets import Workbench
    from workbench.serve.dashboard import DashboardConfig, environment

    monkeypatch.delenv("WORKBENCH_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = tmp_path / "data" / "workbench" / "results.sqlite"
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    monkeypatch.chdir(tmp_path / "there")
    assert main(["results"]) == 0
    assert f"no runs yet in {default}" in capsys.readouterr().out and not default.parent.exists()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["run", "--model", "tiny", *FAST]) == 0
    assert f"stored as run 1 in {default}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "there")
    assert main(["results"]) == 0
    out = capsys.readouterr().out
    assert f"runs in {default} (newest first)" in out and "tiny" in out
    assert list((tmp_path / "here").iterdir()) == [] and list((tmp_path / "there").iterdir()) == []
    assert Workbench(runner=lambda *a, **k: None).store_path == str(default)  # the app, hence the dashboard
    assert "WORKBENCH_STORE" not in environment(DashboardConfig(), {})  # its kernels find the same default
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "elsewhere.sqlite"))  # the override, for every one
    assert main(["results"]) == 0
    assert f"no runs yet in {tmp_path / 'elsewhere.sqlite'}" in capsys.readouterr().out
    assert Workbench(runner=lambda *a, **k: None).store_path == str(tmp_path / "elsewhere.sqlite")


def test_no_flag_help_describes_what_turning_it_off_does(capsys):
    """`--no-token-events` once said "Emit an event per generated token", the opposite of what it does."""
    from workbench.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-token-events Emit no per-token events" in help_text
    assert "--no-token-events Emit an event" not in help_text


def test_error_messages_name_the_flags_the_user_typed(capsys, tmp_path):
    from workbench.config import RunConfig
    from workbench.flags import flags_in

    assert main(["run", "--prompt", "hi", "--prompt-tokens", "3", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert one_sentence(capsys.readouterr().err).endswith("error: give either --prompt or --prompt-tokens, not both")
    assert main(["run", "--compile", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "--compile needs --kv-cache=static" in one_sentence(capsys.readouterr().err)
    assert flags_in("max_new_tokens must be in 1..; got 0", RunConfig) == "--max-new-tokens must be in 1..; got 0"
    assert flags_in("model must be 'tiny'; the model's context", RunConfig) == "--model must be 'tiny'; the model's " \
                                                                               "context"


def test_results_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["results", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "List the runs in the results store" in out and "never creates a store" in out


def test_the_command_line_says_perplexity_as_the_app_does(capsys, tmp_path):
    from types import SimpleNamespace

    from workbench.cli.distill import progress_line
    from workbench.report import format_summaries

    row = dict(id=1, created_at="2026-01-01T00:00:00", status="ok", model="tiny", dtype="fp32", techniques="",
               decode_tokens_per_s=1.0, ttft_ms_p50=1.0, weights_bytes=1, perplexity=22.3, kl_vs_baseline=None,
               error=None)
    header = format_summaries([row]).splitlines()[0]
    assert "perplexity" in header and "ppl" not in header
    event = SimpleNamespace(step=1, steps=2, loss=3.0, kl=None, heldout_loss=3.0, tokens_per_s=10.0)
    assert "held-out perplexity" in progress_line(event, 3.0) and "ppl" not in progress_line(event, 3.0)


def test_progress_lines_show_each_stage_and_its_first_progress(capsys):
    """The warm-up of a big batch narrates itself on stderr: its first progress line at once, then every 5 s."""
    from workbench.cli.common import progress_printer
    from workbench.events import StageEvent

    printer = progress_printer(True)
    for elapsed, state, message in ((0.0, "start", "1 untimed run(s)"), (40.0, "progress", "64/8,192 tokens, 40 s"),
                                    (41.0, "progress", "128/8,192 tokens, 41 s"),
                                    (46.0, "progress", "256/8,192 tokens, 46 s")):
        printer(StageEvent("warmup", state, message, None, elapsed))
    err = capsys.readouterr().err
    assert "warmup: 1 untimed run(s)" in err and "warmup: 64/8,192 tokens" in err and "warmup: 256/8,192" in err
    assert "128/8,192" not in err  # 1 s after the last line: not printed


def test_more_threads_than_cores_is_a_warning_in_the_printed_result(capsys, tmp_path, monkeypatch):
    import workbench.execution

    monkeypatch.setattr(workbench.execution, "cpu_cores", lambda: 1)
    assert main(["run", "--model", "tiny", *FAST, "--threads", "2", "--store", str(tmp_path / "r.sqlite")]) == 0
    assert "warning: threads 2 is more than the 1 CPU cores this process may use" in capsys.readouterr().out


def test_help_imports_no_command_and_neither_torch_nor_transformers():
    """`workbench --help` (and a light command's --help) took 3.1-3.8 s here importing torch through every
    subcommand's module; only the module of the command being run is imported now."""
    code = ("import sys\nfrom workbench.cli import main\n"
            "for argv in (['--help'], ['report', '--help'], ['nosuch']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'workbench.cli.run', 'workbench.cli.sweep') "
            "if m in sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "[]"
    listing = " ".join(done.stdout.split())
    from workbench.cli.common import HELP

    assert all(f"{name} {text}" in listing for name, text in HELP.items())
    assert "Write one self-contained HTML page comparing stored runs" in listing  # report's own help
    assert "invalid choice: 'nosuch'" in done.stderr


def test_each_command_parses_as_the_whole_parser_does():
    """The parser `main` builds for one command is the whole parser's, and lists the others the same way."""
    from workbench.cli import COMMANDS, build_parser
    from workbench.cli.common import HELP

    assert list(COMMANDS) == list(HELP)  # one line of help per command, in the listing's order
    assert build_parser([]).format_help() == build_parser().format_help()
    whole = build_parser()._subparsers._group_actions[0].choices
    for name in COMMANDS:
        one = build_parser([name])._subparsers._group_actions[0].choices
        assert one[name].format_help() == whole[name].format_help(), name
        assert [a.dest for a in one[name]._actions] == [a.dest for a in whole[name]._actions], name


def test_options_before_the_command(capsys, tmp_path):
    assert main(["-v", "results", "--store", str(tmp_path / "none.sqlite")]) == 0
    assert "no runs yet" in capsys.readouterr().out


def test_a_reader_that_closes_the_pipe_gets_no_traceback(tmp_path):
    """`workbench techniques --json | head -c 200` printed a BrokenPipeError traceback."""
    child = subprocess.Popen([sys.executable, "-m", "workbench", "techniques", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # before the command prints anything (importing takes seconds)
    err = child.stderr.read()
    assert child.wait(timeout=300) == 141 and err == "", err
