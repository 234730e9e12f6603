"""`AbsorberMemory`: many conversations over one base model, absorbed in the background.

The object agents hold. It composes the parts and keeps only what users
call: a durable `Store` (SQLite, `store.py`), a `SessionLayout` (adapter
folders, `layout.py`), a `JobCoordinator` (planning and committing jobs,
`coordinator.py`) serving an `AbsorptionQueue` (`queue.py`), and an
`AdapterCache` (`adapters.py`) for inference. Messages are scoped by
`session_id` (LangGraph's `thread_id`, LlamaIndex's `session_id`) and
optionally `user_id`. Adding messages stores them durably and queues one job
per absorption round; the call returns at once. A job's messages stay in the
window until its adapter version is committed, so a prompt built meanwhile
holds the last committed adapter plus every unabsorbed turn: nothing is
missing and nothing is doubled.

Choices written down:
- A job that fails or is cancelled also cancels the later queued jobs of its
  session: the adapter absorbs turns in order, so later turns wait until
  the next `add_messages` (or `schedule`, or reopening the directory)
  plans them again, oldest first.
- `forget_messages` on an absorbed message drops the session's adapter at
  once (the old adapter holds what was forgotten), returns every remaining
  message to the window, and re-absorbs them in the background.
- While a backlog is absorbed, `context_messages` caps the window at
  `context_tokens` (see `prompts.py`), leaving out the oldest pending turns
  from the prompt (not the store).
- `close()` interrupts a running job; it stays queued and resumes on reopen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import registry
from .adapters import AdapterCache
from .chat import (
    ChatFormat,
    Message,
    check_keys,
    check_lengths,
    check_message_ids,
    split_prefix,
    system_messages,
    validate_messages,
)
from .config import AbsorberConfig, as_config, lora_config
from .coordinator import JobCoordinator
from .executor import LocalExecutor
from .export import export_adapter
from .generation import TextStream, generate_text
from .jobs import Executor, JobInfo, JobStatus
from .layout import SessionLayout, session_key
from .models import DEFAULT_MODEL, absorber_home, base_model, model_identity, prompt_limit
from .prompts import SessionPrompts
from .queue import JobHandle
from .recall import Recalled, recall_answers
from .recovery import check_base_model, recover_sessions
from .store import Store, StoredMessage, check_id

log = logging.getLogger(__name__)
P = ParamSpec("P")
#: Chat messages as callers pass them: `{"role": ..., "content": ...}` dicts.
Messages = list[dict[str, Any]]
R = TypeVar("R")

#: The session used when a caller names none.
DEFAULT_SESSION = "default"

# Old names -> where they live now (each use warns once per call site).
_MOVED = {
    "flush_sync": "flush",
    "session_dir": "layout.session_dir",
    "adapter_dir": "layout.adapter_dir",
    "prepare": "coordinator.prepare",
    "commit": "coordinator.commit",
    "finish": "coordinator.finish",
    "info": "job",
    "langchain_history": None,
}


def _moved(memory: AbsorberMemory, name: str) -> Any:
    """An old attribute name, resolved to where it lives now, with a `DeprecationWarning`."""
    if name not in _MOVED:
        raise AttributeError(f"{type(memory).__name__!r} object has no attribute {name!r}")
    target = _MOVED[name]
    if target is None:
        raise AttributeError(f"`AbsorberMemory.{name}` moved to `langchain_absorber.session_history(memory, ...)`")
    warnings.warn(
        f"`AbsorberMemory.{name}` is deprecated; use `AbsorberMemory.{target}`", DeprecationWarning, stacklevel=3
    )
    found: Any = memory
    for part in target.split("."):
        found = getattr(found, part)
    return found


class _Flushed(list[JobInfo]):
    """`flush`'s result; awaiting it (the older async spelling) still works, with a warning."""

    def __await__(self) -> Generator[Any, None, list[JobInfo]]:
        warnings.warn(
            "`await memory.aflush()` is deprecated: `flush` now blocks; use `await memory.aflush()`",
            DeprecationWarning,
            stacklevel=2,
        )
        return list(self)
        yield  # a generator, so `await` accepts it


