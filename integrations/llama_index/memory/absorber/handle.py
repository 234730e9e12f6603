"""`CoreHandle`: how the LlamaIndex classes hold the core without serializing it.

LlamaIndex serializes components (`to_dict`, and workflow contexts through
`ctx.to_dict`), but a loaded model cannot be serialized. So each class keeps
the core `absorber_memory.AbsorberMemory` in a private attribute and stores
only its spec (`core_spec`: model name, data directory, config; None for the
process's shared core). A component rebuilt from a dict finds the open core
of that data directory in its process, or opens one (see
`absorber_memory.memory_from_spec`).

Every class takes the core as `memory=`, as the LangChain classes do; the
older keyword `core=` still works and warns.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr

from absorber_memory import AbsorberMemory as CoreMemory
from absorber_memory import memory_from_spec, memory_spec


def pick_memory(memory: Any, core: Any) -> Any:
    """The core given as `memory=`, or as the deprecated `core=` (with a warning)."""
    if core is None:
        return memory
    warnings.warn(
        "the keyword `core=` is deprecated; pass the AbsorberMemory as `memory=`", DeprecationWarning, stacklevel=3
    )
    if memory is not None and memory is not core:
        raise TypeError("pass the AbsorberMemory once, as `memory=` (not also as `core=`)")
    return core


class CoreHandle(BaseModel):
    """Pydantic mixin: a lazily resolved core `AbsorberMemory`, serialized as its spec."""

    core_spec: dict[str, Any] | None = Field(
        default=None, description="How to reopen the core memory (None: the process's shared default core)."
    )
    _core: CoreMemory | None = PrivateAttr(default=None)

    def __init__(self, memory: CoreMemory | None = None, *, core: CoreMemory | None = None, **data: Any) -> None:
        memory = pick_memory(memory, core)
        if memory is not None and data.get("core_spec") is None:
            data["core_spec"] = memory_spec(memory)
        super().__init__(**data)
        self._core = memory

    @property
    def memory(self) -> CoreMemory:
        """The core `AbsorberMemory` (the shared one is built on first use, never at construction)."""
        if self._core is None:
            self._core = memory_from_spec(self.core_spec)
        return self._core

    @property
    def core(self) -> CoreMemory:
        """The older name of `memory`."""
        return self.memory

    def memory_if_open(self) -> CoreMemory | None:
        """The core if this object already holds one (never builds the shared one)."""
        return self._core
