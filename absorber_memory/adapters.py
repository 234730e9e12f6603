"""Serving many sessions' adapters from one base model: an LRU of loaded PEFT adapters.

The inference model is the base model with PEFT's multi-adapter support: each
recently used session's committed adapter sits in its own slot, switching is
`set_adapter` (microseconds), and the least recently used slot is deleted
when more than `capacity` are loaded (a reload from disk costs milliseconds:
see BENCHMARKS.md). A session without an adapter yet runs with adapters
disabled, i.e. as the frozen base model.

Only committed adapter folders are ever loaded, and a slot is reloaded when
its session's committed version changes, so inference never sees a
half-trained adapter: training happens on a separate replica
(`executor.LocalExecutor`). One lock serializes every use of the model, since
the active adapter is state of the whole model.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StorageError
from .models import quiet_transformers
from .persistence import ADAPTER_CONFIG, load_adapter_weights, read_json

#: The slot that exists from the start (PEFT needs one); it is never used for a session.
BASE_SLOT = "absorber_base"


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


def saved_lora_config(folder: Path) -> Any:
    """The LoraConfig a saved adapter was made with (read as JSON; any rank or targets)."""
    from peft import LoraConfig

    data = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(data, dict) or "r" not in data:  # PEFT always writes the rank
        raise StorageError(f"{folder / ADAPTER_CONFIG} is not a LoRA config (a JSON object with `r`)")
    known = set(LoraConfig.__dataclass_fields__)
    try:
        return LoraConfig(**{k: v for k, v in data.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{folder / ADAPTER_CONFIG} is not a valid LoRA config: {exc}") from exc


def _same_shape(a: Any, b: Any) -> bool:
    """Whether two LoRA configs give identical weight shapes and scaling (so a slot can be reused)."""
    keys = ("r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora", "bias", "fan_in_fan_out")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


class AdapterCache:
    """Loads session adapters into one PEFT model on demand, keeping at most `capacity`."""

    def __init__(self, base_model: Any, lora_config: Any, capacity: int) -> None:
        from peft import get_peft_model

        with quiet_transformers():
            self.model = get_peft_model(base_model, lora_config, adapter_name=BASE_SLOT)
        self.model.eval()
        self.capacity = capacity
        self.stats = CacheStats()
        self._slots: OrderedDict[str, tuple[str, int]] = OrderedDict()  # key -> (slot, version)
        self._lock = threading.RLock()
        self._serial = 0

    def loaded(self) -> dict[str, int]:
        """Session key -> loaded version, least recently used first."""
        with self._lock:
            return {key: version for key, (_, version) in self._slots.items()}

    def _free_slot(self, config: Any) -> str:
        """A slot for a new adapter: the least recently used one when full (reused if its shape fits)."""
        while len(self._slots) >= self.capacity:
            _, (slot, _) = self._slots.popitem(last=False)
            self.stats.evictions += 1
            if _same_shape(self.model.peft_config[slot], config):
                # Overwriting weights in place: cold switch 174 ms vs 446 ms for a new PEFT adapter (BENCHMARKS.md).
                return slot
            self._delete(slot)
        self._serial += 1
        slot = f"s{self._serial}"
        self.model.add_adapter(slot, config)
        return slot

    def _load(self, key: str, folder: Path, version: int) -> str:
        started = time.perf_counter()
        config = saved_lora_config(folder)
        old = self._slots.pop(key, None)
        if old is not None and _same_shape(self.model.peft_config[old[0]], config):
            slot = old[0]
        else:
            if old is not None:
                self._delete(old[0])
            slot = self._free_slot(config)
        try:
            load_adapter_weights(self.model, slot, folder)
        except BaseException:
            self._delete(slot)  # a half-overwritten slot must never serve anyone
            raise
        self._slots[key] = (slot, version)
        self.stats.loads += 1
        self.stats.load_seconds += time.perf_counter() - started
        return slot

    @contextlib.contextmanager
    def use(self, key: str, resolve: Callable[[], tuple[int, Path] | None]) -> Iterator[Any]:
        """Yield the model with session `key`'s committed adapter active.

        `resolve()` returns the session's committed `(version, folder)`, or
        None for no adapter; it is called under the lock, and again if the
        folder vanished because a newer version was committed meanwhile.
        """
        with self._lock:
            for attempt in range(3):
                current = resolve()
                if current is None:
                    with self.model.disable_adapter():
                        yield self.model
                    return
                version, folder = current
                entry = self._slots.get(key)
                if entry is not None and entry[1] == version:
                    self._slots.move_to_end(key)
                    self.stats.hits += 1
                    slot = entry[0]
                    break
                try:
                    slot = self._load(key, folder, version)
                    break
                except StorageError:
                    if attempt == 2 or folder.exists():
                        raise
            if self.model.active_adapter != slot:
                self.model.set_adapter(slot)
            yield self.model

    def _delete(self, slot: str) -> None:
        """Drop a slot; peft's note that the active adapter went away is expected here (use() re-activates)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*", category=UserWarning)
            self.model.delete_adapter(slot)

    def evict(self, key: str) -> None:
        """Unload a session's adapter (after it was forgotten or replaced)."""
        with self._lock:
            entry = self._slots.pop(key, None)
            if entry is not None:
                self._delete(entry[0])
