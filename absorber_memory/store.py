"""The durable store: SQLite (WAL) for messages, sessions and jobs; a lock per data directory.

Layout of a data directory (`$ABSORBER_HOME` by default):

    absorber.db                 messages, sessions, jobs (SQLite, WAL, synchronous=FULL)
    absorber.lock               held (flock) by the one process that owns the directory
    sessions/<key>/adapters/vN  committed adapter version N of a session (PEFT folder)
    models/                     converted embedded models (see `models.py`)

`<key>` is a hash of the session id, so no id (`../`, `/`, NUL, 10 kB of
unicode) can name a path outside the directory.

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
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidMessageError, InvalidSessionError, StorageError

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
    status TEXT NOT NULL,                 -- queued, running, done, failed, cancelled
    context_ids TEXT NOT NULL,            -- JSON list of message ids to absorb (C)
    sync_ids TEXT NOT NULL,               -- JSON list of following message ids (S)
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    metrics TEXT,
    adapter_version INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_session ON jobs (session_id, id);
"""

PENDING = ("queued", "running")


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


def session_key(session_id: str) -> str:
    """The folder name of a session: a hash, so ids never become paths."""
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32]


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, verified (lexically, so a symlinked data directory still works) to stay under `root`."""
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, *parts))
    if os.path.commonpath([base, path]) != base or path == base:
        raise StorageError(f"refusing path {path!r}: it is not inside the data directory {base!r}")
    return Path(path)


@dataclass(frozen=True)
class StoredMessage:
    """A message as stored: its id, role, content, and the adapter version holding it (None: in the window)."""

    id: int
    session_id: str
    role: str
    content: str
    absorbed_version: int | None
    key: str | None = None

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
    status: str
    context_ids: list[int]
    sync_ids: list[int]
    created: float
    started: float | None
    finished: float | None
    error: str | None
    metrics: dict[str, Any] | None
    adapter_version: int | None


def _message(r: sqlite3.Row) -> StoredMessage:
    return StoredMessage(r["id"], r["session_id"], r["role"], r["content"], r["absorbed_version"], r["key"])


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"], session_id=row["session_id"], status=row["status"],
        context_ids=json.loads(row["context_ids"]), sync_ids=json.loads(row["sync_ids"]),
        created=row["created"], started=row["started"], finished=row["finished"], error=row["error"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else None, adapter_version=row["adapter_version"],
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

    def ensure_session(self, db: sqlite3.Connection, session_id: str, user_id: str | None) -> None:
        row = db.execute("SELECT user_id FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            db.execute("INSERT INTO sessions (session_id, user_id, created) VALUES (?, ?, ?)",
                       (session_id, user_id, time.time()))
        elif user_id is not None and row["user_id"] not in (None, user_id):
            raise InvalidSessionError(
                f"session {session_id!r} belongs to another user_id ({row['user_id']!r}), not {user_id!r}"
            )
        elif user_id is not None and row["user_id"] is None:
            db.execute("UPDATE sessions SET user_id = ? WHERE session_id = ?", (user_id, session_id))

    def reserve_version(self, session_id: str) -> int:
        """Hand out the next adapter folder number of a session (never reused, even after a crash)."""
        with self.transaction() as db:
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

    @staticmethod
    def insert_messages(db: sqlite3.Connection, session_id: str, messages: list[dict[str, str]],
                        keys: list[str | None] | None = None) -> list[int]:
        now = time.time()
        ids = []
        for m, key in zip(messages, keys or [None] * len(messages)):
            try:
                cur = db.execute("INSERT INTO messages (session_id, role, content, created, key) VALUES (?, ?, ?, ?, ?)",
                                 (session_id, m["role"], m["content"], now, key))
            except sqlite3.IntegrityError:
                raise InvalidMessageError(f"session {session_id!r} already has a message with key {key!r}") from None
            ids.append(int(cur.lastrowid))
        return ids

    # --- jobs --------------------------------------------------------------------------
    @staticmethod
    def insert_job(db: sqlite3.Connection, session_id: str, context_ids: list[int], sync_ids: list[int]) -> int:
        cur = db.execute(
            "INSERT INTO jobs (session_id, status, context_ids, sync_ids, created) VALUES (?, 'queued', ?, ?, ?)",
            (session_id, json.dumps(context_ids), json.dumps(sync_ids), time.time()),
        )
        return int(cur.lastrowid)

    def job(self, job_id: int) -> JobRow | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, session_id: str | None = None, statuses: tuple[str, ...] | None = None) -> list[JobRow]:
        sql, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        return [_job(r) for r in self._query(sql + " ORDER BY id", tuple(args))]

    def set_job_status(self, job_id: int, status: str, *, error: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            if status == "running":
                db.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ?", (status, now, job_id))
            elif status == "queued":
                db.execute("UPDATE jobs SET status = ?, started = NULL WHERE id = ?", (status, job_id))
            else:
                db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                           (status, now, error, job_id))
