"""Durable files: atomic directory writes, JSON, and adapters in PEFT format.

A saved directory is replaced as a whole or not at all: the new contents are
written to a sibling `.NAME.saving`, fsynced, then swapped in with two
renames (old -> `.NAME.previous`, new -> NAME). A crash between those renames
leaves NAME missing but `.NAME.previous` complete, and `recover_dir` puts it
back; a crash before them leaves a stale `.NAME.saving` that is discarded.
The target path stays stable, so a memory's adapter folder can be handed to
`PeftModel.from_pretrained` or a vLLM LoRA server as it is.

Only JSON and safetensors are written or read; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import StorageError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _siblings(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.saving"), target.with_name(f".{target.name}.previous")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for path in [p for p in root.rglob("*") if p.is_dir()] + [root, root.parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover_dir(target: Path) -> None:
    """Finish or undo a save that a crash interrupted (see the module docstring)."""
    saving, previous = _siblings(target)
    if not target.exists() and previous.is_dir():
        os.rename(previous, target)
    shutil.rmtree(saving, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Replace directory `target` with what `write(tmp_dir)` produces, atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    saving, previous = _siblings(target)
    saving.mkdir()
    try:
        write(saving)
        _fsync_tree(saving)
    except BaseException:
        shutil.rmtree(saving, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, previous)
    os.rename(saving, target)
    _fsync_tree(target)
    shutil.rmtree(previous, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StorageError(f"{path} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path} is unreadable or corrupt: {exc}") from exc


def save_adapter(model: Any, adapter: str, folder: Path) -> None:
    """Write `adapter` as a PEFT folder (`adapter_model.safetensors` + `adapter_config.json`)."""
    from peft import get_peft_model_state_dict

    # No embedding layers: LoRA never touches them, and "auto" would look the model up on the Hub.
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(folder)


def load_adapter_weights(model: Any, adapter: str, folder: Path) -> None:
    """Load a PEFT folder's weights into the existing `adapter`, refusing any mismatch."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(folder) / ADAPTER_WEIGHTS
    try:
        state = load_file(path)
    except FileNotFoundError as exc:
        raise StorageError(f"{path} is missing") from exc
    except Exception as exc:  # safetensors raises its own error types on bad bytes
        raise StorageError(f"{path} is corrupt: {exc}") from exc
    current = {
        k: v.shape
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False).items()
    }
    expected = set(current)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise StorageError(
            f"{path} does not fit this model's adapter (missing {missing[:3]}, unexpected {extra[:3]}); "
            "was it made for another base model or LoRA setting?"
        )
    for key, tensor in state.items():
        if tensor.shape != current[key] or not torch.isfinite(tensor).all():
            raise StorageError(f"{path}: tensor {key} has shape {tuple(tensor.shape)} or non-finite values")
    set_peft_model_state_dict(model, state, adapter_name=adapter)
