"""LlamaIndex integration of absorber-memory (`llama_index.memory.absorber`).

Shipped in the `absorber-memory` wheel under LlamaIndex's namespace, like the
official `llama-index-memory-*` packages (`llama_index` and
`llama_index.memory` stay namespace packages), enabled by the `llamaindex`
extra. `AbsorberMemory` goes where `ChatMemoryBuffer` / `Memory` went,
`AbsorberLLM` answers with the session's adapter, and
`AbsorptionMemoryBlock` absorbs what LlamaIndex's own `Memory` flushes.
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "llama_index.memory.absorber needs LlamaIndex; install it with: pip install 'absorber-memory[llamaindex]'"
    ) from exc

from absorber_memory import __version__

from .base import AbsorberMemory
from .block import AbsorptionMemoryBlock
from .llms import AbsorberLLM
from .messages import from_chat, to_chat, to_chat_messages

__all__ = [
    "AbsorberLLM",
    "AbsorberMemory",
    "AbsorptionMemoryBlock",
    "__version__",
    "from_chat",
    "to_chat",
    "to_chat_messages",
]
