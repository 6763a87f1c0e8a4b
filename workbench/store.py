"""SQLite results store: one row per run, written in one transaction when the run ends."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.errors import StoreError
from workbench.measure import tracker
from workbench.paths import STORE_ENV, default_store, store_path
from workbench.result import RunResult

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS workbench_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    engine TEXT,
    dtype TEXT NOT NULL,
    device TEXT,
    techniques TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    error TEXT,
    config_json TEXT NOT NULL,
    result_json TEXT
);
CREATE INDEX IF NOT EXISTS runs_config_hash ON runs (config_hash);
"""
CORE_COLUMNS = ("id", "created_at", "status", "model", "engine", "dtype", "device", "techniques")


def summary_columns() -> tuple[str, ...]:
    """The columns `summaries()` returns: the run's identity, every tracker's summary columns, the error."""
    return CORE_COLUMNS + tuple(c.name for c in tracker.columns()) + ("error",)


# Fields added to RunConfig after runs were stored, with the value those runs had: left out of the hash at
# that value, so a sweep still finds (and skips) the runs stored before the field existed.
HASH_ADDED_FIELDS = {"engine": "hf"}


def config_hash(config: RunConfig) -> str:
    """Stable id of a configuration (same settings, same hash): used to find and resume runs."""
    data = {k: v for k, v in config.to_dict().items() if HASH_ADDED_FIELDS.get(k, object()) != v}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


