"""Publishing the dashboard: the publisher's lock, the cross-process run queue, the cap on visitors, the token.

Unit tests first (no browser); the browser tests at the end serve a published, locked dashboard.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workbench.config import RunConfig
from workbench.errors import ConfigError
from workbench.serve.publish import PublishPolicy, check_distill, check_run, check_sensitivity, is_loopback
from workbench.serve.slots import RunSlots


# ---------------------------------------------------------------------------------------------- the lock
@pytest.fixture
def policy(tmp_path) -> PublishPolicy:
    return PublishPolicy(models="tiny,preset:gpt2-124m,student:*", root=str(tmp_path))


def test_loopback_addresses():
    assert all(is_loopback(ip) for ip in ("127.0.0.1", "127.1.2.3", "localhost", "::1"))
    assert not any(is_loopback(ip) for ip in ("0.0.0.0", "::", "192.168.1.4", "example.org"))


def test_policy_defaults_and_round_trip(tmp_path):
    default = PublishPolicy(root=str(tmp_path))
    assert default.models[0] == "tiny" and "preset:llama-124m" in default.models and "student:*" in default.models
    assert PublishPolicy.from_json(default.to_json()) == default
    assert PublishPolicy.from_env({}) is None
    assert PublishPolicy.from_env({"WORKBENCH_POLICY": default.to_json()}) == default
    with pytest.raises(ValueError):  # a locked server never falls back to an unlocked app
        PublishPolicy.from_env({"WORKBENCH_POLICY": "{not json"})
    assert PublishPolicy().root == str(Path.cwd().resolve())


@pytest.mark.parametrize("changes, fragment", [
    ({"models": "tiny,preset:nope"}, "--models: unknown preset 'nope'"),
    ({"models": "student:*"}, "--models must name at least one model besides student:*"),
    ({"max_batch_size": 0}, "max_batch_size must be in 1.."),
    ({"max_duration_s": -1.0}, "max_duration_s must be in 0.0.."),
])
def test_bad_policies(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        PublishPolicy(**changes)


def test_allowed_runs_pass(policy):
    check_run(policy, RunConfig(model="preset:gpt2-124m", batch_size=8, max_new_tokens=256, eval_tokens=4096))
    check_run(policy, RunConfig(model="student:mine"))
    check_run(policy, RunConfig(device_map="model.layers.0-1=cpu"))


@pytest.mark.parametrize("changes, fragment", [
    ({"trust_remote_code": True}, "does not allow trust_remote_code or allow_pickle"),
    ({"allow_pickle": True}, "does not allow trust_remote_code or allow_pickle"),
    ({"model": "preset:llama-124m"}, "model 'preset:llama-124m' is not offered on this server; choose one of: tiny"),
    ({"model": "/etc"}, "model '/etc' is not offered on this server"),
    ({"batch_size": 9}, "batch_size 9 is above this server's limit of 8"),
    ({"max_new_tokens": 257}, "max_new_tokens 257 is above this server's limit of 256"),
    ({"prompt_tokens": 1025}, "prompt_tokens 1025 is above"),
    ({"prompt": "x" * 4097}, "the prompt has 4097 characters, above this server's limit of 4096"),
    ({"eval_tokens": 5000}, "eval_tokens 5000 is above this server's limit of 4096"),
    ({"repeats": 51}, "repeats 51 is above"),
    ({"warmup": 51}, "warmup 51 is above"),
    ({"min_duration_s": 31.0}, "min_duration_s 31 is above this server's limit of 30"),
    ({"tensor_parallel": 3}, "parallel processes 3 is above this server's limit of 2"),
    ({"device_map": "model.layers.0-1=disk"}, "does not allow offloading layers to disk"),
    ({"device_map": "model.layers.0-1=cpu", "offload_folder": "/etc"}, "does not allow offloading layers to disk"),
])
def test_locked_runs_refused_in_one_sentence(policy, changes, fragment):
    config = RunConfig(**changes)  # valid for the workbench: the core's validation is unchanged
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("*", r"\*")) as e:
        check_run(policy, config)
    assert "\n" not in str(e.value)


def test_file_inputs_stay_in_the_working_folder(policy, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("hello")
    assert policy.resolve_path("data/t.txt") == str(tmp_path / "data" / "t.txt")
    assert policy.resolve_path(str(tmp_path / "data" / "t.txt")) == str(tmp_path / "data" / "t.txt")
    for outside in ("/etc/passwd", "../x.txt", "data/../../x.txt", "~/.ssh/id_rsa"):
        with pytest.raises(ConfigError, match="is outside this server's working folder"):
            policy.resolve_path(outside)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ConfigError, match="'link/passwd' is outside"):  # no escape through a symlink
        policy.resolve_path("link/passwd")


def test_distillation_and_sensitivity_checks(policy, tmp_path):
    from workbench.distill import DistillConfig

    (tmp_path / "t.txt").write_text("some text")
    assert check_distill(policy, DistillConfig(text="t.txt")).text == str(tmp_path / "t.txt")
    for changes, fragment in (({"text": "/etc/hostname"}, "training text '/etc/hostname' is outside"),
                              ({"teacher": "gpt2"}, "teacher 'gpt2' is not offered"),
                              ({"student": "model:gpt2"}, "student starting model 'gpt2' is not offered"),
                              ({"steps": 501}, "steps 501 is above"), ({"batch_size": 9}, "batch_size 9 is above"),
                              ({"data_parallel": 4}, "parallel processes 4 is above this server's limit of 2")):
        with pytest.raises(ConfigError, match=fragment):
            check_distill(policy, DistillConfig(**changes))
    check_sensitivity(policy, "tiny", 512)
    with pytest.raises(ConfigError, match="eval_tokens 5000 is above"):
        check_sensitivity(policy, "tiny", 5000)


# ---------------------------------------------------------------------------------------------- run slots
def test_slots_are_taken_and_freed(tmp_path):
    slots = RunSlots(folder=str(tmp_path), count=2)
    a, b = slots.try_acquire(), slots.try_acquire()
    assert a is not None and b is not None and slots.try_acquire() is None and slots.in_use() == 2
    a.release()
    assert slots.in_use() == 1
    with slots.try_acquire() as c:
        assert c.index == a.index and slots.in_use() == 2
    assert slots.in_use() == 1
    assert RunSlots.from_env({"WORKBENCH_SLOTS": slots.to_env()}) == slots and RunSlots.from_env({}) is None


def _waiter(slots: RunSlots, places: list[int], got: list, stop: threading.Event) -> threading.Thread:
    def work() -> None:
        slot = slots.acquire(stop.is_set, places.append)
        got.append(slot)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_waiters_queue_in_order_and_see_their_place(tmp_path):
    slots = RunSlots(folder=str(tmp_path), count=1, poll_s=0.01)
    held = slots.try_acquire()
    first_places, first_got, second_places, second_got = [], [], [], []
    never = threading.Event()
    t1 = _waiter(slots, first_places, first_got, never)
    wait_until(lambda: first_places == [1])
    t2 = _waiter(slots, second_places, second_got, never)
    wait_until(lambda: second_places == [2])
    held.release()
    t1.join(10)
    assert first_got and first_got[0] is not None and not second_got  # first come, first served
    wait_until(lambda: second_places == [2, 1])  # the second moved up
    first_got[0].release()
    t2.join(10)
    assert second_got and second_got[0] is not None
    second_got[0].release()
    assert not list((tmp_path / "queue").iterdir())


def test_stop_while_waiting_leaves_the_queue(tmp_path):
    slots = RunSlots(folder=str(tmp_path), count=1, poll_s=0.01)
    held = slots.try_acquire()
    places, got, stop = [], [], threading.Event()
    t = _waiter(slots, places, got, stop)
    wait_until(lambda: places == [1])
    stop.set()
    t.join(10)
    assert got == [None] and not list((tmp_path / "queue").iterdir())
    held.release()


HOLD = """
import sys, time
from workbench.serve.slots import RunSlots
slots = RunSlots(folder=sys.argv[1], count=1)
slot = slots.try_acquire() if sys.argv[2] == "slot" else None
if sys.argv[2] == "ticket":
    slots.acquire()  # waits forever behind the test's slot, holding a ticket
