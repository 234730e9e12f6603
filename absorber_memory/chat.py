"""Chat messages: validation, and rendering them to tokens one message at a time.

Absorption needs the *same* token ids for the sync text S whether it follows
`[prefix; C]` (teacher) or `[prefix]` alone (student), and the window policy
needs a token count per message. Both follow from rendering each message on
its own through the tokenizer's chat template and tokenizing the pieces
separately, which is exact for templates that render a conversation as the
concatenation of its messages (ChatML, Llama 3, Qwen, SmolLM, ...). That
property is checked against a whole-conversation render, and a template that
breaks it raises `TemplateError` rather than silently training on the wrong
positions.

The prefix is the leading system message(s). Without one, it is whatever the
template puts before the first message on its own (SmolLM adds a default
system prompt there), so the student sees exactly what inference sees.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .errors import InvalidMessageError, TemplateError

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]

# A throwaway conversation used to find where the template puts things.
_PROBE_SYSTEM = {"role": "system", "content": "s"}
_PROBE_USER = {"role": "user", "content": "u"}


def validate_messages(messages: Any, *, name: str = "messages", allow_empty: bool = False) -> list[Message]:
    """Check chat messages and return clean `{"role", "content"}` copies.

    Args:
        messages: a list of dicts with a `role` in `ROLES` and a non-blank
            string `content`; extra keys (ids, metadata) are dropped.
        name: what to call the argument in error messages.
        allow_empty: whether an empty list is acceptable.

    Raises:
        InvalidMessageError: naming the first offending message and field.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidMessageError(f"`{name}` must be a list of chat messages, got {type(messages).__name__}")
    if not messages and not allow_empty:
        raise InvalidMessageError(f"`{name}` is empty; pass at least one message")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidMessageError(f"`{name}[{i}]` must be a dict with role and content, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise InvalidMessageError(f"`{name}[{i}].role` must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidMessageError(f"`{name}[{i}].content` must be a string, got {type(content).__name__}")
        if not content.strip():
            raise InvalidMessageError(f"`{name}[{i}].content` is empty or whitespace")
        clean.append({"role": role, "content": content})
    return clean


def split_prefix(messages: list[Message], *, name: str = "messages") -> tuple[list[Message], list[Message]]:
    """Split leading system messages (the prefix, never absorbed) from the rest.

    Raises:
        InvalidMessageError: if a system message appears after a non-system one.
    """
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    for i in range(n, len(messages)):
        if messages[i]["role"] == "system":
            raise InvalidMessageError(
                f"`{name}[{i}]` is a system message after the conversation started; "
                "system messages belong at the start (they form the prefix)"
            )
    return messages[:n], messages[n:]


class ChatFormat:
    """Renders and tokenizes messages piecewise with a tokenizer's chat template."""

    def __init__(self, tokenizer: Any, cache_size: int = 8192) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError("the tokenizer has no chat template; set `tokenizer.chat_template` first")
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._piece = lru_cache(maxsize=cache_size)(self._piece_uncached)
        self._generation_prompt = self._find_generation_prompt()
        self._default_header = self._find_default_header()

    # --- rendering ---------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own types; normalise them
            raise TemplateError(f"the chat template failed to render: {exc}") from exc

    def _tail(self, longer: str, shorter: str, what: str) -> str:
        if not longer.startswith(shorter):
            raise TemplateError(
                f"the chat template is not concatenative ({what} changes earlier text); "
                "absorber-memory needs a template that renders messages one after another"
            )
        return longer[len(shorter):]

    def message_text(self, message: Message) -> str:
        """The text one message contributes when it is not the first one."""
        head = self._render([_PROBE_SYSTEM])
        return self._tail(self._render([_PROBE_SYSTEM, message]), head, f"a {message['role']} message")

    def _find_generation_prompt(self) -> str:
        plain = self._render([_PROBE_SYSTEM, _PROBE_USER])
        return self._tail(self._render([_PROBE_SYSTEM, _PROBE_USER], True), plain, "the generation prompt")

    def _find_default_header(self) -> str:
        alone = self._render([_PROBE_USER])
        body = self.message_text(_PROBE_USER)
        if not alone.endswith(body):
            raise TemplateError("the chat template renders a first message differently from later ones")
        return alone[: len(alone) - len(body)]

    def prefix_text(self, prefix: list[Message]) -> str:
        """Text of the prefix: the system message(s), or the template's default header."""
        return self._render(prefix) if prefix else self._default_header

    # --- tokens --------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Token ids of raw text (no template, no special tokens added)."""
        return list(self._encode(text))

    def _encode(self, text: str) -> tuple[int, ...]:
        # Fast tokenizers raise "Already borrowed" when two threads use one at once.
        with self._lock:
            return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _piece_uncached(self, role: str, content: str) -> tuple[str, tuple[int, ...]]:
        text = self.message_text({"role": role, "content": content})
        return text, self._encode(text)

    def message_ids(self, message: Message) -> list[int]:
        """Token ids of one message (cached)."""
        return list(self._piece(message["role"], message["content"])[1])

    def count(self, message: Message) -> int:
        """Number of tokens one message takes in the prompt."""
        return len(self._piece(message["role"], message["content"])[1])

    def prefix_ids(self, prefix: list[Message]) -> list[int]:
        """Token ids of the prefix."""
        return list(self._encode(self.prefix_text(prefix)))

    def generation_prompt_ids(self) -> list[int]:
        """Token ids that open the assistant's answer."""
        return list(self._encode(self._generation_prompt))

    def encode(self, prefix: list[Message], messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of `[prefix; messages]`, checked against a whole render of it."""
        pieces = [self.prefix_text(prefix)] + [self._piece(m["role"], m["content"])[0] for m in messages]
        if prefix or messages:
            whole = self._render(prefix + messages)
            if whole != "".join(pieces):
                raise TemplateError("the chat template renders this conversation differently from its messages")
        ids = self.prefix_ids(prefix)
        for m in messages:
            ids += self.message_ids(m)
        if add_generation_prompt:
            ids += self.generation_prompt_ids()
        return ids

    def encode_segments(self, messages: list[Message]) -> list[int]:
        """Token ids of messages with no prefix (a context or sync segment)."""
        ids: list[int] = []
        for m in messages:
            ids += self.message_ids(m)
        return ids
