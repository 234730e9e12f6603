"""`SessionPrompts`: what a session's prompt holds now, read from the store.

A session's prompt is its system prefix plus its unabsorbed window. While
absorption catches up on a backlog, the window is capped at the memory's
context limit (`context_tokens`, else the model's context minus
`max_new_tokens`) by leaving out the oldest pending turns, whole turns only:
they stay in the store and in the window, and reach the adapter when their
job commits. This module reads; it never writes.
"""

from __future__ import annotations

import logging
from typing import Any

from .chat import ChatFormat, Message, prompt_conversation, split_prefix
from .errors import InvalidMessageError
from .store import Store, StoredMessage, check_id
from .stream import fit_window

log = logging.getLogger("absorber_memory.sessions")


class SessionPrompts:
    """Builds a session's prompt from its stored prefix and window."""

    def __init__(self, store: Store, fmt: ChatFormat, context_limit: int) -> None:
        self.store, self.fmt, self.context_limit = store, fmt, context_limit

    def unabsorbed(self, session_id: str) -> tuple[list[Message], list[StoredMessage]]:
        """`(prefix, window)` from one read: system messages, and the unabsorbed conversation."""
        rows = self.store.messages(check_id(session_id), window_only=True)
        return [m.as_chat() for m in rows if m.role == "system"], [m for m in rows if m.role != "system"]

    def context_rows(self, session_id: str, reserve_tokens: int = 0) -> tuple[list[Message], list[StoredMessage]]:
        """`(prefix, rows)`: the prefix and the window rows that fit the context limit less `reserve_tokens`."""
        prefix, rows = self.unabsorbed(session_id)
        budget = self.context_limit - len(self.fmt.prefix_ids(prefix)) - reserve_tokens
        start = fit_window([self.fmt.count(m.as_chat()) for m in rows], [m.role for m in rows], budget)
        if start:
            log.warning("session %r: %d pending messages left out of the prompt until absorbed", session_id, start)
        return prefix, rows[start:]

    def context_messages(self, session_id: str) -> list[Message]:
        prefix, rows = self.context_rows(session_id)
        return prefix + [m.as_chat() for m in rows]

    def ids(self, session_id: str, messages: list[dict[str, Any]] | str | None, *, raw: bool = False) -> list[int]:
        """Token ids to generate from, under the session's prefix.

        `messages`: None answers the session's context; a string is a user
        turn asked after that context (not stored); a list of messages is the
        whole conversation, and leading system messages in it replace the
        prefix. With `raw=True` a string is plain text to continue, with no
        chat template. Raises `InvalidMessageError` when there is nothing to
        answer (an empty session and no messages).
        """
        if raw:
            if not isinstance(messages, str) or not messages:
                raise InvalidMessageError("`raw=True` needs a non-empty string prompt to continue")
            return self.fmt.encode_text(messages)
        reserve = self.fmt.count({"role": "user", "content": messages}) if isinstance(messages, str) else 0

        def context() -> list[Message]:
            prefix, rows = self.context_rows(session_id, reserve)
            return prefix + [m.as_chat() for m in rows]

        conversation = prompt_conversation(messages, context, where=f"session {session_id!r}")
        prefix, rest = split_prefix(conversation)
        if messages is not None and not isinstance(messages, str):
            prefix = prefix or self.unabsorbed(session_id)[0]
        return self.fmt.encode(prefix, rest, add_generation_prompt=True)
