"""At most N runs at once across processes (one Voila kernel per visitor), first come first served.

A folder holds N slot files and a queue of tickets. A run holds an exclusive `fcntl.flock` on one slot
file while it runs; a waiting run holds a lock on its own ticket. The kernel releases a process's locks
when it dies, so a crashed or killed kernel frees its slot (and its place in the queue) by itself:
nothing has to be cleaned up. A ticket whose lock can be taken belongs to a dead process and is removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workbench.options import check_fields, option

logger = logging.getLogger(__name__)

ENV = "WORKBENCH_SLOTS"  # "N:FOLDER"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class Slot:
    """A held run slot; `release()` (or leaving the `with` block, or the process ending) frees it."""

    def __init__(self, fd: int, index: int) -> None:
        self.fd: int | None = fd
        self.index = index

    def release(self) -> None:
        """Free the slot for the next run in the queue."""
        if self.fd is not None:
            _unlock(self.fd)
            self.fd = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class RunSlots:
    """N run slots shared by every process that opens the same folder."""

    folder: str = option("", "Folder of the slot and ticket files (shared by the server's kernels).",
                         group="Serving")
    count: int = option(1, "Runs allowed at once.", group="Serving", minimum=1, maximum=1024)
    poll_s: float = option(0.2, "Seconds between checks while waiting.", group="Serving", minimum=0.001,
                           maximum=60.0)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.folder:
            raise ValueError("RunSlots needs a folder")
        (Path(self.folder) / "queue").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RunSlots | None:
        """The slots the server set up in `WORKBENCH_SLOTS` ("N:FOLDER"), or None (no limit)."""
        text = (os.environ if env is None else env).get(ENV, "")
        if not text:
            return None
        count, _, folder = text.partition(":")
        return cls(folder=folder, count=int(count))

    def to_env(self) -> str:
        """The value of `WORKBENCH_SLOTS` for these slots."""
        return f"{self.count}:{self.folder}"

    def try_acquire(self) -> Slot | None:
        """A free slot now, or None."""
        for i in range(self.count):
            fd = _try_lock(Path(self.folder) / f"slot-{i}.lock")
            if fd is not None:
                return Slot(fd, i)
        return None

    def in_use(self) -> int:
        """Slots held right now (by any process)."""
        held = 0
        for i in range(self.count):
            fd = _try_lock(Path(self.folder) / f"slot-{i}.lock")
            if fd is None:
                held += 1
            else:
                _unlock(fd)
        return held

    def _waiting(self) -> list[Path]:
        """Live tickets, oldest first; tickets of dead processes are removed.

        A `.new` file is a ticket being made (see `_new_ticket`); one nobody holds belongs to a process that died
        before publishing it, and is removed too.
        """
        live = []
        queue = Path(self.folder) / "queue"
        for ticket in sorted([*queue.glob("*.ticket"), *queue.glob("*.new")]):
            fd = _try_lock(ticket)
            if fd is None:
                if ticket.suffix == ".ticket":
                    live.append(ticket)
                continue
            ticket.unlink(missing_ok=True)  # nobody holds it: its process is gone
            _unlock(fd)
        return live

    def _new_ticket(self) -> tuple[Path, int]:
        """A ticket at the end of the queue and the descriptor holding its lock.

        The file is made and locked as `NAME.new`, then renamed: a `.ticket` is visible to others only once locked,
        so it is never taken for a dead one. Another process's sweep may lock and remove the `.new` file between
        its creation and our lock (it looks dead then); that name is given up and a new one made.
        """
        while True:
            name = Path(self.folder) / "queue" / f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fd = _try_lock(name.with_suffix(".new"))
            if fd is None:  # a sweep holds it and is removing it
                continue
            ticket = name.with_suffix(".ticket")
            try:
                os.rename(name.with_suffix(".new"), ticket)
            except FileNotFoundError:  # a sweep removed it before we locked it: we locked a file with no name
                _unlock(fd)
                continue
            return ticket, fd

    def acquire(self, should_stop: Callable[[], bool] = lambda: False,
                on_wait: Callable[[int], None] = lambda place: None) -> Slot | None:
        """Wait for a slot in arrival order; `on_wait(place)` whenever the place (1 = next) changes.

        Returns None when `should_stop()` became true while waiting (the ticket is withdrawn).
        """
        slot = self.try_acquire() if not self._waiting() else None
        if slot is not None:
            return slot
        ticket, fd = self._new_ticket()
        last = 0
        try:
            while not should_stop():
                ahead = self._waiting().index(ticket) if ticket.exists() else 0
                if ahead < self.count:  # the first `count` tickets compete for the slots freed
                    slot = self.try_acquire()
                    if slot is not None:
                        return slot
                if ahead + 1 != last:
                    last = ahead + 1
                    on_wait(last)
                time.sleep(self.poll_s)
            return None
        finally:
            ticket.unlink(missing_ok=True)
            _unlock(fd)
