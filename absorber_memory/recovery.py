"""Reopening a data directory after a crash: finish what was durable, discard what was not.

Runs once when `AbsorberMemory` opens, before any worker starts, on the
store and the session layout alone (no model):
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

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .adapters import saved_lora_config
from .coordinator import commit_version
from .errors import StorageError
from .jobs import PENDING, JobStatus
from .layout import JOB_MARKER, SessionLayout
from .models import identity_mismatch
from .persistence import ADAPTER_WEIGHTS, read_json
from .store import Store

log = logging.getLogger(__name__)


def check_base_model(store: Store, identity: dict[str, Any]) -> None:
    """Record the base model a new data directory serves; refuse a directory made for another one."""
    saved = store.get_meta("base_model")
    if saved is None:
        store.set_meta("base_model", json.dumps(identity))
    elif mismatch := identity_mismatch(json.loads(saved), identity):
        raise StorageError(
            f"data directory {store.root} holds adapters for another base model: (saved, given) = {mismatch}"
        )


def recover_sessions(store: Store, layout: SessionLayout) -> None:
    """Bring every session of a reopened data directory to a committed, usable state (see module doc)."""
    sessions = store.sessions()
    layout.remove_strays(sessions)
    for sid in sessions:
        _recover_session(store, layout, sid)


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


def _recover_session(store: Store, layout: SessionLayout, sid: str) -> None:
    pending = store.jobs(sid, PENDING)
    for job in pending:
        if job.status == JobStatus.RUNNING:
            store.requeue_job(job.id)
    session = store.session(sid)
    current = None if session is None else session.adapter_version
    folders = layout.versions(sid)
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
                log.info(
                    "session %r: adopting adapter v%d that job %d finished before the crash", sid, version, first.id
                )
                commit_version(store, layout, first, version, marker.get("report") or {}, current)
                current = version
                break
    for version in folders:
        if version != current:
            layout.remove_version(sid, version)
    if current is None:
        return
    problem = "it is missing" if current not in folders else readable_adapter(folders[current])
    if problem is None:
        return
    log.error(
        "session %r: committed adapter v%d is unusable (%s); its messages return to the window", sid, current, problem
    )
    store.reset_adapter(sid, cancel_pending=f"adapter v{current} was unusable ({problem}); absorption planned again")
    layout.remove_adapters(sid)
