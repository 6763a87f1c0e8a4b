"""Between the launching process and its ranks: JSON lines over a localhost socket.

Ranks send up `{"hello"}`, events, the result (rank 0) or an error; the parent sends down `stop`.
Every rank connects, so a stop request, or the parent going away (end of file), reaches each one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import selectors
import socket
import threading
from typing import Any

from workbench.wire import event_to_wire

logger = logging.getLogger(__name__)

_MAX_LINE = 64 << 20  # a result with every repeat's token times stays far below this


class RankLink:
    """A rank's end: events and the result go up; `stop` (or the parent closing) sets `stop`."""

    def __init__(self, address: str, token: str, rank: int, timeout_s: float = 60.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.sock.settimeout(None)
        self.stop = threading.Event()
        self.parent_gone = threading.Event()
        self._lock = threading.Lock()
        self.send({"hello": rank, "pid": os.getpid(), "token": token})
        threading.Thread(target=self._listen, name="workbench-rank-link", daemon=True).start()

    def _listen(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self.sock.makefile("r", encoding="utf-8"):
                if line.strip() == "stop":
                    self.stop.set()
        self.parent_gone.set()
        self.stop.set()

    def send(self, message: dict[str, Any]) -> None:
        """One JSON line; a parent that is gone turns into a stop request."""
        data = (json.dumps(message, default=str) + "\n").encode()
        try:
            with self._lock:
                self.sock.sendall(data)
        except OSError:
            self.parent_gone.set()
            self.stop.set()

    def emit(self, event: Any) -> None:
        """`on_event` of rank 0."""
        self.send(event_to_wire(event))

    def close(self) -> None:
        """Say nothing more."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            self.sock.close()


class Relay:
    """The parent's end: a listening localhost socket; `poll` returns the ranks' messages, each with its rank."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.token = secrets.token_hex(16)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.server, selectors.EVENT_READ)
        self.buffers: dict[socket.socket, bytes] = {}
        self.ranks: dict[socket.socket, int] = {}
        self.pids: dict[int, int] = {}  # rank -> pid, from each rank's hello
        self.stopping = False

    @property
    def address(self) -> str:
        """host:port for the ranks."""
        host, port = self.server.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def open_links(self) -> int:
        """Ranks still connected."""
        return len(self.buffers)

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Accept, read, and return complete messages (waiting at most `timeout` seconds for any)."""
        out: list[dict[str, Any]] = []
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.server:
                self._accept()
            else:
                out += self._read(key.fileobj)
        return out

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            conn, _ = self.server.accept()
            conn.setblocking(False)
            self.buffers[conn] = b""
            self.selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: Any) -> list[dict[str, Any]]:
        try:
            data = conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return []
        buffer = self.buffers[conn] + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > _MAX_LINE:
            logger.warning("dropping a rank connection that sent an over-long line")
            self._drop(conn)
            return []
        self.buffers[conn] = rest
        return [m for m in (self._message(conn, line) for line in lines if line.strip()) if m is not None]

    def _message(self, conn: Any, line: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(line)
        except ValueError:
            return None
        if conn not in self.ranks:  # the first line must be a hello with this run's token
            if not isinstance(message, dict) or message.get("token") != self.token or "hello" not in message:
                self._drop(conn)
                return None
            rank = int(message["hello"])
            self.ranks[conn], self.pids[rank] = rank, int(message.get("pid", 0))
            if self.stopping:
                self._send(conn, b"stop\n")
            return None
        return {**message, "rank": self.ranks[conn]} if isinstance(message, dict) else None

    def stop_all(self) -> None:
        """Ask every rank (and every rank that connects later) to stop after its current token."""
        self.stopping = True
        for conn in list(self.ranks):
            self._send(conn, b"stop\n")

    def _send(self, conn: socket.socket, data: bytes) -> None:
        try:
            conn.setblocking(True)
            conn.sendall(data)
            conn.setblocking(False)
        except OSError:
            self._drop(conn)

    def _drop(self, conn: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        self.buffers.pop(conn, None)
        self.ranks.pop(conn, None)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        """Close every link (ranks see the end of file and stop) and the listening socket."""
        for conn in list(self.buffers):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.server)
        self.server.close()
        self.selector.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
