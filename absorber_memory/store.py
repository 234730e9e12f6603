"""The durable store: SQLite (WAL) for messages, sessions and jobs; a lock per data directory.

Layout of a data directory (`$ABSORBER_HOME` by default):

    absorber.db                 messages, sessions, jobs (SQLite, WAL, synchronous=FULL)
    absorber.lock               held (flock) by the one process that owns the directory
    sessions/<key>/adapters/vN  committed adapter version N of a session (see `layout.py`)
    models/                     converted embedded models (see `models.py`)

This module owns every SQL statement of the library. Each write is a named
operation that runs in one transaction (`add_messages`, `insert_jobs`,
`claim_job`, `commit_job`, `reset_adapter`, `delete_session`, ...), so
durability can be audited here alone and tested without a model. It knows
nothing about models or adapter files.

What is durable when: `add_messages` returns only after its transaction is
committed (fsynced). A message is marked absorbed, in the same transaction
that marks its job done and moves the session to the new adapter version,
only after that adapter's folder is fully written and fsynced. A crash at any
point therefore leaves each message either in the window or in a saved
adapter, never neither.

One connection serves all threads, guarded by a lock: writes are tiny next
to absorption, and it keeps the transaction boundaries obvious.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deprecation import moved_names
from .errors import InvalidMessageError, InvalidSessionError, StorageError
from .jobs import PENDING, JobStatus

SCHEMA_VERSION = 2
MAX_ID_LENGTH = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    user_id TEXT,
    created REAL NOT NULL,
    adapter_version INTEGER,              -- committed adapter folder vN; NULL: no adapter yet
    last_version INTEGER NOT NULL DEFAULT 0,  -- highest N ever handed out (folders are never reused)
    rounds INTEGER NOT NULL DEFAULT 0         -- absorptions inside the current adapter
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    absorbed_version INTEGER,             -- NULL: in the window
    key TEXT                              -- the caller's id for it (e.g. a LangChain message id), unique per session
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_key ON messages (session_id, key) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    status TEXT NOT NULL,                 -- a JobStatus: queued, running, done, failed, cancelled
    context_ids TEXT NOT NULL,            -- JSON list of message ids to absorb (C)
    sync_ids TEXT NOT NULL,               -- JSON list of the following turns' ids (`following_ids`)
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    metrics TEXT,
    adapter_version INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_session ON jobs (session_id, id);
"""


