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
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from .errors import InvalidMessageError, SkippedContentWarning, TemplateError

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]

# A throwaway conversation used to find where the template puts things.
_PROBE_SYSTEM = {"role": "system", "content": "s"}
_PROBE_USER = {"role": "user", "content": "u"}


#: Content-part types whose `text` is kept (OpenAI and LangChain block formats).
TEXT_PART_TYPES = ("text", "input_text", "output_text")
#: More characters per token than any real tokenizer averages over a whole message.
_MAX_CHARS_PER_TOKEN = 16


def content_text(content: Any, where: str = "message") -> str:
    """The text of a message's content: a string, or a list of content parts.

    A list is the multimodal form (`[{"type": "text", "text": ...},
    {"type": "image_url", ...}]`, or plain strings). Text parts are joined
    and kept; other parts (images, audio, files) are skipped with a
    `SkippedContentWarning` naming their types, because the memory is a
    text model's memory: refusing the whole turn would lose its text too.

    Raises:
        InvalidMessageError: for content that is neither a string nor a list
            of parts, or a text part whose `text` is not a string.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise InvalidMessageError(
            f"`{where}.content` must be a string or a list of content parts, got {type(content).__name__}"
        )
    texts, skipped = [], []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise InvalidMessageError(
                    f"`{where}.content[{j}].text` must be a string, got {type(part.get('text')).__name__}"
                )
            texts.append(part["text"])
        else:
            skipped.append(str(part.get("type")) if isinstance(part, dict) else type(part).__name__)
    warn_skipped(where, skipped)
    return "".join(texts)


def warn_skipped(where: str, kinds: list[str]) -> None:
    """Warn that non-text content parts of a message were left out of the memory."""
    if kinds:
        warnings.warn(
            f"{where}: skipped {len(kinds)} non-text content part(s) {sorted(set(kinds))}; only text is remembered",
            SkippedContentWarning,
            stacklevel=3,
        )


def check_text(text: str, where: str) -> str:
    """Refuse text the store and tokenizers cannot hold faithfully: NUL and lone surrogates.

    Other control characters (tabs, escape sequences, ...) are valid text and
    are kept exactly as given.
    """
    if "\x00" in text:
        raise InvalidMessageError(
            f"`{where}` contains a NUL character at position {text.index(chr(0))}; NUL is not text (binary data?)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError(f"`{where}` is not valid unicode: lone surrogate at position {exc.start}") from None
    return text


def validate_messages(messages: Any, *, name: str = "messages", allow_empty: bool = False) -> list[Message]:
    """Check chat messages and return clean `{"role", "content"}` copies.

    Args:
        messages: a list of dicts with a `role` in `ROLES` and a non-blank
            `content`: a string, or a list of content parts (see
            `content_text`); extra keys (ids, metadata) are dropped.
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
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise InvalidMessageError(
                f"`{where}` must be a dict with role and content, got {type(msg).__name__}{_convert_hint(msg)}"
            )
        if "role" not in msg:
            raise InvalidMessageError(f"`{where}` has no `role`; use one of {list(ROLES)}")
        role = msg["role"]
        if role not in ROLES:
            raise InvalidMessageError(f"`{where}.role` must be one of {list(ROLES)}, got {role!r}")
        text = check_text(content_text(msg.get("content"), where), f"{where}.content")
        if not text.strip():
            raise InvalidMessageError(f"`{where}.content` is empty or whitespace (or has no text part)")
        clean.append({"role": role, "content": text})
    return clean


def _convert_hint(msg: Any) -> str:
    """How to turn another framework's message object into ours, when we recognise it."""
    module = type(msg).__module__.split(".")[0]
    if module.startswith("langchain"):
        return (
            "; convert LangChain messages with `langchain_absorber.to_chat_messages(messages)` "
            "(or use `ChatAbsorber` / `AbsorberChatMessageHistory`, which convert them)"
        )
    if module.startswith("llama_index"):
        return (
            "; convert LlamaIndex messages with `llama_index.memory.absorber.to_chat_messages(messages)` "
            "(or use its `AbsorberMemory` / `AbsorberLLM`, which convert them)"
        )
    return ""


def prompt_conversation(messages: Any, context: Callable[[], list[Message]], *, where: str) -> list[Message]:
    """The conversation to answer: a string is a user turn asked after `context()`; None is `context()`.

    A list of messages is the whole conversation (validated). Raises
    `InvalidMessageError` when nothing is left to answer (no user or
    assistant turn), naming `where` (the session or memory).
    """
    if isinstance(messages, str):
        question = validate_messages([{"role": "user", "content": messages}], name="prompt")
        conversation = context() + question
    elif messages is None:
        conversation = context()
    else:
        conversation = validate_messages(messages)
    if all(m["role"] == "system" for m in conversation):
        raise InvalidMessageError(
            f"nothing to answer: {where} has no messages in its window and none were given; "
            "add messages first or pass the question (a string or a list of messages)"
        )
    return conversation


def check_lengths(fmt: ChatFormat, messages: list[Message], limit: int, *, name: str = "messages") -> None:
    """Refuse a message longer than `limit` tokens: it could never fit in a prompt.

    Such a message is rejected rather than split: a split would change what
    the turn says and where turns begin. Split long documents yourself.
    """
    for i, msg in enumerate(messages):
        chars = len(msg["content"])
        if chars > _MAX_CHARS_PER_TOKEN * limit:  # far too long to be worth tokenizing (and caching)
            size = f"{chars} characters"
        elif (tokens := fmt.count(msg)) > limit:
            size = f"{tokens} tokens"
        else:
            continue
        raise InvalidMessageError(
            f"`{name}[{i}]` is {size}; one message must fit in the prompt ({limit} tokens: "
            "`context_tokens`, default the model's context minus `max_new_tokens`); split it into smaller messages"
        )


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


def system_messages(system: Any) -> list[Message]:
    """A session prefix from a string or a list of system messages (anything else is refused)."""
    wanted = validate_messages(
        [{"role": "system", "content": system}] if isinstance(system, str) else system, name="system"
    )
    if any(m["role"] != "system" for m in wanted):
        raise InvalidMessageError("`system` must hold only system messages")
    return wanted


def check_keys(keys: Any, count: int) -> list[str | None] | None:
    """Callers' ids for `count` messages: None, or a list of that many strings or Nones."""
    if keys is not None and (len(keys) != count or not all(k is None or isinstance(k, str) for k in keys)):
        raise InvalidMessageError(f"`keys` must be a list of {count} strings or None, got {keys!r}")
    return keys


def check_message_ids(message_ids: Any) -> list[int]:
    """A list of message ids (ints), or `InvalidMessageError` naming what was given."""
    if not isinstance(message_ids, (list, tuple, set)) or not all(type(i) is int for i in message_ids):
        raise InvalidMessageError(f"`message_ids` must be a list of ints, got {message_ids!r}")
    return list(message_ids)


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
        return longer[len(shorter) :]

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
