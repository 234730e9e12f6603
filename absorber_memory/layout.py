"""Where a data directory keeps each session's files, and nothing else.

    sessions/<key>/adapters/vN   committed adapter version N of a session (a PEFT folder)
    sessions/<key>/adapters/.*   half-written or previous versions (see `persistence.py`)

`<key>` is a hash of the session id, so no id (`../`, `/`, NUL, 10 kB of
unicode) can name a path outside the directory; every path is also checked
to lie inside it. This module knows paths and folders: no SQL, no models.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import StorageError

#: Written beside a job's adapter weights: which job made this folder, from which version.
JOB_MARKER = "absorber_job.json"


def session_key(session_id: str) -> str:
    """The folder name of a session: a hash, so ids never become paths."""
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32]


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, verified (lexically, so a symlinked data directory still works) to stay under `root`."""
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, *parts))
    if os.path.commonpath([base, path]) != base or path == base:
        raise StorageError(f"refusing path {path!r}: it is not inside the data directory {base!r}")
    return Path(path)


class SessionLayout:
    """The folders of every session under one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sessions_root = self.root / "sessions"

    def session_dir(self, session_id: str) -> Path:
        """The session's folder: named by a hash of its id, and checked to lie inside the data directory."""
        return inside(self.root, "sessions", session_key(session_id))

    def adapters_dir(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "adapters"

    def adapter_dir(self, session_id: str, version: int) -> Path:
        return inside(self.adapters_dir(session_id), f"v{int(version)}")

    def versions(self, session_id: str) -> dict[int, Path]:
        """The session's complete version folders by number; half-written ones (`.vN.*`) are deleted."""
        found: dict[int, Path] = {}
        folder = self.adapters_dir(session_id)
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith("."):
                    shutil.rmtree(path, ignore_errors=True)  # `.vN.saving` / `.vN.previous`
                elif path.name[:1] == "v" and path.name[1:].isdigit():
                    found[int(path.name[1:])] = path
        return found

    def remove_version(self, session_id: str, version: int) -> None:
        shutil.rmtree(self.adapter_dir(session_id, version), ignore_errors=True)

    def remove_adapters(self, session_id: str) -> None:
        shutil.rmtree(self.adapters_dir(session_id), ignore_errors=True)

    def remove_session(self, session_id: str) -> None:
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)

    def remove_strays(self, session_ids: list[str]) -> list[str]:
        """Delete session folders whose session no longer exists; returns their names."""
        keep = {session_key(s) for s in session_ids}
        gone = []
        if self.sessions_root.is_dir():
            for folder in self.sessions_root.iterdir():
                if folder.name not in keep:
                    shutil.rmtree(folder, ignore_errors=True)
                    gone.append(folder.name)
        return gone