def check_id(value: Any, name: str = "session_id") -> str:
    """Validate a session or user id: a non-empty string without NUL, at most 1024 characters."""
    if not isinstance(value, str):
        raise InvalidSessionError(f"`{name}` must be a string, got {type(value).__name__}")
    if not value or "\x00" in value or len(value) > MAX_ID_LENGTH:
        raise InvalidSessionError(f"`{name}` must be 1-{MAX_ID_LENGTH} characters without NUL, got {value[:40]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidSessionError(f"`{name}` is not valid unicode (lone surrogate): {value[:40]!r}") from exc
    return value


@dataclass(frozen=True)
class StoredMessage:
    """A message as stored: its id, role, content, and the adapter version holding it (None: in the window)."""

    id: int
    session_id: str
    role: str
    content: str
    absorbed_version: int | None
    key: str | None = None
    created: float | None = None  # when it was stored (seconds since the epoch)

    @property
    def absorbed(self) -> bool:
        return self.absorbed_version is not None

    def as_chat(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    user_id: str | None
    adapter_version: int | None
    last_version: int
    rounds: int


@dataclass(frozen=True)
class JobRow:
    id: int
    session_id: str
    status: JobStatus
    context_ids: list[int]
    following_ids: list[int]
    created: float
    started: float | None
    finished: float | None
    error: str | None
    metrics: dict[str, Any] | None
    adapter_version: int | None

    @property
    def consolidation(self) -> bool:
        """A job that absorbs no message: it re-teaches the adapter everything already absorbed."""
        return not self.context_ids


def _message(r: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        r["id"], r["session_id"], r["role"], r["content"], r["absorbed_version"], r["key"], r["created"]
    )


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"],
        session_id=row["session_id"],
        status=JobStatus(row["status"]),
        context_ids=json.loads(row["context_ids"]),
        following_ids=json.loads(row["sync_ids"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        error=row["error"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else None,
        adapter_version=row["adapter_version"],
    )


class DirectoryLock:
    """An exclusive `flock` on `absorber.lock`: one process per data directory.

    The OS drops the lock when the process dies (even by SIGKILL), so a
    crash never leaves the directory locked.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "absorber.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock (documented)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StorageError(
                f"data directory {self.path.parent} is in use by another process (pid {holder}); "
                "open it from one process only, or give each process its own `data_dir`"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class Store:
    """Messages, sessions and jobs in one SQLite database under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "sessions").mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"data directory {self.root} cannot be created or written: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"data directory {self.root} is not writable")
        self._lock = threading.RLock()
        self.dir_lock = DirectoryLock(self.root)
        self.dir_lock.acquire()
        try:
            self._db = self._open(self.root / "absorber.db")
        except BaseException:
            self.dir_lock.release()
            raise

    def _open(self, path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            found = self._migrate(db)
            db.executescript(_SCHEMA)
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif found["value"] != str(SCHEMA_VERSION):
                raise StorageError(f"{path} has schema version {found['value']}, this library reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:  # not a database, locked, disk I/O error
            raise StorageError(f"{path} cannot be opened as the memory database: {exc}") from exc
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> sqlite3.Row | None:
        """Bring an older database up to `SCHEMA_VERSION` in place; returns its version row (None: new)."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            return None
        found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found is not None and found["value"] == "1":  # v1 -> v2: message keys
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE messages ADD COLUMN key TEXT")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
            db.execute("COMMIT")
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return found

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.dir_lock.release()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); rolled back on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"memory database is unavailable: {exc}") from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:  # disk full, I/O error, locked by another program
                self._rollback()
                raise StorageError(f"memory database write failed (nothing was changed): {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (a full disk, for one).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"memory database read failed: {exc}") from exc

    # --- meta ------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- sessions --------------------------------------------------------------------
    def session(self, session_id: str) -> SessionRow | None:
        rows = self._query("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        if not rows:
            return None
        r = rows[0]
        return SessionRow(r["session_id"], r["user_id"], r["adapter_version"], r["last_version"], r["rounds"])

    def sessions(self, user_id: str | None = None) -> list[str]:
        if user_id is None:
            rows = self._query("SELECT session_id FROM sessions ORDER BY created")
        else:
            rows = self._query("SELECT session_id FROM sessions WHERE user_id = ? ORDER BY created", (user_id,))
        return [r["session_id"] for r in rows]

    @staticmethod
    def _ensure_session(db: sqlite3.Connection, session_id: str, user_id: str | None) -> None:
        row = db.execute("SELECT user_id FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO sessions (session_id, user_id, created) VALUES (?, ?, ?)",
                (session_id, user_id, time.time()),
            )
        elif user_id is not None and row["user_id"] not in (None, user_id):
            raise InvalidSessionError(
                f"session {session_id!r} belongs to another user_id ({row['user_id']!r}), not {user_id!r}"
            )
        elif user_id is not None and row["user_id"] is None:
            db.execute("UPDATE sessions SET user_id = ? WHERE session_id = ?", (user_id, session_id))

    def delete_session(self, session_id: str) -> bool:
        """Delete a session's messages, jobs and row in one transaction; returns whether it existed."""
        with self.transaction() as db:
            existed = db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is not None
            for table in ("messages", "jobs", "sessions"):
                db.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
        return existed

    def reset_adapter(self, session_id: str, *, cancel_pending: str | None = None) -> None:
        """Return every message of the session to the window and drop its adapter version.

        With `cancel_pending` (the reason), its queued and running jobs are
        cancelled in the same transaction.
        """
        with self.transaction() as db:
            self._reset_adapter(db, session_id)
            if cancel_pending is not None:
                db.execute(
                    f"UPDATE jobs SET status = ?, error = ? WHERE session_id = ? AND status IN {_PENDING_SQL}",
                    (JobStatus.CANCELLED.value, cancel_pending, session_id),
                )

    @staticmethod
    def _reset_adapter(db: sqlite3.Connection, session_id: str) -> None:
        db.execute("UPDATE messages SET absorbed_version = NULL WHERE session_id = ?", (session_id,))
        db.execute("UPDATE sessions SET adapter_version = NULL, rounds = 0 WHERE session_id = ?", (session_id,))

    def reserve_version(self, session_id: str) -> int:
        """Hand out the next adapter folder number of a session (never reused, even after a crash)."""
        with self.transaction() as db:
            return self._reserve_version(db, session_id)

    @staticmethod
    def _reserve_version(db: sqlite3.Connection, session_id: str) -> int:
        db.execute("UPDATE sessions SET last_version = last_version + 1 WHERE session_id = ?", (session_id,))
        row = db.execute("SELECT last_version FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise StorageError(f"session {session_id!r} no longer exists")
        return int(row["last_version"])

    # --- messages --------------------------------------------------------------------
    def messages(self, session_id: str, *, window_only: bool = False) -> list[StoredMessage]:
        sql = "SELECT * FROM messages WHERE session_id = ?"
        if window_only:
            sql += " AND absorbed_version IS NULL"
        return [_message(r) for r in self._query(sql + " ORDER BY id", (session_id,))]

    def messages_by_id(self, ids: list[int]) -> dict[int, StoredMessage]:
        found: dict[int, StoredMessage] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT * FROM messages WHERE id IN ({marks})", tuple(chunk)):
                found[r["id"]] = _message(r)
        return found

    def add_messages(
        self, session_id: str, user_id: str | None, messages: list[dict[str, str]], keys: list[str | None] | None = None
    ) -> list[int]:
        """Store messages in one transaction (creating the session); returns their ids.

        System messages are refused once the session's conversation has
        started: they are its prefix.
        """
        with self.transaction() as db:
            self._ensure_session(db, session_id, user_id)
            if any(m["role"] == "system" for m in messages):
                started = db.execute(
                    "SELECT 1 FROM messages WHERE session_id = ? AND role != 'system' LIMIT 1", (session_id,)
                ).fetchone()
                if started:
                    raise InvalidMessageError("system messages must come before the session's conversation starts")
            return self._insert_messages(db, session_id, messages, keys)

    def replace_prefix(self, session_id: str, system: list[dict[str, str]]) -> None:
        """Replace the session's system messages (creating the session) in one transaction."""
        with self.transaction() as db:
            self._ensure_session(db, session_id, None)
            db.execute("DELETE FROM messages WHERE session_id = ? AND role = 'system'", (session_id,))
            self._insert_messages(db, session_id, system)

    def delete_messages(self, session_id: str, message_ids: list[int], *, reset_adapter: bool) -> None:
        """Delete messages; with `reset_adapter`, also return the rest to the window and drop the adapter."""
        with self.transaction() as db:
            db.executemany(
                "DELETE FROM messages WHERE id = ? AND session_id = ?", [(i, session_id) for i in message_ids]
            )
            if reset_adapter:
                self._reset_adapter(db, session_id)

    @staticmethod
    def _insert_messages(
        db: sqlite3.Connection, session_id: str, messages: list[dict[str, str]], keys: list[str | None] | None = None
    ) -> list[int]:
        now = time.time()
        ids = []
        for m, key in zip(messages, keys or [None] * len(messages), strict=True):
            try:
                cur = db.execute(
                    "INSERT INTO messages (session_id, role, content, created, key) VALUES (?, ?, ?, ?, ?)",
                    (session_id, m["role"], m["content"], now, key),
                )
            except sqlite3.IntegrityError:
                raise InvalidMessageError(f"session {session_id!r} already has a message with key {key!r}") from None
            ids.append(int(cur.lastrowid or 0))
        return ids

    # --- jobs --------------------------------------------------------------------------
    def insert_jobs(self, session_id: str, rounds: list[tuple[list[int], list[int]]]) -> list[int]:
        """Queue one job per `(context_ids, following_ids)` round, in one transaction; returns their ids."""
        now = time.time()
        with self.transaction() as db:
            return [
                int(
                    db.execute(
                        "INSERT INTO jobs (session_id, status, context_ids, sync_ids, created) VALUES (?, ?, ?, ?, ?)",
                        (session_id, JobStatus.QUEUED.value, json.dumps(c), json.dumps(f), now),
                    ).lastrowid
                    or 0
                )
                for c, f in rounds
            ]

    def job(self, job_id: int) -> JobRow | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, session_id: str | None = None, statuses: tuple[JobStatus | str, ...] | None = None) -> list[JobRow]:
        sql, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += [JobStatus(s).value for s in statuses]
        return [_job(r) for r in self._query(sql + " ORDER BY id", tuple(args))]

    def claim_job(self, job_id: int) -> tuple[JobRow, SessionRow, int] | None:
        """Mark a queued job running and reserve its output version, in one transaction.

        Returns `(job, session, version)`, or None if the job is gone or no longer pending.
        """
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or JobStatus(row["status"]) not in PENDING:
                return None
            job = _job(row)
            version = self._reserve_version(db, job.session_id)
            db.execute(
                "UPDATE jobs SET status = ?, started = ? WHERE id = ?", (JobStatus.RUNNING.value, time.time(), job_id)
            )
            s = db.execute("SELECT * FROM sessions WHERE session_id = ?", (job.session_id,)).fetchone()
        session = SessionRow(s["session_id"], s["user_id"], s["adapter_version"], s["last_version"], s["rounds"])
        return job, session, version

    def commit_job(self, job: JobRow, version: int, report: dict[str, Any]) -> None:
        """Mark a job's messages absorbed into adapter `version` (already durable) and the job done.

        One transaction: the messages leave the window, the session moves to
        `version`, and the job records its report, together or not at all.
        """
        with self.transaction() as db:
            db.executemany(
                "UPDATE messages SET absorbed_version = ? WHERE id = ? AND absorbed_version IS NULL",
                [(version, i) for i in job.context_ids],
            )
            db.execute(
                "UPDATE sessions SET adapter_version = ?, rounds = rounds + 1 WHERE session_id = ?",
                (version, job.session_id),
            )
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, metrics = ?, adapter_version = ?, error = NULL WHERE id = ?",
                (JobStatus.DONE.value, time.time(), json.dumps(report), version, job.id),
            )

    def requeue_job(self, job_id: int) -> None:
        """Put a running job back in the queue (interrupted by `close`, or found running on reopen)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, started = NULL WHERE id = ?", (JobStatus.QUEUED.value, job_id))

    def end_job(self, job_id: int, status: JobStatus, error: str | None = None) -> None:
        """Record that a job failed or was cancelled (with the reason)."""
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise ValueError(f"`status` must be failed or cancelled, got {status!r}")
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                (status.value, time.time(), error, job_id),
            )


_PENDING_SQL = "(" + ", ".join(f"'{s.value}'" for s in PENDING) + ")"

__getattr__ = moved_names(
    __name__,
    {
        "PENDING": "absorber_memory.jobs:PENDING",
        "session_key": "absorber_memory.layout:session_key",
        "inside": "absorber_memory.layout:inside",
    },
)
