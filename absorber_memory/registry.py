"""The open `AbsorberMemory` of each data directory in this process (a weak registry, no model code).

`AbsorberMemory` registers itself when it opens; `shared.memory_from_spec`
looks a directory up here before opening a second core on it (one process
may hold a directory only once). Kept in its own leaf module so that the
facade and `shared.py` both use it without importing each other.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_open: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register(data_dir: str | Path, memory: Any) -> None:
    with _lock:
        _open[str(Path(data_dir).resolve())] = memory


def find_open(data_dir: str | Path) -> Any | None:
    """The registered memory of `data_dir`, unless it was closed (or collected)."""
    with _lock:
        memory = _open.get(str(Path(data_dir).resolve()))
    return None if memory is None or getattr(memory, "closed", True) else memory
