"""The process-wide default `AbsorberMemory` that integrations use when given none.

`ChatAbsorber()`, `AbsorberLLM()` and the LlamaIndex classes built without a
`memory=` share one core: one base model in memory, one data directory
(`$ABSORBER_HOME`), one absorption queue. It is built on first use, never
at import, from defaults only, so any process (a Ray worker included)
rebuilds an equivalent one; pass `memory=` to choose the model or config.

Integrations that must serialize (LlamaIndex's workflow context) store a
core's *spec* (`memory_spec`: model name, data directory, config) instead of
the core, and `memory_from_spec` finds the live core of that directory in
this process, or builds one: a cache of live objects that any process can
rebuild from the spec, not state it depends on.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import Any

from . import registry
from .errors import ConfigError
from .sessions import AbsorberMemory

_lock = threading.Lock()
_memory: AbsorberMemory | None = None


def shared_memory() -> AbsorberMemory:
    """The default `AbsorberMemory()` of this process, built on first call (loads the default model)."""
    global _memory
    with _lock:
        if _memory is None or _memory.closed:
            _memory = AbsorberMemory()
            atexit.register(_memory.close)
        return _memory


def resolve_memory(memory: AbsorberMemory | None) -> AbsorberMemory:
    """The given core, or the process-wide default one (what integrations do with `memory=None`)."""
    return shared_memory() if memory is None else memory


def memory_spec(memory: AbsorberMemory | None) -> dict[str, Any] | None:
    """What rebuilds a core elsewhere (None for the shared default): JSON-ready."""
    if memory is None or memory is _memory:
        return None
    return {
        "model": memory.model_name,
        "data_dir": str(Path(memory.data_dir).resolve()),
        "config": memory.config.model_dump(mode="json"),
    }


def memory_from_spec(spec: dict[str, Any] | None) -> AbsorberMemory:
    """The open core for a `memory_spec` in this process, else a new one built from it (None: shared)."""
    if spec is None:
        return shared_memory()
    data_dir = str(Path(spec["data_dir"]).resolve())
    live = registry.find_open(data_dir)
    if live is not None:
        return live
    if not spec.get("model"):
        raise ConfigError(
            f"no open AbsorberMemory for {data_dir} and its model was passed as an object, "
            "so it cannot be rebuilt: open the core (AbsorberMemory(model, data_dir=...)) first"
        )
    return AbsorberMemory(spec["model"], config=spec.get("config"), data_dir=data_dir)
