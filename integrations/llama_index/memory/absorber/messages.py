"""LlamaIndex `ChatMessage` <-> absorber-memory chat dicts.

Text only: image, audio and other non-text blocks are skipped with a
`SkippedContentWarning` naming their types; the text blocks are kept. Roles
map onto the core's four (`developer` -> system, `chatbot`/`model` ->
assistant, `function` -> tool).
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock

from absorber_memory.chat import warn_skipped
from absorber_memory.errors import InvalidMessageError

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_chat(message: ChatMessage, where: str = "message") -> dict[str, str] | None:
    """One LlamaIndex message as a `{"role", "content"}` dict; None when it has no text."""
    text = "".join(block.text for block in message.blocks if isinstance(block, TextBlock))
    warn_skipped(where, [type(block).__name__ for block in message.blocks if not isinstance(block, TextBlock)])
    role = _ROLES.get(MessageRole(message.role))
    if role is None:
        raise InvalidMessageError(f"{where} has role {message.role!r}, which is not supported")
    return {"role": role, "content": text} if text.strip() else None


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [m for i, msg in enumerate(messages) if (m := to_chat(msg, f"messages[{i}]")) is not None]


def from_chat(message: dict[str, str], message_id: str | None = None) -> ChatMessage:
    kwargs = {"id": message_id} if message_id else {}
    return ChatMessage(role=MessageRole(message["role"]), content=message["content"], additional_kwargs=kwargs)