def _in_thread(method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], Awaitable[R]]:
    """The async twin of a method: the same call on a worker thread, so the event loop never blocks."""

    async def twin(self: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(method, self, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"a{method.__name__}"
    twin.__doc__ = f"Async `{method.__name__}`: the same call on a worker thread."
    return twin


class AbsorberMemory:
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
        model: str | Path | Any = DEFAULT_MODEL,
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
        #: Most conversation tokens one prompt may hold (`context_tokens`, else context - `max_new_tokens`).
        self.context_limit = prompt_limit(self.config, base)  # bad budgets fail before anything is on disk
        self.store = Store(self.data_dir)
        self.closed = False
        try:
            check_base_model(self.store, model_identity(base))
            self.fmt = ChatFormat(self.tokenizer)
            self.layout = SessionLayout(self.data_dir)
            self.prompts = SessionPrompts(self.store, self.fmt, self.context_limit)
            self._lock = lock = threading.RLock()
            executor = executor or LocalExecutor(base, self.tokenizer, self.config, self.config.absorb_workers)
            #: The session adapters loaded for inference (an LRU; `stats` counts hits, loads, evictions).
            self.adapters = AdapterCache(base, lora_config(self.config, base), self.config.max_loaded_adapters)
            recover_sessions(self.store, self.layout)
            self.coordinator = JobCoordinator(
                self.store, self.layout, self.config, self.fmt, self.model_name, lock, self.context_limit
            )
            self.queue = self.coordinator.start(executor, self.config.absorb_workers)
            registry.register(self.data_dir, self)
        except BaseException:
            self.store.close()
            raise

    def __getattr__(self, name: str) -> Any:
        return _moved(self, name)

    # --- reading a session -----------------------------------------------------------------
    def sessions(self, user_id: str | None = None) -> list[str]:
        """Session ids, oldest first (of one user, if given)."""
        return self.store.sessions(None if user_id is None else check_id(user_id, "user_id"))

    def transcript(self, session_id: str = DEFAULT_SESSION) -> list[StoredMessage]:
        """Every stored message of the session, absorbed or not, oldest first."""
        return self.store.messages(check_id(session_id))

    def window(self, session_id: str = DEFAULT_SESSION) -> list[StoredMessage]:
        """The session's unabsorbed conversation messages (system messages excluded)."""
        return self.prompts.unabsorbed(session_id)[1]

    def prefix(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """The session's system message(s): always in the prompt, never absorbed."""
        return self.prompts.unabsorbed(session_id)[0]

    def window_tokens(self, session_id: str = DEFAULT_SESSION) -> int:
        """Tokens the session's window takes in the prompt now."""
        return sum(self.fmt.count(m.as_chat()) for m in self.window(session_id))

    def adapter_path(self, session_id: str = DEFAULT_SESSION) -> Path | None:
        """The session's committed adapter (a PEFT folder, e.g. for vLLM), or None before any absorption."""
        committed = self.coordinator.committed(check_id(session_id))
        return None if committed is None else committed[1]

    def context_rows(
        self, session_id: str = DEFAULT_SESSION, *, reserve_tokens: int = 0
    ) -> tuple[list[Message], list[StoredMessage]]:
        """`(prefix, rows)`: the prompt's prefix and window rows now, capped at `context_tokens` - `reserve_tokens`."""
        return self.prompts.context_rows(session_id, reserve_tokens)

    def context_messages(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """What to send to the model now: the prefix and the unabsorbed window (capped, see `context_rows`)."""
        return self.prompts.context_messages(check_id(session_id))

    # --- adding messages and planning absorption -------------------------------------------
    def add_message(
        self, role: str, content: str, *, session_id: str = DEFAULT_SESSION, user_id: str | None = None
    ) -> int:
        """Add one message; see `add_messages`. Returns its id."""
        return self.add_messages([{"role": role, "content": content}], session_id=session_id, user_id=user_id)[0]

    def add_messages(
        self,
        messages: Messages,
        *,
        session_id: str = DEFAULT_SESSION,
        user_id: str | None = None,
        keys: list[str | None] | None = None,
        schedule: bool = True,
    ) -> list[int]:
        """Store messages durably, queue absorption of any overflow (`auto_absorb`); returns their ids at once.

        Args:
            messages: `{"role", "content"}` dicts.
            session_id: the conversation (thread); `user_id`: its owner, for `forget_user`.
            keys: the caller's id per message (e.g. LangChain message ids), unique in the session.
            schedule: plan absorption now (False: add first, `schedule` later, e.g. after `set_prefix`).
        """
        sid = check_id(session_id)
        uid = None if user_id is None else check_id(user_id, "user_id")
        clean = self.validate(messages)
        with self._lock:
            ids = self.store.add_messages(sid, uid, clean, check_keys(keys, len(clean)))
            if self.config.auto_absorb and schedule:
                self.coordinator.schedule(sid)
        return ids

    def validate(self, messages: Messages, *, allow_empty: bool = False) -> list[Message]:
        """The checks `add_messages` runs, without storing anything: clean copies, or `InvalidMessageError`."""
        clean = validate_messages(messages, allow_empty=allow_empty)
        check_lengths(self.fmt, clean, self.context_limit)
        split_prefix(clean)
        return clean

    def set_prefix(self, session_id: str, system: Messages | str) -> bool:
        """Replace the session's system prefix (set it before the first overflow); returns whether it changed."""
        sid, wanted = check_id(session_id), system_messages(system)
        with self._lock:
            if self.prefix(sid) == wanted:
                return False
            self.store.replace_prefix(sid, wanted)
        return True

    def schedule(self, session_id: str = DEFAULT_SESSION) -> list[JobHandle]:
        """Queue absorption rounds for the session's unclaimed overflow (automatic with `auto_absorb`)."""
        return self.coordinator.schedule(check_id(session_id))

    def consolidate(self, session_id: str = DEFAULT_SESSION) -> JobHandle | None:
        """Queue one round re-teaching the session's adapter everything absorbed (`JobCoordinator.consolidate`).

        Absorbs nothing new. Returns its handle (a queued one is reused), or None when nothing is absorbed yet;
        raises `ConfigError` when the absorbed messages do not fit the model's context.
        """
        return self.coordinator.consolidate(check_id(session_id))

    def absorb_messages(
        self, messages: Messages, *, session_id: str = DEFAULT_SESSION, user_id: str | None = None
    ) -> list[JobHandle]:
        """Store messages that left the caller's own window and queue absorption of every unabsorbed one now.

        For callers that keep their own window (LlamaIndex's `Memory`); `window_tokens` is ignored.
        """
        sid = check_id(session_id)
        with self._lock:
            self.add_messages(messages, session_id=sid, user_id=user_id, schedule=False)
            return self.coordinator.schedule(sid, everything=True)

    # --- generation --------------------------------------------------------------------------
    def adapted_model(self, session_id: str = DEFAULT_SESSION) -> contextlib.AbstractContextManager[Any]:
        """The inference model with the session's committed adapter active (holds the model lock while open)."""
        sid = check_id(session_id)
        return self.adapters.use(session_key(sid), lambda: self.coordinator.committed(sid))

    def generate(
        self, messages: Messages | str | None = None, *, session_id: str = DEFAULT_SESSION, raw: bool = False, **kw: Any
    ) -> str:
        """Answer with the session's committed adapter: a string is a question asked after the session's context.

        None answers the context; a list of messages is the whole conversation (prefix: the session's unless it
        has its own); `raw=True` continues a string as plain text. `kw` go to `model.generate` (`max_new_tokens`,
        `do_sample`, ...). Raises `InvalidMessageError` when there is nothing to answer (an empty session).
        """
        sid = check_id(session_id)
        ids = self.prompts.ids(sid, messages, raw=raw)
        max_new = kw.pop("max_new_tokens", self.config.max_new_tokens)
        with self.adapted_model(sid) as model:
            return generate_text(model, self.tokenizer, ids, max_new, **kw)

    def stream(
        self,
        messages: Messages | str | None = None,
        *,
        session_id: str = DEFAULT_SESSION,
        max_new_tokens: int | None = None,
        stop: list[str] | None = None,
        raw: bool = False,
        **generation_kwargs: Any,
    ) -> TextStream:
        """Like `generate`, but a `TextStream` of text pieces."""
        sid, most = check_id(session_id), self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids = self.prompts.ids(sid, messages, raw=raw)
        return TextStream(lambda: self.adapted_model(sid), self.tokenizer, ids, most, stop, **generation_kwargs)

    def export_adapter(self, session_id: str, directory: str | Path, **options: Any) -> Path:
        """Write the session's adapter as a PEFT folder with a manifest into `directory` (`export.export_adapter`)."""
        return export_adapter(self, session_id, directory, **options)

    def recall(self, session_id: str = DEFAULT_SESSION, questions: list[str] | None = None) -> list[Recalled]:
        """What the session's adapter alone holds, answered beside the base model (see `recall.recall_answers`)."""
        with self.adapted_model(session_id) as model:
            return recall_answers(model, self.tokenizer, self.fmt, self.prefix(session_id), questions)

    # --- jobs ----------------------------------------------------------------------------------
    def jobs(self, session_id: str | None = None, status: JobStatus | str | None = None) -> list[JobInfo]:
        """Absorption jobs (of one session, with one status), oldest first."""
        sid = None if session_id is None else check_id(session_id)
        return [self.coordinator.describe(row) for row in self.store.jobs(sid, (status,) if status else None)]

    def job(self, job_id: int) -> JobInfo:
        """One job's state, with live step/loss while it runs."""
        return self.coordinator.info(job_id)

    def handle(self, job_id: int) -> JobHandle | None:
        """A handle to await or cancel a pending job; None once it has ended."""
        return self.queue.handle(job_id)

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job (and its session's later queued ones); False if not pending."""
        return self.queue.cancel(job_id)

    def flush(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """Block until no job is pending (for one session, or all); returns the jobs that ended meanwhile."""
        return _Flushed(self.coordinator.wait(None if session_id is None else check_id(session_id), timeout))

    async def aflush(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """`flush` without blocking the event loop."""
        return list(await asyncio.to_thread(self.flush, session_id, timeout))

    # --- forgetting --------------------------------------------------------------------------
    def forget(self, session_id: str) -> bool:
        """Delete a session: messages, jobs and adapters. Returns whether it existed."""
        sid = check_id(session_id)
        existed = self.coordinator.forget_session(sid)  # waits for a running job to stop: not under our lock
        self.adapters.evict(session_key(sid))
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
        handles = self.coordinator.forget_messages(sid, check_message_ids(message_ids))
        self.adapters.evict(session_key(sid))  # its adapter may be gone; a kept one reloads in milliseconds
        return handles

    # --- lifecycle and async flavours --------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (a running job is interrupted and resumes on reopen) and close the store."""
        if self.closed:
            return
        self.closed = True
        self.coordinator.close()
        self.queue.close(cancel_running=True)
        self.store.close()

    def __enter__(self) -> AbsorberMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AbsorberMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    aadd_messages = _in_thread(add_messages)
    agenerate = _in_thread(generate)
    arecall = _in_thread(recall)
    acontext_messages = _in_thread(context_messages)
    aforget = _in_thread(forget)
    aconsolidate = _in_thread(consolidate)
    aforget_user = _in_thread(forget_user)
    aforget_messages = _in_thread(forget_messages)
