"""Reopening a data directory after a crash: finish what was durable, discard what was not.

Runs once when `AbsorberMemory` opens, before any worker starts:
- folders of sessions that no longer exist (a `forget` that crashed after its
  commit) are deleted;
- half-written adapter folders (`.vN.saving`) are deleted;
- a job that was running goes back to queued;
- an adapter folder that a job finished writing but never committed (crash
  between the fsync and the transaction) is adopted if its marker names the
  session's next pending job and it grew from the committed version:
  that is exactly the state the commit would have made, so the minutes of
  training are not redone. Any other stray version folder is deleted;
- if the committed adapter folder itself is missing (deleted by hand) or
  unreadable (a corrupt config or safetensors header), the session falls
  back to no adapter, its messages return to the window and its pending
  jobs are cancelled. Messages are never dropped because weights were.

Afterwards (`AbsorberMemory.__init__`, with `auto_absorb`) every session's
unclaimed overflow is planned again: that covers messages whose adding
committed just before a crash that came before their jobs were queued.

Reading the safetensors header costs a few milliseconds per session; the
tensors themselves are checked (shapes, finite values) when first loaded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from .adapters import saved_lora_config
from .errors import StorageError
from .executor import JOB_MARKER
from .persistence import ADAPTER_WEIGHTS, read_json
from .store import PENDING, session_key

if TYPE_CHECKING:
    from .sessions import AbsorberMemory

log = logging.getLogger(__name__)


def recover_sessions(memory: AbsorberMemory) -> None:
    store = memory._store
    sessions = store.sessions()
    keep = {session_key(s) for s in sessions}
    for folder in (memory.data_dir / "sessions").iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    for sid in sessions:
        _recover_session(memory, sid)


def readable_adapter(folder: Path) -> str | None:
    """Why a committed adapter folder cannot be used (None: its config and weights header parse)."""
    try:
        saved_lora_config(folder)  # the same check the adapter cache makes when it loads the folder
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as weights:
            if not list(weights.keys()):
                return f"{folder / ADAPTER_WEIGHTS} holds no tensors"
    except StorageError as exc:
        return str(exc)
    except Exception as exc:  # safetensors raises its own types on bad bytes
        return f"{folder / ADAPTER_WEIGHTS} is unreadable: {exc}"
    return None


def _versions(adapters) -> dict[int, object]:
    found = {}
    if adapters.is_dir():
        for path in adapters.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)  # `.vN.saving` / `.vN.previous`
            elif path.name[1:].isdigit():
                found[int(path.name[1:])] = path
    return found


def _recover_session(memory: AbsorberMemory, sid: str) -> None:
    store = memory._store
    pending = store.jobs(sid, PENDING)
    for job in pending:
        if job.status == "running":
            store.set_job_status(job.id, "queued")
    current = store.session(sid).adapter_version
    folders = _versions(memory.session_dir(sid) / "adapters")
    if pending:
        first = pending[0]
        for version, path in sorted(folders.items()):
            if version == current:
                continue
            try:
                marker = read_json(path / JOB_MARKER)
            except StorageError:
                continue
            if isinstance(marker, dict) and marker.get("job_id") == first.id and marker.get("base_version") == current:
                log.info("session %r: adopting adapter v%d that job %d finished before the crash", sid, version, first.id)
                memory.commit_version(first, version, marker.get("report") or {}, current)
                current = version
                break
    for version, path in folders.items():
        if version != current:
            shutil.rmtree(path, ignore_errors=True)
    if current is None:
        return
    problem = "it is missing" if current not in folders else readable_adapter(folders[current])
    if problem is None:
        return
    log.error("session %r: committed adapter v%d is unusable (%s); its messages return to the window", sid, current, problem)
    with store.transaction() as db:
        db.execute("UPDATE messages SET absorbed_version = NULL WHERE session_id = ?", (sid,))
        db.execute("UPDATE sessions SET adapter_version = NULL, rounds = 0 WHERE session_id = ?", (sid,))
        db.execute("UPDATE jobs SET status = 'cancelled', error = ? WHERE session_id = ? AND status IN ('queued', 'running')",
                   (f"adapter v{current} was unusable ({problem}); absorption planned again", sid))
    shutil.rmtree(memory.session_dir(sid) / "adapters", ignore_errors=True)