class Store:
    """A results database. Opening a file that is not one (or is corrupt) raises StoreError; it is never recreated.

    `path` None means the one default store (`$WORKBENCH_STORE`, else `results.sqlite` in the workbench's data
    folder). A missing file is created with the first run added, never by reading: a missing store has no runs.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = store_path(path)
        # Only the per-user data folder is made on demand; a folder someone named must already exist.
        self._make_folder = not path and not os.environ.get(STORE_ENV)
        self._ready = False
        if self.path.is_dir():
            raise StoreError(f"results store {str(self.path)!r} is a folder; give a file name such as "
                             f"{default_store().name}")
        if not self._make_folder and not self.path.parent.exists():
            raise StoreError(f"results store {str(self.path)!r}: folder {str(self.path.parent)!r} does not exist")
        if self.path.exists():
            self._check_and_init()

    def exists(self) -> bool:
        """True once the store file exists (its first run was added, or it was made elsewhere)."""
        return self.path.exists()

    def _ensure(self) -> None:
        """Create the file (and the default data folder) before the first write."""
        if self._ready:
            return
        if self._make_folder:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the results folder {str(self.path.parent)!r}: {e.strerror}; "
                                 "pass --store or set WORKBENCH_STORE to use another file") from None
        self._check_and_init()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open results store {str(self.path)!r}: {e}") from None
        try:
            yield conn
        except sqlite3.DatabaseError as e:
            raise StoreError(f"results store {str(self.path)!r} is unusable ({e}); it was left untouched — "
                             "move it away or pass --store to use another file") from None
        finally:
            conn.close()

    def _check_and_init(self) -> None:
        with self._connect() as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "runs" not in tables:
                raise StoreError(f"{str(self.path)!r} is an SQLite database but not a workbench results store "
                                 f"(tables: {', '.join(sorted(tables))}); pass --store to use another file")
            if "workbench_meta" in tables:
                row = conn.execute("SELECT value FROM workbench_meta WHERE key='schema_version'").fetchone()
                if row and int(row[0]) > SCHEMA_VERSION:
                    raise StoreError(f"{str(self.path)!r} was written by a newer workbench (schema {row[0]})")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"results store {str(self.path)!r} is corrupt ({check}); it was left untouched")
            # one transaction: executescript commits each statement on its own, and another app or process opening
            # the same new store in between saw workbench_meta without runs and refused it as a foreign database
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            with conn:
                have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
                for name, kind in [("engine", "TEXT")] + [(c.name, c.sql_type) for c in tracker.columns()]:
                    if name not in have:  # a tracker newer than the store, or a store older than the engine column
                        try:
                            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
                        except sqlite3.OperationalError as e:  # another process added it just now
                            if "duplicate column" not in str(e):
                                raise
                conn.execute("INSERT OR IGNORE INTO workbench_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._ready = True

    def add(self, result: RunResult) -> int:
        """Store one finished (or stopped) run in one transaction; return its id."""
        cfg = result.config
        row = {
            "created_at": result.started_at, "status": result.status, "model": cfg.model, "engine": cfg.engine,
            "dtype": cfg.dtype, "device": result.model.device if result.model else cfg.device,
            "techniques": " + ".join(cfg.technique_specs), "config_hash": config_hash(cfg),
            **{c.name: c.get(section) if section is not None else None
               for t in tracker.trackers() for section in [result.sections.get(t.section)] for c in t.columns},
            "error": result.error, "config_json": cfg.to_json(), "result_json": result.to_json(),
        }
        return self._insert(row)

    def add_error(self, config: RunConfig, message: str, started_at: str = "") -> int:
        """Record a failed run: its settings and the error sentence, no measurements."""
        import datetime as dt

        row = {"created_at": started_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "status": "error", "model": config.model, "engine": config.engine, "dtype": config.dtype,
               "device": config.device,
               "techniques": " + ".join(config.technique_specs), "config_hash": config_hash(config), "error": message,
               "config_json": config.to_json(), "result_json": None}
        return self._insert(row)

    def _insert(self, row: dict[str, Any]) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._ensure()
        with self._connect() as conn, conn:  # one transaction: all of the row or none of it
            cur = conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", tuple(row.values()))
            return int(cur.lastrowid)

    def get(self, run_id: int) -> RunResult:
        """The full result of one stored run (errors have no result: StoreError)."""
        if not self.exists():
            raise StoreError(f"no run {run_id} in {str(self.path)!r}: no runs yet")
        with self._connect() as conn:
            row = conn.execute("SELECT result_json, status, error FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id} in {str(self.path)!r}")
        if row[0] is None:
            raise StoreError(f"run {run_id} failed ({row[2]}); it has no measurements")
        return RunResult.from_dict(json.loads(row[0])).with_id(run_id)

    def summaries(self, limit: int | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """The summary columns of stored runs, newest first."""
        columns = summary_columns()
        sql = f"SELECT {', '.join(columns)} FROM runs"
        args: tuple = ()
        if status:
            sql, args = sql + " WHERE status=?", (status,)
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        if not self.exists():
            return []
        with self._connect() as conn:
            return [dict(zip(columns, r)) for r in conn.execute(sql, args)]

    def results(self, status: str | None = "ok") -> list[RunResult]:
        """Full results of stored runs (oldest first), by default only the successful ones."""
        sql = "SELECT id, result_json FROM runs WHERE result_json IS NOT NULL"
        args: tuple = ()
        if status:
            sql, args = sql + " AND status=?", (status,)
        if not self.exists():
            return []
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        return [RunResult.from_dict(json.loads(js)).with_id(rid) for rid, js in rows]

    def hashes(self, status: str = "ok") -> set[str]:
        """Config hashes of stored runs with this status (what a sweep can skip)."""
        if not self.exists():
            return set()
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT config_hash FROM runs WHERE status=?", (status,))}

    def dataframe(self, include_errors: bool = True):  # -> pandas.DataFrame
        """One row per run, nested result keys flattened with dots (per-token samples left out)."""
        import pandas as pd

        rows = []
        if self.exists():
            with self._connect() as conn:
                rows = conn.execute("SELECT id, status, error, config_json, result_json FROM runs ORDER BY id").fetchall()
        records = []
        for rid, status, error, config_json, result_json in rows:
            if result_json is None and not include_errors:
                continue
            data = json.loads(result_json) if result_json else {"config": json.loads(config_json)}
            if data.get("latency"):
                data["latency"].pop("samples", None)
            records.append({"id": rid, "status": status, "error": error, **data})
        if not records:
            return pd.DataFrame(columns=["id", "status", "error"])
        return pd.json_normalize(records, sep=".")
