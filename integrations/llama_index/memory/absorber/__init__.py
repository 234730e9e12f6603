"""LlamaIndex integration of absorber-memory (`llama_index.memory.absorber`).

Shipped in the `absorber-memory` wheel under LlamaIndex's namespace, like the
official `llama-index-memory-*` packages (`llama_index` and
`llama_index.memory` stay namespace packages), enabled by the `llamaindex`
extra. Work in progress (issue #5): the LLM is here; the memory block and
the `BaseMemory` come next.
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "llama_index.memory.absorber needs LlamaIndex; install it with: pip install 'absorber-memory[llamaindex]'"
    ) from exc

from .llms import AbsorberLLM
from .messages import from_chat, to_chat, to_chat_messages

__all__ = ["AbsorberLLM", "from_chat", "to_chat", "to_chat_messages"]