print("held" if slot else "waiting", flush=True)
time.sleep(600)
"""


def _holder(folder: Path, what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    return proc


def test_a_dead_process_frees_its_slot_and_its_place(tmp_path):
    """Kernels are processes: a killed kernel must not keep a slot or block the queue."""
    slots = RunSlots(folder=str(tmp_path), count=1, poll_s=0.01)
    proc = _holder(tmp_path, "slot")
    try:
        assert proc.stdout.readline().strip() == "held"
        assert slots.try_acquire() is None
    finally:
        proc.kill()
        proc.wait(10)
    mine = slots.try_acquire()
    assert mine is not None
    waiter = _holder(tmp_path, "ticket")  # waits behind `mine`
    try:
        wait_until(lambda: len(list((tmp_path / "queue").glob("*.ticket"))) == 1)  # published, not still `.new`
    finally:
        waiter.kill()
        waiter.wait(10)
    mine.release()
    places: list[int] = []
    slot = slots.acquire(on_wait=places.append)
    assert slot is not None and places == []  # the dead waiter's ticket did not hold anyone back
    assert not list((tmp_path / "queue").iterdir())
    slot.release()


def test_a_ticket_left_half_made_is_swept_and_one_being_made_is_left_alone(tmp_path):
    """A process killed between making its ticket (`.new`) and publishing it must not leave litter or block anyone."""
    slots = RunSlots(folder=str(tmp_path), count=1, poll_s=0.01)
    queue = tmp_path / "queue"
    (queue / "00000000000000000001-1-dead.new").touch()  # nobody holds it: its process died mid-way
    being_made = queue / "00000000000000000002-2-live.new"
    fd = os.open(being_made, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process, between locking and renaming
    try:
        places: list[int] = []
        slot = slots.acquire(on_wait=places.append)
        assert slot is not None and places == []  # neither counts as a waiter ahead
        assert sorted(p.name for p in queue.iterdir()) == [being_made.name]
        slot.release()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert slots._waiting() == [] and not list(queue.iterdir())  # released unpublished: swept


def test_a_ticket_swept_while_being_made_is_made_again(tmp_path, monkeypatch):
    """Another process's sweep can lock or remove our `.new` file before we lock it; we take a new name."""
    import workbench.serve.slots as slots_mod

    slots = RunSlots(folder=str(tmp_path), count=1, poll_s=0.01)
    real = slots_mod._try_lock
    tries: list[Path] = []

    def contested(path):
        tries.append(path)
        if len(tries) == 1:  # the sweep holds the lock
            return None
        fd = real(path)
        if len(tries) == 2:  # the sweep removed the file between our open and our lock
            path.unlink()
        return fd

    monkeypatch.setattr(slots_mod, "_try_lock", contested)
    ticket, fd = slots._new_ticket()
    monkeypatch.setattr(slots_mod, "_try_lock", real)
    try:
        assert len(tries) == 3 and len({p.name for p in tries}) == 3 and all(p.suffix == ".new" for p in tries)
        assert ticket.suffix == ".ticket" and ticket.stem == tries[2].stem and slots._waiting() == [ticket]
    finally:
        slots_mod._unlock(fd)
        ticket.unlink()


