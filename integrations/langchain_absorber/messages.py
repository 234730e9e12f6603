"""LangChain messages <-> absorber-memory chat dicts, and the JSON tool-call format.

One conversion serves the chat model, the message history and the agent
middleware, so a turn is rendered to the same text whether the model reads
it, the store keeps it, or absorption trains on it.

Tool calling uses a documented text format (Hermes/Qwen style), because small
local chat templates such as SmolLM2's have no tool syntax of their own:
the tools are listed as JSON in the system message, and the model calls one
by answering

    <tool_call>{"name": "get_weather", "arguments": {"city": "Lisbon"}}</tool_call>

An `AIMessage` with `tool_calls` is rendered back to exactly that text, and a
`ToolMessage` becomes a `tool` turn. Content blocks other than text (images,
audio, files) are skipped with a `SkippedContentWarning`. Output that is not
well-formed (bad JSON, unknown tool, arguments not an object, an unclosed
tag) stays plain text: never an exception.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from absorber_memory.chat import content_text
from absorber_memory.errors import InvalidMessageError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
}


def render_tool_call(name: str, args: dict[str, Any]) -> str:
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def to_chat(message: BaseMessage, where: str = "message") -> dict[str, str] | None:
    """One LangChain message as a `{"role", "content"}` dict; None for a message with no text at all."""
    text = content_text(message.content, where)  # non-text blocks skipped with a warning
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
        calls = [render_tool_call(c["name"], c.get("args") or {}) for c in message.tool_calls]
        text = "\n".join([text] + calls if text.strip() else calls)
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, ChatMessage) and message.role in _ROLE_ALIASES:
        role = _ROLE_ALIASES[message.role]
    else:
        raise InvalidMessageError(
            f"{where}: {type(message).__name__} (role {getattr(message, 'role', '?')!r}) "
            "is not supported; use system, human, ai or tool messages"
        )
    return {"role": role, "content": text} if text.strip() else None


def to_chat_messages(
    messages: Sequence[BaseMessage], tools: list[dict[str, Any]] | None = None, tool_choice: Any = None
) -> list[dict[str, str]]:
    """Convert a prompt, dropping empty messages and putting the tool list into the system message."""
    out = [m for i, msg in enumerate(messages) if (m := to_chat(msg, f"messages[{i}]")) is not None]
    if tools:
        block = tools_prompt(tools, tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def from_chat(message: dict[str, str], key: str | None = None) -> BaseMessage:
    """A stored chat dict back as a LangChain message (tool calls stay as their rendered text)."""
    role, content = message["role"], message["content"]
    if role == "system":
        return SystemMessage(content=content, id=key)
    if role == "user":
        return HumanMessage(content=content, id=key)
    if role == "assistant":
        return AIMessage(content=content, id=key)
    return ToolMessage(content=content, tool_call_id=key or "absorber", id=key)


def tools_prompt(tools: list[dict[str, Any]], tool_choice: Any = None) -> str:
    """The system-message block that lists tools (OpenAI tool dicts) and explains how to call them."""
    lines = [
        "# Tools",
        "You may call functions to help with the user's request. Their signatures:",
        "<tools>",
        *(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools),
        "</tools>",
        "To call a function, answer with one line per call, and nothing else on that line:",
        render_tool_call("<function-name>", {"<argument>": "<value>"}),
    ]
    if tool_choice in ("any", "required"):
        lines.append("You must call at least one function.")
    elif tool_choice == "none":
        lines.append("Do not call any function now.")
    elif isinstance(tool_choice, str) and tool_choice != "auto":
        lines.append(f"You must call the function {tool_choice}.")
    return "\n".join(lines)


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """`(content, tool_calls)` from model output; any malformed call leaves the whole text as content."""
    found = list(_TOOL_CALL.finditer(text))
    if not found or text.count(TOOL_CALL_OPEN) != len(found):
        return text, []
    calls = []
    for match in found:
        try:
            data = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(data, dict):
            return text, []
        name, args = data.get("name"), data.get("arguments", data.get("parameters", {}))
        if not isinstance(name, str) or not isinstance(args, dict) or (names is not None and name not in names):
            return text, []
        calls.append({"name": name, "args": args, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "tool_call"})
    return _TOOL_CALL.sub("", text).strip(), calls


def tool_choice_name(tool_choice: Any) -> Any:
    """Normalise LangChain's tool_choice forms (bool, "any", name, OpenAI dict) to a string or None."""
    if tool_choice is True:
        return "any"
    if tool_choice in (None, False):
        return None
    if isinstance(tool_choice, dict):
        return tool_choice.get("function", {}).get("name") or tool_choice.get("name")
    return tool_choice
