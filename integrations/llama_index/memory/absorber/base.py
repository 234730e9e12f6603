"""`AbsorberMemory`: a LlamaIndex `BaseMemory` whose old turns become weights.

Pass it as `memory=` to a chat engine or an agent workflow, in place of
`ChatMemoryBuffer`, `ChatSummaryMemoryBuffer` or `Memory`, with an
`AbsorberLLM` on the same session. It keeps the window itself, in the core:
`put` stores durably and, when the window overflows, queues absorption of
the oldest turns in the background (the call returns at once); `get`
returns the session's system prefix and unabsorbed turns, never absorbed
ones, which live in the session's adapter.

Choices written down:
- `get_all` returns the whole stored conversation, absorbed turns included
  (engines show it as `chat_history`); only `get` is the prompt.
- `set` with a history that extends the stored one only adds the new tail
  (the adapter is kept); any other history replaces the session, which
  forgets its adapter, then absorbs the new history's overflow again.
- `reset` forgets the session: messages, pending jobs, adapters.
- Messages with no text (e.g. an empty assistant turn) are skipped;
  non-text blocks are refused with an error naming them.
- `initial_token_count` (what the engine puts before the history) and
  `token_limit` shrink what `get` may return while a backlog is absorbed.
- Serialized (`to_dict`, workflow `ctx.to_dict`) as ids and the core's spec,
  never the model.

Only the sync methods are written here; `BaseMemory`'s async ones run them
on a worker thread (the core is thread-safe), so both flavours are one code.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory.types import BaseMemory
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from absorber_memory import DEFAULT_SESSION, check_id
from absorber_memory.chat import split_prefix
from absorber_memory.errors import ConfigError

from .handle import CoreHandle, pick_memory
from .messages import from_chat, to_chat_messages


class AbsorberMemory(CoreHandle, BaseMemory):
    """One session of the core `AbsorberMemory`, as LlamaIndex chat memory.

    Args:
        memory: the core `absorber_memory.AbsorberMemory` (default: the process-wide
            shared one; `core=` is the older, deprecated keyword).
        session_id: the conversation; give the `AbsorberLLM` the same one.
        user_id: owner of the session, for `core.forget_user`.
        system: the session's system prompt: returned first by `get` and the
            prefix absorption trains under (keep it out of the engine's own
            `system_prompt` then, or the model reads it twice).
        token_limit: most tokens `get` may return (default: the core's context).
    """

    session_id: str = Field(default=DEFAULT_SESSION, description="The conversation (thread) to remember.")
    user_id: str | None = Field(default=None, description="Owner of the session, for forgetting a user.")
    system: str | None = Field(default=None, description="System prompt: the session's prefix, never absorbed.")
    token_limit: int | None = Field(default=None, ge=1, description="Most tokens `get` returns (default: context).")

    _prefix_set: bool = PrivateAttr(default=False)

    @field_validator("session_id", "user_id")
    @classmethod
    def _check_ids(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_id(value, info.field_name)

    @classmethod
    def class_name(cls) -> str:
        return "AbsorberMemory"

    @classmethod
    def from_defaults(
        cls,
        memory: Any = None,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        system: str | None = None,
        chat_history: list[ChatMessage] | None = None,
        llm: Any = None,
        token_limit: int | None = None,
        **kwargs: Any,
    ) -> AbsorberMemory:
        """Build one; given an `AbsorberLLM` as `llm`, share its core and session."""
        memory = pick_memory(memory, kwargs.pop("core", None))
        if kwargs:
            raise ConfigError(f"AbsorberMemory.from_defaults got unexpected arguments: {sorted(kwargs)}")
        shared: dict[str, Any] = {}
        if llm is not None and isinstance(llm, CoreHandle):
            session_id = session_id or getattr(llm, "session_id", None)
            if memory is None:
                memory, shared = llm.memory_if_open(), {"core_spec": llm.core_spec}
        built = cls(
            memory,
            session_id=session_id or DEFAULT_SESSION,
            user_id=user_id,
            system=system,
            token_limit=token_limit,
            **shared,
        )
        if chat_history:
            built.set(chat_history)
        return built

    def as_llm(self, **kwargs: Any) -> Any:
        """An `AbsorberLLM` on the same core and session (kwargs: its other fields)."""
        from .llms import AbsorberLLM

        return AbsorberLLM(self.memory, session_id=self.session_id, **kwargs)

    def recall(self, questions: list[str] | None = None) -> list[Any]:
        """What this session's adapter alone holds, beside the base model (`absorber_memory.AbsorberMemory.recall`)."""
        return self._session().recall(self.session_id, questions)

    def _session(self) -> Any:
        """The core, with this memory's system prompt set as the session prefix (once per object)."""
        core = self.memory
        if not self._prefix_set:
            if self.system is not None:
                core.set_prefix(self.session_id, self.system)
            self._prefix_set = True
        return core

    # --- reading ----------------------------------------------------------------------------------
    def get(self, input: str | None = None, initial_token_count: int = 0, **kwargs: Any) -> list[ChatMessage]:
        """The prompt's history now: the system prefix and the unabsorbed turns."""
        core = self._session()
        reserve = max(0, int(initial_token_count))
        if self.token_limit is not None:
            reserve += max(0, core.context_limit - self.token_limit)
        prefix, rows = core.context_rows(self.session_id, reserve_tokens=reserve)
        return [from_chat(m) for m in prefix] + [from_chat(r.as_chat()) for r in rows]

    def get_all(self) -> list[ChatMessage]:
        """The system prefix and every stored turn, absorbed ones included."""
        prefix, turns = self._stored(self._session())
        return [from_chat(m) for m in prefix + turns]

    def _stored(self, core: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """`(system prefix, conversation)` of the session, absorbed turns included, from one read."""
        rows = [r.as_chat() for r in core.transcript(self.session_id)]
        return [m for m in rows if m["role"] == "system"], [m for m in rows if m["role"] != "system"]

    # --- writing ----------------------------------------------------------------------------------
    def put(self, message: ChatMessage) -> None:
        """Store one message; queues absorption when the window overflows."""
        self.put_messages([message])

    def put_messages(self, messages: list[ChatMessage]) -> None:
        """Store messages in one transaction; queues absorption when the window overflows."""
        chat = to_chat_messages(messages)
        if chat:
            self._session().add_messages(chat, session_id=self.session_id, user_id=self.user_id)

    def set(self, messages: list[ChatMessage]) -> None:
        """Make `messages` the session's history (see the module doc for what is kept)."""
        core = self._session()
        system, given = split_prefix(
            core.validate(to_chat_messages(messages), allow_empty=True)
        )  # before anything stored changes
        stored_prefix, stored = self._stored(core)
        if given[: len(stored)] == stored and (not system or system == stored_prefix):
            if given[len(stored) :]:
                core.add_messages(given[len(stored) :], session_id=self.session_id, user_id=self.user_id)
            return
        prefix = system or stored_prefix
        core.forget(self.session_id)
        if prefix or given:
            core.add_messages(prefix + given, session_id=self.session_id, user_id=self.user_id)

    def reset(self) -> None:
        """Forget the session: messages, pending jobs, adapters (`system`, if given, is set again on next use)."""
        self.memory.forget(self.session_id)
        self._prefix_set = False