# ---------------------------------------------------------------------------------------------- the app
@pytest.fixture
def locked_app(policy, tmp_path):
    from test_app import ScriptedRunner

    from widgets import Workbench

    return Workbench(store_path=str(tmp_path / "runs.sqlite"), runner=ScriptedRunner(), policy=policy,
                     analyzer=lambda *a, **k: None)


def test_locked_app_has_no_trust_or_pickle_inputs_and_only_listed_models(locked_app):
    from widgets import Workbench

    assert set(locked_app.model_panel.form.inputs) == {"dtype"}
    from workbench.models.sources import saved_students

    students = [f"student:{name}" for name in saved_students()]  # student:* is listed: those saved by earlier tests
    assert [v for _, v in locked_app.model_panel.source.options] == ["tiny", "preset:gpt2-124m", *students]
    assert "Locked by its publisher" in locked_app.children[0].value
    unlocked = Workbench(store_path=locked_app.store_path, runner=lambda *a, **k: None)
    assert {"trust_remote_code", "allow_pickle"} <= set(unlocked.model_panel.form.inputs)
    with pytest.raises(ConfigError, match="not offered on this server"):
        locked_app.set_values(model="/srv/other-model")


def test_locked_app_refuses_before_run(locked_app):
    locked_app.set_values(batch_size=9)
    assert re.search(r"batch.size 9 is above this server", locked_app.problems.value) and locked_app.run_button.disabled
    assert locked_app.start() is False and locked_app.runner.calls == 0
    locked_app.set_values(batch_size=2)
    locked_app.model_panel.other.value = "/etc"  # a crafted widget message cannot pick a model either
    assert locked_app.start() is True
    locked_app.wait(10)
    assert locked_app.runner.calls == 1


