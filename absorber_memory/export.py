"""Exporting a session's memory for a multi-LoRA server, and what such a server accepts.

`export_adapter` writes a session's committed adapter as a plain PEFT folder
with its transcript and a manifest; `serving_problems` lists what in an
adapter's `adapter_config.json` a vLLM server would refuse, following the
checks vLLM runs when it loads a LoRA (`vllm.lora.peft_helper.PEFTHelper.
validate_legal`): rank above `--max-lora-rank`, a bias, `modules_to_save`,
DoRA, and initialisations that change the base weights. Our adapters pass
them by construction (plain LoRA on linear layers, bias "none"); the check
keeps it so when settings change, and the manifest records the rank a server
must allow.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import InvalidSessionError, StorageError
from .persistence import ADAPTER_CONFIG

__all__ = ["MANIFEST", "TRANSCRIPT", "export_adapter", "serving_problems"]

#: The manifest's and the transcript's file names inside an exported folder.
MANIFEST = "absorber-manifest.json"
TRANSCRIPT = "transcript.jsonl"

#: Weight initialisations that only set the adapter's starting point (a saved adapter is a plain LoRA).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def serving_problems(adapter_config: dict[str, Any], max_lora_rank: int | None = None) -> list[str]:
    """What a vLLM server (started with `--max-lora-rank max_lora_rank`) would refuse in this adapter config."""
    problems = []
    rank = max([int(adapter_config.get("r", 0)), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    if rank <= 0:
        problems.append(f"LoRA rank `r` must be a positive integer, got {adapter_config.get('r')!r}")
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("adapter bias is not supported")
    extra = [m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        problems.append(f"modules_to_save {extra} are not supported")
    if adapter_config.get("use_dora"):
        problems.append("DoRA is not supported")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights")
    if not adapter_config.get("target_modules"):
        problems.append("no `target_modules`")
    return problems


def export_adapter(
    memory: Any,
    session_id: str,
    directory: str | Path,
    *,
    base_model_name: str | None = None,
    transcript: bool = True,
) -> Path:
    """Write the session's committed adapter, as a PEFT folder with a manifest, into a new or empty `directory`.

    `directory` itself is the PEFT folder (`adapter_config.json`,
    `adapter_model.safetensors`): what `PeftModel.from_pretrained`, vLLM's
    `/v1/load_lora_adapter` and vLLM's filesystem LoRA resolver load. Beside
    them, `absorber-manifest.json` names the base model, rank, target modules,
    adapter version, which messages the adapter holds and which are still in
    the window; `transcript.jsonl` (unless `transcript=False`, e.g. for a
    serving host that should not hold conversations) has every message with
    its id and whether the adapter holds it.

    `base_model_name` rewrites the adapter's `base_model_name_or_path`: vLLM's
    filesystem resolver serves an adapter only if it equals the model given
    to `vllm serve`. The folder appears whole or not at all; a job committing
    meanwhile is fine, the export is of one version.
    """
    directory = Path(directory)
    if memory.store.session(session_id) is None:
        raise InvalidSessionError(f"unknown session {session_id!r}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise StorageError(f"{directory} is not an empty directory; export into a new or empty one")
    if base_model_name is not None and not (isinstance(base_model_name, str) and base_model_name.strip()):
        raise StorageError(f"`base_model_name` must be a non-empty string, got {base_model_name!r}")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        adapter = _copy_committed(memory, session_id, tmp)
        version = int(adapter.name.lstrip("v"))
        rows = memory.transcript(session_id)
        held = {m.id for m in rows if m.absorbed and m.absorbed_version <= version}
        lora = json.loads((tmp / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if base_model_name is not None:
            lora["base_model_name_or_path"] = base_model_name
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(lora, indent=2), encoding="utf-8")
        manifest = {
            "session": session_id,
            "base_model": base_model_name or memory.model_label,
            "adapter_version": version,
            "rank": lora.get("r"),
            "lora_alpha": lora.get("lora_alpha"),
            "target_modules": lora.get("target_modules"),
            "absorbed_message_ids": sorted(held),
            "window_message_ids": [m.id for m in rows if m.id not in held and m.role != "system"],
            "serving_problems": serving_problems(lora),
        }
        if transcript:
            with (tmp / TRANSCRIPT).open("w", encoding="utf-8") as f:
                for m in rows:
                    line = {"id": m.id, "role": m.role, "content": m.content, "absorbed": m.id in held}
                    f.write(json.dumps(line) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if directory.exists():
            directory.rmdir()
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _copy_committed(memory: Any, session_id: str, target: Path) -> Path:
    """Copy the session's committed adapter folder to `target`; returns the folder copied."""
    for _ in range(3):  # a commit may delete the folder being copied: copy the new version then
        shutil.rmtree(target, ignore_errors=True)
        adapter = memory.adapter_path(session_id)
        if adapter is None:
            raise StorageError(f"session {session_id!r} has no adapter yet (nothing absorbed); `flush` it first")
        try:
            shutil.copytree(adapter, target)
            return Path(adapter)
        except FileNotFoundError:
            continue
    raise StorageError(f"session {session_id!r}: its adapter kept changing while it was exported; retry")
