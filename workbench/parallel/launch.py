"""Start the ranks of a tensor- or data-parallel run with torch's elastic launcher (torchrun's machinery), and follow them.

The parent checks the request, writes a private launch file (config, relay address, token), starts N
`python -m workbench.parallel.worker` ranks through `torch.distributed.launcher.api.elastic_launch` in a
thread, and relays: rank 0's events to `on_event`, `should_stop` to every rank, rank 0's result back. A
failing rank becomes one WorkbenchError naming it; ranks are terminated if the parent is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workbench import errors
from workbench.config import RunConfig
from workbench.errors import RunFailed
from workbench.events import OnEvent, never_stop, no_event
from workbench.parallel.distributed import layout
from workbench.parallel.relay import Relay
from workbench.paths import share_import_path
from workbench.wire import event_from_wire
from workbench.result import RunResult

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # from launch until every rank has connected
STOP_GRACE_S = 120.0  # from a stop request until the ranks have ended
_QUIET = ("torchelastic-events-null", "torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")


def run_distributed(config: RunConfig, on_event: OnEvent = no_event,
                    should_stop: Callable[[], bool] = never_stop) -> RunResult:
    """Run `config` as tensor / data / pipeline-parallel ranks on this machine; rank 0's merged result."""
    plan = layout(config)  # every refusal happens here, before a process starts
    return RunResult.from_dict(launch_ranks("workbench.parallel.worker", config.to_dict(), plan.world_size, on_event,
                                            should_stop, f"the {plan.world_size} ranks of {config.model}"))


def launch_ranks(module: str, config: dict[str, Any], world: int, on_event: OnEvent,
                 should_stop: Callable[[], bool], who: str) -> dict[str, Any]:
    """Start `world` ranks of `python -m module --launch-file FILE` (FILE: `config`, the relay's address and
    token), relay rank 0's events and the stop requests, and return rank 0's result dict; one WorkbenchError
    sentence naming the failing rank otherwise (`who` names the ranks when none says more)."""
    with tempfile.TemporaryDirectory(prefix="workbench-ranks-") as folder, Relay() as relay:
        launch_file = Path(folder) / "launch.json"
        fd = os.open(launch_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the token stays private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"config": config, "relay": relay.address, "token": relay.token}, f)
        ranks = Ranks(["-u", "-m", module, "--launch-file", str(launch_file)], world, Path(folder) / "logs")
        ranks.start()
        try:
            outcome = _follow(relay, ranks, on_event, should_stop)
        finally:
            relay.close()  # ranks still running see the end of file and stop
            ranks.end(list(relay.pids.values()))
    if outcome["result"] is None:
        _raise_failure(outcome, ranks, world, who)
    return outcome["result"]


class Ranks:
    """N local processes started by torch's elastic launcher in a background thread (as torchrun starts them)."""

    def __init__(self, args: Sequence[str], nproc: int, log_dir: Path, entrypoint: str = sys.executable) -> None:
        self.args, self.nproc, self.log_dir, self.entrypoint = list(args), nproc, log_dir, entrypoint
        self.run_id = f"workbench-{uuid.uuid4().hex[:12]}"
        self.returns: dict[int, Any] | None = None
        self.failures: dict[int, tuple[int, str, float]] = {}  # rank -> (exit code, message, when)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="workbench-ranks", daemon=True)

    def start(self) -> None:
        """Start the launcher thread (returns at once); the ranks import the same `workbench` as this process."""
        share_import_path()
        self.thread.start()

    def _run(self) -> None:
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=self.nproc, run_id=self.run_id,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"timeout": 120},
                              max_restarts=0, monitor_interval=0.1,
                              logs_specs=DefaultLogsSpecs(log_dir=str(self.log_dir), redirects=Std.ALL))
        try:
            with _quiet_launcher():
                self.returns = elastic_launch(config, self.entrypoint)(*self.args)
        except ChildFailedError as e:
            self.failures = {rank: (f.exitcode, f.message, f.timestamp) for rank, f in e.failures.items()}
        except BaseException as e:  # noqa: BLE001 - reported by the following thread
            self.error = e

    @property
    def running(self) -> bool:
        """Whether the launcher still waits for ranks."""
        return self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the launcher to finish; True when it did."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stderr_tail(self, local_rank: int) -> str:
        """The last non-empty line a rank wrote on stderr."""
        for path in self.log_dir.glob(f"**/{local_rank}/stderr.log"):
            with contextlib.suppress(OSError):
                lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
                if lines:
                    return lines[-1][:300]
        return ""

    def end(self, pids: Sequence[int], grace_s: float = 10.0) -> None:
        """Make sure no rank outlives the run: wait a little, then terminate the ranks' process groups."""
        if self.wait(grace_s):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in set(pids) | set(self._children()):
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:  # elastic starts each rank in its own session
                        os.killpg(pid, sig)
            if self.wait(5.0):
                return
        logger.warning("the rank launcher did not finish; its processes were killed")

    def _children(self) -> list[int]:
        """Our child processes that run this launch's ranks (some may not have connected yet)."""
        import psutil

        marker = self.args[-1]
        found = []
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if marker in child.cmdline():
                    found.append(child.pid)
        return found


