"""The process-wide default `AbsorberMemory` that integrations use when given none.

`ChatAbsorber()`, `AbsorberLLM()` and the LlamaIndex classes built without a
`memory=` share one core: one base model in memory, one data directory
(`$ABSORBER_HOME`), one absorption queue. It is built on first use, never
at import, from defaults only, so any process (a Ray worker included)
rebuilds an equivalent one; pass `memory=` to choose the model or config.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sessions import AbsorberMemory

_lock = threading.Lock()
_memory: AbsorberMemory | None = None


def shared_memory() -> AbsorberMemory:
    """The default `AbsorberMemory()` of this process, built on first call (loads the default model)."""
    global _memory
    with _lock:
        if _memory is None or getattr(_memory, "_closed", False):
            from .sessions import AbsorberMemory

            _memory = AbsorberMemory()
            atexit.register(_memory.close)
        return _memory


def resolve_memory(memory: AbsorberMemory | None) -> AbsorberMemory:
    """The given core, or the process-wide default one (what integrations do with `memory=None`)."""
    return shared_memory() if memory is None else memory