def test_locked_distillation_refuses_a_file_outside_the_folder(locked_app):
    locked_app.distill.form.set_values({"text": "/etc/hostname"})
    assert locked_app.distill.start() is False
    assert "is outside this server&#x27;s working folder" in locked_app.distill.status.value
    locked_app.sensitivity.tokens.value = 5000
    locked_app.sensitivity.spec.value = "sim:bits=4"
    assert locked_app.sensitivity.start() is False
    assert re.search(r"eval.tokens 5000 is above", locked_app.sensitivity.status.value)


def test_locked_exports_land_in_the_working_folder(locked_app, policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # a kernel's own folder is the notebook's, not the server's
    assert locked_app.history.export_csv() is not None
    assert (tmp_path / "workbench-results.csv").exists() and not (tmp_path / ".." / "workbench-results.csv").exists()


def test_using_a_student_a_locked_server_does_not_offer_says_why(tmp_path):
    from types import SimpleNamespace

    from widgets import Workbench

    app = Workbench(store_path=str(tmp_path / "r.sqlite"), runner=lambda *a, **k: None,
                    policy=PublishPolicy(models="tiny", root=str(tmp_path)))
    app.distill.last_result = SimpleNamespace(model="student:mine")
    app.distill.use()
    assert "model &#x27;student:mine&#x27; is not offered on this server" in app.distill.status.value
    assert app.model_panel.model() == "tiny"


def test_a_second_app_waits_for_the_run_slot_and_can_leave_the_queue(tmp_path):
    from test_app import ScriptedRunner

    from widgets import Workbench

    slots = RunSlots(folder=str(tmp_path / "slots"), count=1, poll_s=0.01)
    block = threading.Event()
    first = Workbench(store_path=str(tmp_path / "r.sqlite"), runner=ScriptedRunner(block=block), slots=slots)
    second = Workbench(store_path=str(tmp_path / "r.sqlite"), runner=ScriptedRunner(), slots=slots)
    assert first.start()
    first.runner.started.wait(10)
    assert second.start()
    wait_until(lambda: "place 1 in the queue (you are next" in second.status.value)
    assert second.progress.description == "queued" and second.runner.calls == 0
    second.stop()  # Stop while waiting: leaves the queue, nothing runs
    second.wait(10)
    assert "stopped while waiting in the queue: nothing ran" in second.status.value and second.runner.calls == 0
    assert second.start()
    wait_until(lambda: "place 1 in the queue" in second.status.value)
    block.set()
    first.wait(10)
    second.wait(10)
    assert second.runner.calls == 1 and second.last_result is not None and second.last_error is None


# ---------------------------------------------------------------------------------------------- serving
def test_published_defaults():
    from workbench.serve.dashboard import DashboardConfig, local_url, voila_command

    local, public = DashboardConfig(), DashboardConfig(ip="0.0.0.0")
    assert (local.needs_token, local.locked, local.runs_limit, local.users_limit) == (False, False, 0, 0)
    assert (public.needs_token, public.locked, public.runs_limit, public.users_limit) == (True, True, 1, 8)
    assert DashboardConfig(ip="0.0.0.0", token=False, lock=False, max_runs=0).runs_limit == 0
    assert DashboardConfig(token=True, lock=True).locked
    cmd = voila_command(public)
    assert "--Voila.auto_token=True" in cmd and "--LimitedKernelManager.max_kernels=8" in cmd
    assert not any("auto_token" in c or "LimitedKernelManager" in c for c in voila_command(local))
    assert local_url(public, "abc") == "http://127.0.0.1:8866/?token=abc"


def test_the_token_and_the_lock_reach_the_server_by_environment_only(tmp_path, monkeypatch, policy):
    from workbench.serve.dashboard import DashboardConfig, environment, server_token, voila_command

    monkeypatch.setenv("WORKBENCH_POLICY", "inherited")
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    config = DashboardConfig(ip="0.0.0.0", store=str(tmp_path / "s.sqlite"))
    token = server_token(config)
    assert token and len(token) >= 24 and server_token(DashboardConfig()) is None
    slots = RunSlots(folder=str(tmp_path / "slots"), count=1)
    env = environment(config, {}, policy, slots, token)
    assert env["JUPYTER_TOKEN"] == token and token not in " ".join(voila_command(config))
    assert PublishPolicy.from_env(env) == policy and RunSlots.from_env(env) == slots
    assert "WORKBENCH_POLICY" not in environment(DashboardConfig(store=config.store), {})  # never inherited
    monkeypatch.setenv("JUPYTER_TOKEN", "chosen-by-the-publisher")
    assert server_token(config) == "chosen-by-the-publisher"


def test_cli_dashboard_publishing_flags(monkeypatch, capsys, tmp_path):
    import workbench.serve.dashboard as dashboard
    from workbench.cli import main

    served = {}
    monkeypatch.setattr(dashboard, "serve", lambda config, defaults, policy, token: served.update(
        config=config, policy=policy, token=token) or 0)
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", "--ip", "0.0.0.0", "--models", "tiny", "--max-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"?token={served['token']}" in out and "locked: models tiny; batch <= 4" in out
    assert served["policy"].models == ("tiny",) and served["policy"].root == str(tmp_path.resolve())
    assert main(["dashboard", "--ip", "0.0.0.0", "--no-token", "--no-lock"]) == 0
    captured = capsys.readouterr()
    assert served["token"] is None and served["policy"] is None and "?token=" not in captured.out
    assert "published without a token" in captured.err
    for argv, fragment in ((["--max-batch-size", "4"], "--max-batch-size sets the publisher's lock, which is off "
                                                       "here: add --lock"),
                           (["--lock", "--models", "tiny", "--set", "batch_size=64"], "batch_size 64 is above"),
                           (["--lock", "--models", "tiny,preset:nope"], "--models: unknown preset 'nope'"),
                           (["--max-runs", "-1"], "max_runs must be in 0..")):
        assert main(["dashboard", *argv]) == 2
        assert fragment in capsys.readouterr().err


def test_kernel_cap_refuses_the_next_visitor_without_a_race(monkeypatch):
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
    from tornado.web import HTTPError

    from workbench.serve.voila_limits import LimitedKernelManager

    started: list[str] = []
    gate = asyncio.Event()

    async def fake_start(self, *args, **kwargs):
        await gate.wait()  # starting a kernel takes a while: others arrive meanwhile
        started.append(f"k{len(started)}")
        return started[-1]

    monkeypatch.setattr(AsyncMappingKernelManager, "start_kernel", fake_start)
    monkeypatch.setattr(LimitedKernelManager, "list_kernel_ids", lambda self: list(started))

    async def visitors() -> list:
        km = LimitedKernelManager(max_kernels=2)
        tasks = [asyncio.ensure_future(km.start_kernel()) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(visitors())
    assert results[:2] == ["k0", "k1"]
    assert isinstance(results[2], HTTPError) and results[2].status_code == 503
    assert results[2].reason == ("Busy - this dashboard already serves 2 people, its limit. Please try again in a "
                                 "few minutes.")


# ---------------------------------------------------------------------------------------------- in a browser
def browser_test(fn):
    """Mark a real-browser test (skipped without chromium)."""
    from tools.browser import chromium_path

    skip = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (bash dev.sh setup)")
    return pytest.mark.browser(skip(fn))


TOKEN = "published-test-token-0123456789"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published dashboard: bound to 0.0.0.0 (the tests connect to 127.0.0.1 only), token, lock, 1 run, 2 users."""
    from test_dashboard import DEFAULTS

    from tools.browser import free_port, server
    from workbench.serve.dashboard import DashboardConfig, environment, notebook_path, voila_command

    root = tmp_path_factory.mktemp("published")
    config = DashboardConfig(ip="0.0.0.0", port=free_port(), store=str(root / "runs.sqlite"), cull_idle_s=600,
                             max_runs=1, max_users=2)
    policy = PublishPolicy(models="tiny,preset:gpt2-124m", root=str(root))
    slots = RunSlots(folder=str(root / "slots"), count=config.runs_limit)
    env = {k: v for k, v in environment(config, DEFAULTS, policy, slots, TOKEN).items()
           if k.startswith("WORKBENCH_") or k == "JUPYTER_TOKEN"}
    base = f"http://127.0.0.1:{config.port}/"
    with server(voila_command(config, notebook_path()), base + "login", root, home=root / "home",
                log=root / "voila.log", env=env, timeout=120):  # the login page answers without starting a kernel
        yield {"base": base, "url": f"{base}?token={TOKEN}", "root": root}


@pytest.fixture(scope="module")
def visitors(published):
    """The chromium browser and the pages opened on the published dashboard (kept open: each holds a kernel)."""
    from tools.browser import browser

    with browser() as b:
        pages: list = []
        yield b, pages
        for p in pages:
            p.close()


def _visitor(published, visitors, index: int):
    from test_dashboard import Page

    chromium, pages = visitors
    while len(pages) <= index:
        pages.append(Page(chromium, published["url"]))
    return pages[index]


@browser_test
def test_published_page_needs_the_token(published, visitors):
    import urllib.request

    from tools.browser import widget_button

    for url in (published["base"], published["base"] + "?token=wrong"):
        with urllib.request.urlopen(url, timeout=30) as reply:  # redirected to the login form, no kernel started
            assert "/login" in reply.geturl() and "Run" not in reply.read().decode()
    context = visitors[0].new_context()
    try:
        page = context.new_page()
        page.goto(published["base"], timeout=60_000)
        assert "/login" in page.url and page.locator("input[type=password]").count() >= 1  # the token form
        assert widget_button(page, "Run").count() == 0
    finally:
        context.close()


@browser_test
def test_locked_page_has_no_trust_or_pickle_inputs_and_refuses_outside_files(published, visitors):
    from tools.browser import widget_button

    first = _visitor(published, visitors, 0)
    page = first.page
    assert page.get_by_text("dtype", exact=True).count() >= 1  # the model panel is there ...
    for label in ("trust remote code", "allow pickle"):  # ... without these inputs at all
        assert page.get_by_text(label).count() == 0
    options = page.locator(".widget-dropdown select").first.locator("option").all_inner_texts()
    assert [o.replace("\xa0", " ").split(" ")[0] for o in options] == ["tiny", "preset:gpt2-124m"]
    assert page.get_by_text("Locked by its publisher").count() == 1
    box = first.text_input("text")
    box.fill("/etc/hostname")
    box.press("Enter")
    time.sleep(1.0)
    widget_button(page, "Start training").click()
    page.get_by_text("training text '/etc/hostname' is outside this server's working folder").wait_for(timeout=60_000)
    assert first.errors == []


@browser_test
def test_with_one_run_slot_a_second_page_waits_its_turn(published, visitors):
    import re

    from test_dashboard import POINTS_JS, finished_runs

    from tools.browser import widget_button

    first, second = _visitor(published, visitors, 0), _visitor(published, visitors, 1)
    first.open_section("Measurement")
    box = first.text_input("min duration s")
    box.fill("12")  # the first run holds the only slot for at least 12 s
    box.press("Enter")
    time.sleep(1.0)
    widget_button(first.page, "Run").click()
    first.page.wait_for_function(f"({POINTS_JS})('Per-token latency') > 0", timeout=180_000)
    widget_button(second.page, "Run").click()
    second.page.get_by_text(re.compile(r"place 1 in the queue \(you are next")).wait_for(timeout=60_000)
    assert finished_runs(second) == 0 and widget_button(second.page, "Stop").is_enabled()  # Stop can leave
    first.page.get_by_text(re.compile(r"done: run \d+")).wait_for(timeout=240_000)
    second.page.get_by_text(re.compile(r"done: run \d+")).wait_for(timeout=240_000)
    assert finished_runs(second) > finished_runs(first)  # stored after the first: it ran after it
    assert first.errors == [] and second.errors == []


@browser_test
def test_the_next_visitor_gets_the_busy_page(published, visitors):
    _visitor(published, visitors, 1)  # two pages open: the limit
    context = visitors[0].new_context()
    try:
        page = context.new_page()
        reply = page.goto(published["url"], timeout=120_000)
        assert reply.status == 503
        assert page.get_by_text("Busy - this dashboard already serves 2 people, its limit. Please try again in a few "
                                "minutes.").count() == 1
    finally:
        context.close()
