"""LangChain integration of absorber-memory: chat model, LLM, message history, agent middleware.

Shipped in the `absorber-memory` wheel and enabled by its `langchain` extra
(`pip install 'absorber-memory[langchain]'`), like LangChain's partner
packages (`langchain_ollama`). Every class takes the core `AbsorberMemory`
(one base model, many sessions) instead of loading a model of its own.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "langchain_absorber needs LangChain; install it with: pip install 'absorber-memory[langchain]'"
    ) from exc

from absorber_memory import __version__

from .chat_message_histories import AbsorberChatMessageHistory, session_history
from .chat_models import ChatAbsorber
from .llms import AbsorberLLM
from .messages import parse_tool_calls, to_chat, to_chat_messages


def __getattr__(name: str) -> object:
    # The middleware needs the `langchain` package (agents), not only langchain-core.
    if name == "AbsorptionMiddleware":
        try:
            from .middleware import AbsorptionMiddleware
        except ImportError as exc:
            raise ImportError(
                "AbsorptionMiddleware needs langchain>=1.0 (create_agent); "
                "install it with: pip install 'absorber-memory[langchain]'"
            ) from exc
        return AbsorptionMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AbsorberChatMessageHistory",
    "AbsorberLLM",
    "AbsorptionMiddleware",
    "ChatAbsorber",
    "__version__",
    "parse_tool_calls",
    "session_history",
    "to_chat",
    "to_chat_messages",
]
