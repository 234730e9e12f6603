"""`CoreHandle`: how the LlamaIndex classes hold the core without serializing it.

LlamaIndex serializes components (`to_dict`, and workflow contexts through
`ctx.to_dict`), but a loaded model cannot be serialized. So each class keeps
the core in a private attribute and stores only its spec (`core_spec`: model
name, data directory, config; None for the process's shared core). A
component rebuilt from a dict finds the open core of that data directory in
its process, or opens one (see `absorber_memory.shared`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr

from absorber_memory.shared import memory_from_spec, memory_spec


class CoreHandle(BaseModel):
    """Pydantic mixin: a lazily resolved core `AbsorberMemory`, serialized as its spec."""

    core_spec: dict[str, Any] | None = Field(
        default=None, description="How to reopen the core (None: the process's shared default core)."
    )
    _core: Any = PrivateAttr(default=None)

    def __init__(self, core: Any = None, **data: Any) -> None:
        if core is not None and data.get("core_spec") is None:
            data["core_spec"] = memory_spec(core)
        super().__init__(**data)
        self._core = core

    @property
    def core(self) -> Any:
        """The core `AbsorberMemory` (the shared one is built on first use, never at construction)."""
        if self._core is None:
            self._core = memory_from_spec(self.core_spec)
        return self._core