@contextlib.contextmanager
def _quiet_launcher() -> Any:
    """The launcher logs each rank failure with a traceback; the parent reports it as one sentence instead."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _follow(relay: Relay, ranks: Ranks, on_event: OnEvent, should_stop: Callable[[], bool]) -> dict[str, Any]:
    """Relay events and stop requests until the launcher is done; what the ranks reported."""
    outcome: dict[str, Any] = {"result": None, "errors": [], "timeout": None}
    started, asked_at = time.monotonic(), None
    while True:
        if asked_at is None and should_stop():
            relay.stop_all()
            asked_at = time.monotonic()
        for message in relay.poll(0.05):
            _take(message, outcome, on_event)
        if not ranks.running:
            _drain(relay, outcome, on_event)
            return outcome
        now = time.monotonic()
        if asked_at is not None and now - asked_at > STOP_GRACE_S:
            outcome["timeout"] = f"the ranks did not end within {STOP_GRACE_S:.0f} s of the stop request"
            return outcome
        if len(relay.pids) < ranks.nproc and now - started > START_TIMEOUT_S:
            outcome["timeout"] = f"only {len(relay.pids)} of {ranks.nproc} ranks started within {START_TIMEOUT_S:.0f} s"
            return outcome


def _take(message: dict[str, Any], outcome: dict[str, Any], on_event: OnEvent) -> None:
    if "event" in message:
        event = event_from_wire(message)
        if event is not None:
            on_event(event)
    elif "result" in message:
        outcome["result"] = message["result"]
    elif "error" in message:
        outcome["errors"].append(message)


def _drain(relay: Relay, outcome: dict[str, Any], on_event: OnEvent, limit_s: float = 5.0) -> None:
    """Read what the ended ranks still had on their way."""
    deadline = time.monotonic() + limit_s
    while relay.open_links and time.monotonic() < deadline:
        for message in relay.poll(0.05):
            _take(message, outcome, on_event)


def _raise_failure(outcome: dict[str, Any], ranks: Ranks, world: int, who: str) -> None:
    """One WorkbenchError sentence that names the failing rank (rank 0 sent no result)."""
    reports = sorted(outcome["errors"], key=lambda m: bool(m.get("secondary")))  # root causes first
    reported = {m.get("rank") for m in reports}
    silent_deaths = [r for r, (code, _m, _t) in ranks.failures.items()
                     if r not in reported and code != -signal.SIGTERM]
    if reports and not (reports[0].get("secondary") and silent_deaths):
        first = reports[0]
        cls = getattr(errors, str(first.get("type")), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, errors.WorkbenchError) else RunFailed
        raise cls(f"rank {first['rank']} of {world} failed: {first['error']}")
    if outcome["timeout"]:
        raise RunFailed(f"{outcome['timeout']}; they were terminated")
    if ranks.failures:
        # the launcher terminates the other ranks once one fails: report the first that was not terminated by it
        rank, (code, _message, _when) = min(ranks.failures.items(),
                                            key=lambda kv: (kv[1][0] == -signal.SIGTERM, kv[1][2], kv[0]))
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = ranks.stderr_tail(rank)
        raise RunFailed(f"rank {rank} of {world} {how} without a result" + (f": {tail}" if tail else ""))
    if ranks.error is not None:
        raise RunFailed(f"the ranks could not be started: {str(ranks.error).strip().splitlines()[0][:200]}")
    raise RunFailed(f"{who} ended without a result")
