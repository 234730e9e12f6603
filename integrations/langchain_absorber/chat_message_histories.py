"""`AbsorberChatMessageHistory`: a LangChain message history whose old turns become weights.

For `RunnableWithMessageHistory` (and anything else that takes a
`BaseChatMessageHistory`). `messages` is what the model should read now: the
session's system prefix and its unabsorbed window, never the absorbed turns
(those live in the session's adapter; pair this history with a
`ChatAbsorber` on the same session). `add_messages` stores durably and, when
the window overflows, queues absorption in the background; `clear` forgets
the session (messages, jobs, adapters).

A message whose `id` the session already holds is skipped, so re-adding is
idempotent. Every method is safe to call from several threads at once
(LangChain's async defaults call sync methods from executor threads); the
async methods run the same code on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage

from absorber_memory import DEFAULT_SESSION, check_id, resolve_memory

from .messages import from_chat, to_chat


def stored_as_messages(memory: Any, session_id: str) -> list[BaseMessage]:
    """The session's prompt now (prefix + unabsorbed window) as LangChain messages."""
    prefix, rows = memory.context_rows(session_id)
    return [from_chat(m) for m in prefix] + [from_chat(r.as_chat(), message_id(r)) for r in rows]


def message_id(row: Any) -> str:
    """A stored message's LangChain id: the one it came with, else one derived from its row id."""
    return row.key or f"absorber-{row.id}"


class AbsorberChatMessageHistory(BaseChatMessageHistory):
    """One session of an `AbsorberMemory`, as a LangChain chat message history.

    Args:
        memory: the core `AbsorberMemory` (default: the process-wide shared one).
        session_id: the conversation (e.g. what `get_session_history` receives).
        user_id: owner of the session, for `memory.forget_user`.
        system: the session's system prompt, set as its prefix (returned first by
            `messages`, and the prefix absorption trains under); keep it out of
            the prompt template then, or the model reads it twice.
    """

    def __init__(
        self,
        memory: Any = None,
        session_id: str = DEFAULT_SESSION,
        *,
        user_id: str | None = None,
        system: str | None = None,
    ) -> None:
        self.memory = resolve_memory(memory)
        self.session_id = check_id(session_id)
        self.user_id = None if user_id is None else check_id(user_id, "user_id")
        if system is not None:
            self.memory.set_prefix(self.session_id, system)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The system prefix and the unabsorbed window, oldest first."""
        return stored_as_messages(self.memory, self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        return await asyncio.to_thread(stored_as_messages, self.memory, self.session_id)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Store messages (skipping ids already held); queues absorption when the window overflows."""
        known = {message_id(m) for m in self.memory.transcript(self.session_id)}
        chat, keys = [], []
        for i, message in enumerate(messages):
            converted = to_chat(message, f"messages[{i}]")
            if converted is None or (message.id is not None and message.id in known):
                continue
            chat.append(converted)
            keys.append(message.id)
            known.add(message.id)
        if chat:
            self.memory.add_messages(chat, session_id=self.session_id, user_id=self.user_id, keys=keys)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await asyncio.to_thread(self.add_messages, messages)

    def recall(self, questions: list[str] | None = None) -> list[Any]:
        """What this session's adapter alone holds, beside the base model (`AbsorberMemory.recall`)."""
        return self.memory.recall(self.session_id, questions)

    def clear(self) -> None:
        """Forget the session: its messages, pending jobs and adapters."""
        self.memory.forget(self.session_id)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)


def session_history(
    memory: Any = None, *, user_id: str | None = None, system: str | None = None
) -> Callable[[str], AbsorberChatMessageHistory]:
    """A `get_session_history` for `RunnableWithMessageHistory`: session id -> its history on `memory`.

    Args:
        memory: the core `AbsorberMemory` (default: the process-wide shared one, built on first call).
        user_id: owner of every session it opens.
        system: the system prompt each session is given.
    """

    def get(session_id: str) -> AbsorberChatMessageHistory:
        return AbsorberChatMessageHistory(memory, session_id, user_id=user_id, system=system)

    return get
