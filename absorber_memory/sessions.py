"""`AbsorberMemory`: many conversations over one base model, absorbed in the background.

The object agents hold. It owns one base model, a durable `Store` (SQLite +
adapter folders), an `AbsorptionQueue` and an `AdapterCache`. Messages are
scoped by `session_id` (LangGraph's `thread_id`, LlamaIndex's `session_id`)
and optionally `user_id`. Adding messages stores them durably, then plans
Algorithm 2 on the part of the window no job has claimed yet and queues one
job per absorption round; the call returns at once. A job trains on a
replica, writes a new adapter version, and only then, in one transaction,
marks its messages absorbed and moves the session to that version
(see `store.py` for the durability argument). Until then the messages stay
in the window, so a prompt built meanwhile holds the last committed adapter
plus every unabsorbed turn: nothing is missing and nothing is doubled.

Choices the issue left open, written down:
- A job that fails or is cancelled also cancels the later queued jobs of its
  session: the adapter absorbs turns in order, so later turns wait until
  the next `add_messages` (or `schedule`, or reopening the directory)
  plans them again, oldest first.
- `forget_messages` on an absorbed message drops the session's adapter at
  once (the old adapter holds what was forgotten), returns every remaining
  message to the window, and re-absorbs them in the background.
- While a backlog is absorbed, `context_messages` caps the window at
  `context_tokens` (default: the model's context minus `max_new_tokens`),
  leaving out the oldest pending turns from the prompt (not the store).
- `close()` interrupts a running job; it stays queued and resumes on reopen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .adapters import AdapterCache
from .chat import ChatFormat, Message, check_lengths, split_prefix, validate_messages
from .config import AbsorberConfig
from .errors import InvalidMessageError, StorageError
from .executor import Executor, JobSpec, LocalExecutor
from .generation import TextStream, generate_text
from .jobs import QueueHooks
from .memory import as_config, base_model, lora_config, prompt_limit
from .models import DEFAULT_MODEL, absorber_home, identity_mismatch, model_identity
from .queue import AbsorptionQueue, JobHandle, JobInfo
from .shared import register
from .recovery import recover_sessions
from .store import PENDING, Store, StoredMessage, check_id, inside, session_key
from .stream import plan_absorption, turn_spans

log = logging.getLogger(__name__)

DEFAULT_SESSION = "default"


class AbsorberMemory(QueueHooks):
    """Long-term memory for many conversations: old turns absorbed into per-session LoRA adapters.

    Args:
        model: "smollm2-135m-instruct" (default, embedded), a Hugging Face id,
            a local path, or a loaded `PreTrainedModel` (with `tokenizer`).
        tokenizer: required when `model` is a loaded model.
        config: an `AbsorberConfig` or a dict of its fields.
        data_dir: where messages, jobs and adapters live (default `$ABSORBER_HOME`,
            else `~/.cache/absorber-memory`). One process per directory.
        executor: runs absorption jobs (default: threads in this process).
    """

    def __init__(
        self,
        model: str | Any = DEFAULT_MODEL,
        *,
        tokenizer: Any | None = None,
        config: AbsorberConfig | dict[str, Any] | None = None,
        data_dir: str | Path | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = as_config(config)
        self.data_dir = Path(data_dir) if data_dir is not None else absorber_home()
        base, self.tokenizer = base_model(model, tokenizer, self.config)
        self.model_name: str | None = str(model) if isinstance(model, (str, Path)) else None
        #: A name for traces and logs (the id or path given, else the loaded model's `name_or_path`).
        self.model_label: str = self.model_name or getattr(base.config, "name_or_path", "") or type(base).__name__
        self._context_limit = prompt_limit(self.config, base)  # bad budgets fail before anything is on disk
        self._store = Store(self.data_dir)
        try:
            self._check_base(model_identity(base))
            self.fmt = ChatFormat(self.tokenizer)
            self._lock = threading.RLock()
            self._specs: dict[int, JobSpec] = {}
            executor = executor or LocalExecutor(base, self.tokenizer, self.config, self.config.absorb_workers)
            self._cache = AdapterCache(base, lora_config(self.config), self.config.max_loaded_adapters)
            recover_sessions(self)
            self._queue = AbsorptionQueue(executor, self, workers=self.config.absorb_workers)
            for job in self._store.jobs(statuses=PENDING):
                self._queue.submit(job.id, job.session_id)
            # Plan what no job holds yet: overflow stored just before a crash (the add committed,
            # its jobs never queued), or the messages of an adapter recovery had to drop.
            for sid in self._store.sessions() if self.config.auto_absorb else ():
                self._schedule(sid)
            register(self)
        except BaseException:
            self._store.close()
            raise

    def _check_base(self, identity: dict[str, Any]) -> None:
        saved = self._store.get_meta("base_model")
        if saved is None:
            self._store.set_meta("base_model", json.dumps(identity))
            return
        mismatch = identity_mismatch(json.loads(saved), identity)
        if mismatch:
            raise StorageError(
                f"data directory {self.data_dir} holds adapters for another base model: (saved, given) = {mismatch}"
            )

    # --- paths and committed state ------------------------------------------------------------
    def session_dir(self, session_id: str) -> Path:
        """The session's folder: named by a hash of its id, and checked to lie inside `data_dir`."""
        return inside(self.data_dir, "sessions", session_key(session_id))

    def adapter_dir(self, session_id: str, version: int) -> Path:
        return inside(self.session_dir(session_id), "adapters", f"v{int(version)}")

    def adapter_path(self, session_id: str = DEFAULT_SESSION) -> Path | None:
        """The session's committed adapter (a PEFT folder, e.g. for vLLM), or None before any absorption."""
        committed = self._committed(check_id(session_id))
        return None if committed is None else committed[1]

    def _committed(self, session_id: str) -> tuple[int, Path] | None:
        row = self._store.session(session_id)
        if row is None or row.adapter_version is None:
            return None
        return row.adapter_version, self.adapter_dir(session_id, row.adapter_version)

    # --- reading a session -----------------------------------------------------------------------
    def sessions(self, user_id: str | None = None) -> list[str]:
        """Session ids, oldest first (of one user, if given)."""
        return self._store.sessions(None if user_id is None else check_id(user_id, "user_id"))

    def transcript(self, session_id: str = DEFAULT_SESSION) -> list[StoredMessage]:
        """Every stored message of the session, absorbed or not, oldest first."""
        return self._store.messages(check_id(session_id))

    def _unabsorbed(self, session_id: str) -> tuple[list[Message], list[StoredMessage]]:
        """`(prefix, window)` from one read: system messages, and the unabsorbed conversation."""
        rows = self._store.messages(check_id(session_id), window_only=True)
        return [m.as_chat() for m in rows if m.role == "system"], [m for m in rows if m.role != "system"]

    def window(self, session_id: str = DEFAULT_SESSION) -> list[StoredMessage]:
        """The session's unabsorbed conversation messages (system messages excluded)."""
        return self._unabsorbed(session_id)[1]

    def prefix(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """The session's system message(s): always in the prompt, never absorbed."""
        return self._unabsorbed(session_id)[0]

    def window_tokens(self, session_id: str = DEFAULT_SESSION) -> int:
        """Tokens the session's window takes in the prompt now."""
        return sum(self.fmt.count(m.as_chat()) for m in self.window(session_id))

    def context_rows(self, session_id: str = DEFAULT_SESSION, *,
                     reserve_tokens: int = 0) -> tuple[list[Message], list[StoredMessage]]:
        """`(prefix, rows)`: the prefix and the stored window messages that go into the prompt now.

        The window is capped at `context_tokens` (less `reserve_tokens` the
        caller adds to the prompt itself) while a backlog is absorbed (see
        the module doc); rows carry their ids and caller keys.
        """
        prefix, rows = self._unabsorbed(session_id)
        counts = [self.fmt.count(m.as_chat()) for m in rows]
        budget = self._context_limit - len(self.fmt.prefix_ids(prefix)) - reserve_tokens
        spans = turn_spans([m.role for m in rows])
        start = spans[-1][0] if spans else 0  # the newest turn stays even if it alone is too long
        for begin, _ in spans:
            if sum(counts[begin:]) <= budget:
                start = begin
                break
        if start:
            log.warning("session %r: %d pending messages left out of the prompt until absorbed", session_id, start)
        return prefix, rows[start:]

    def context_messages(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """What to send to the model now: the prefix and the unabsorbed window (capped, see module doc)."""
        prefix, rows = self.context_rows(session_id)
        return prefix + [m.as_chat() for m in rows]

    # --- adding messages and planning absorption -----------------------------------------------
    def add_message(self, role: str, content: str, *, session_id: str = DEFAULT_SESSION,
                    user_id: str | None = None) -> int:
        """Add one message; see `add_messages`. Returns its id."""
        return self.add_messages([{"role": role, "content": content}], session_id=session_id, user_id=user_id)[0]

    def add_messages(self, messages: list[dict[str, Any]], *, session_id: str = DEFAULT_SESSION,
                     user_id: str | None = None, keys: list[str | None] | None = None,
                     schedule: bool = True) -> list[int]:
        """Store messages durably and, with `auto_absorb`, queue absorption of any overflow.

        Returns the new messages' ids at once; absorption runs in the
        background (`flush` waits for it). System messages are accepted only
        before the session's conversation starts (they are its prefix).

        Args:
            messages: `{"role", "content"}` dicts.
            session_id: the conversation (thread) they belong to.
            user_id: owner of the session, for `forget_user`.
            keys: the caller's id for each message (e.g. LangChain message
                ids), unique within the session; lets a caller mirror its own
                history without storing a message twice.
            schedule: plan absorption now (set False to add first and call
                `schedule` later, e.g. after `set_prefix`).
        """
        sid = check_id(session_id)
        uid = None if user_id is None else check_id(user_id, "user_id")
        clean = self.validate(messages)
        if keys is not None and (len(keys) != len(clean) or not all(k is None or isinstance(k, str) for k in keys)):
            raise InvalidMessageError(f"`keys` must be a list of {len(clean)} strings or None, got {keys!r}")
        prefix, _ = split_prefix(clean)
        with self._lock:
            with self._store.transaction() as db:
                self._store.ensure_session(db, sid, uid)
                started = db.execute("SELECT 1 FROM messages WHERE session_id = ? AND role != 'system' LIMIT 1",
                                     (sid,)).fetchone()
                if prefix and started:
                    raise InvalidMessageError("system messages must come before the session's conversation starts")
                ids = self._store.insert_messages(db, sid, clean, keys)
            if self.config.auto_absorb and schedule:
                self._schedule(sid)
        return ids

    def validate(self, messages: list[dict[str, Any]], *, allow_empty: bool = False) -> list[Message]:
        """The checks `add_messages` runs, without storing anything: clean copies, or `InvalidMessageError`.

        For callers that must know a history is acceptable before they change
        what is stored (replacing a session, say).
        """
        clean = validate_messages(messages, allow_empty=allow_empty)
        check_lengths(self.fmt, clean, self._context_limit)
        split_prefix(clean)
        return clean

    def set_prefix(self, session_id: str, system: list[dict[str, Any]] | str) -> bool:
        """Replace the session's system prefix; returns whether it changed.

        The prefix is never absorbed, but every absorption trains under the
        prefix current when it starts, so set it before the first overflow
        (adapters trained under an older prefix are kept).
        """
        sid = check_id(session_id)
        wanted = validate_messages([{"role": "system", "content": system}] if isinstance(system, str) else system,
                                   name="system")
        if any(m["role"] != "system" for m in wanted):
            raise InvalidMessageError("`system` must hold only system messages")
        with self._lock:
            if self.prefix(sid) == wanted:
                return False
            with self._store.transaction() as db:
                self._store.ensure_session(db, sid, None)
                db.execute("DELETE FROM messages WHERE session_id = ? AND role = 'system'", (sid,))
                self._store.insert_messages(db, sid, wanted)
        return True

    def schedule(self, session_id: str = DEFAULT_SESSION) -> list[JobHandle]:
        """Queue absorption rounds for the session's unclaimed overflow (automatic with `auto_absorb`)."""
        with self._lock:
            return self._schedule(check_id(session_id))

    def absorb_messages(self, messages: list[dict[str, Any]], *, session_id: str = DEFAULT_SESSION,
                        user_id: str | None = None) -> list[JobHandle]:
        """Store messages that have already left the caller's prompt and queue their absorption now.

        For callers that keep their own window (LlamaIndex's `Memory` flushing
        turns to a memory block): every unabsorbed message of the session,
        these included, is absorbed regardless of `window_tokens`, in rounds
        of about `absorb_tokens`, each synced on the messages after it (the
        last round on probes alone). Returns at once, like `add_messages`.
        """
        sid = check_id(session_id)
        with self._lock:
            self.add_messages(messages, session_id=sid, user_id=user_id, schedule=False)
            return self._schedule(sid, everything=True)

    def _schedule(self, sid: str, *, everything: bool = False) -> list[JobHandle]:
        claimed = [i for job in self._store.jobs(sid, PENDING) for i in job.context_ids]
        free = [m for m in self.window(sid) if m.id > max(claimed, default=0)]
        cfg, rounds = self.config, []
        while True:
            plan = plan_absorption([self.fmt.count(m.as_chat()) for m in free], [m.role for m in free],
                                   window_tokens=0 if everything else cfg.window_tokens,
                                   absorb_tokens=cfg.absorb_tokens, sync_tokens=cfg.sync_tokens,
                                   keep_newest=not everything)
            if plan is None:
                break
            rounds.append(([m.id for m in free[: plan.absorb]], [m.id for m in free[plan.absorb : plan.absorb + plan.sync]]))
            free = free[plan.absorb :]
        if not rounds:
            return []
        with self._store.transaction() as db:
            job_ids = [self._store.insert_job(db, sid, c, s) for c, s in rounds]
        log.info("session %r: queued absorption jobs %s", sid, job_ids)
        return [self._queue.submit(j, sid) for j in job_ids]

    # --- generation -------------------------------------------------------------------------------------
    def _prompt(self, sid: str, messages: list[dict[str, Any]] | str | None) -> list[int]:
        if isinstance(messages, str):
            if not messages:
                raise InvalidMessageError("the prompt is empty")
            return self.fmt.encode_text(messages)
        msgs = self.context_messages(sid) if messages is None else validate_messages(messages)
        prefix, rest = split_prefix(msgs)
        return self.fmt.encode(prefix or self.prefix(sid), rest, add_generation_prompt=True)

    def _using(self, sid: str) -> contextlib.AbstractContextManager[Any]:
        """The inference model with the session's committed adapter active (holds the model lock)."""
        return self._cache.use(session_key(sid), lambda: self._committed(sid))

    def generate(self, messages: list[dict[str, Any]] | None = None, *, session_id: str = DEFAULT_SESSION,
                 **generation_kwargs: Any) -> str:
        """Answer with the session's committed adapter.

        Args:
            messages: the conversation to answer (default: `context_messages`);
                without leading system messages, the session's prefix is used.
            session_id: whose adapter to use.
            generation_kwargs: passed to `model.generate` (`max_new_tokens`, `do_sample`, ...).
        """
        sid = check_id(session_id)
        ids = self._prompt(sid, messages)
        max_new = generation_kwargs.pop("max_new_tokens", self.config.max_new_tokens)
        with self._using(sid) as model:
            return generate_text(model, self.tokenizer, ids, max_new, **generation_kwargs)

    def stream(self, messages: list[dict[str, Any]] | str | None = None, *, session_id: str = DEFAULT_SESSION,
               max_new_tokens: int | None = None, stop: list[str] | None = None, **generation_kwargs: Any) -> TextStream:
        """Like `generate`, but a `TextStream`: text pieces as they are generated, then token counts.

        Args:
            messages: chat messages (as in `generate`), or a string to continue
                as raw text, with no chat template.
            stop: strings that end the answer; the answer excludes them.
        """
        sid = check_id(session_id)
        ids = self._prompt(sid, messages)
        return TextStream(lambda: self._using(sid), self.tokenizer, ids, max_new_tokens or self.config.max_new_tokens,
                          stop, **generation_kwargs)

    # --- jobs ----------------------------------------------------------------------------------------------
    def jobs(self, session_id: str | None = None, status: str | None = None) -> list[JobInfo]:
        """Absorption jobs (of one session, with one status), oldest first."""
        sid = None if session_id is None else check_id(session_id)
        return [self._info(row) for row in self._store.jobs(sid, (status,) if status else None)]

    def job(self, job_id: int) -> JobInfo:
        """One job's state, with live step/loss while it runs."""
        return self.info(job_id)

    def handle(self, job_id: int) -> JobHandle | None:
        """A handle to await or cancel a pending job; None once it has ended."""
        return self._queue.handle(job_id)

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job (and its session's later queued ones); False if not pending."""
        return self._queue.cancel(job_id)

    def flush_sync(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """Block until no job is pending (for one session, or all); returns the jobs that ended meanwhile."""
        sid = None if session_id is None else check_id(session_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        ended: dict[int, JobInfo] = {}
        while futures := self._queue.pending(sid):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, waiting = concurrent.futures.wait(futures, timeout=left)
            if waiting:
                raise TimeoutError(f"{len(waiting)} absorption job(s) still pending after {timeout} s")
            for f in done:
                if f.exception() is None:
                    ended[f.result().id] = f.result()
        return [ended[k] for k in sorted(ended)]

    async def flush(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """Async `flush_sync`: wait for pending absorption without blocking the event loop."""
        return await asyncio.to_thread(self.flush_sync, session_id, timeout)

    # --- forgetting ------------------------------------------------------------------------------------------
    def forget(self, session_id: str) -> bool:
        """Delete a session: messages, jobs and adapters. Returns whether it existed."""
        sid = check_id(session_id)
        self._queue.cancel_session(sid, "session forgotten")
        with self._lock:
            existed = self._store.session(sid) is not None
            with self._store.transaction() as db:
                for table in ("messages", "jobs", "sessions"):
                    db.execute(f"DELETE FROM {table} WHERE session_id = ?", (sid,))
            self._cache.evict(session_key(sid))
            shutil.rmtree(self.session_dir(sid), ignore_errors=True)
        log.info("forgot session %r", sid)
        return existed

    def forget_user(self, user_id: str) -> list[str]:
        """Forget every session of a user; returns their ids."""
        sessions = self.sessions(user_id)
        for sid in sessions:
            self.forget(sid)
        return sessions

    def forget_messages(self, session_id: str, message_ids: list[int]) -> list[JobHandle]:
        """Delete specific messages; if any was absorbed, rebuild the adapter from the rest in the background."""
        sid = check_id(session_id)
        if not isinstance(message_ids, (list, tuple, set)) or not all(type(i) is int for i in message_ids):
            raise InvalidMessageError(f"`message_ids` must be a list of ints, got {message_ids!r}")
        stored = {m.id: m for m in self._store.messages(sid)}
        unknown = sorted(set(message_ids) - set(stored))
        if unknown:
            raise InvalidMessageError(f"`message_ids` {unknown[:5]} are not messages of session {sid!r}")
        self._queue.cancel_session(sid, "messages forgotten")
        with self._lock:
            rebuild = any(stored[i].absorbed for i in message_ids)
            with self._store.transaction() as db:
                db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in message_ids])
                if rebuild:
                    db.execute("UPDATE messages SET absorbed_version = NULL WHERE session_id = ?", (sid,))
                    db.execute("UPDATE sessions SET adapter_version = NULL, rounds = 0 WHERE session_id = ?", (sid,))
            if rebuild:
                self._cache.evict(session_key(sid))
                shutil.rmtree(self.session_dir(sid) / "adapters", ignore_errors=True)
            return self._schedule(sid)

    def langchain_history(self, session_id: str = DEFAULT_SESSION, *, user_id: str | None = None,
                          system: str | None = None) -> Any:
        """A LangChain `AbsorberChatMessageHistory` for one session (fits `get_session_history`)."""
        from langchain_absorber import AbsorberChatMessageHistory

        return AbsorberChatMessageHistory(self, session_id, user_id=user_id, system=system)

    # --- lifecycle and async flavours ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (a running job is interrupted and resumes on reopen) and close the store."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._queue.close(cancel_running=True)
        self._store.close()

    def __enter__(self) -> AbsorberMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AbsorberMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    async def aadd_messages(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return await asyncio.to_thread(self.add_messages, messages, **kwargs)

    async def agenerate(self, messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        return await asyncio.to_thread(self.generate, messages, **kwargs)

    async def acontext_messages(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        return await asyncio.to_thread(self.context_messages, session_id)

    async def aforget(self, session_id: str) -> bool:
        return await asyncio.to_thread(self.forget, session_id)

    async def aforget_user(self, user_id: str) -> list[str]:
        return await asyncio.to_thread(self.forget_user, user_id)

    async def aforget_messages(self, session_id: str, message_ids: list[int]) -> list[JobHandle]:
        return await asyncio.to_thread(self.forget_messages, session_id, message_ids)
