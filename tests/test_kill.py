"""SIGKILL a process mid-absorption, mid-save and before commit: nothing is lost, the job completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from absorber_memory.persistence import ADAPTER_WEIGHTS

from .test_sessions import QUESTION, check_invariants

ROOT = Path(__file__).resolve().parents[1]


def run_until_stalled(data_dir: Path, point: str, tmp_path: Path) -> list[int]:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tests.kill_worker", str(data_dir), point, str(ready)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, f"child ended without stalling:\n{child.stdout.read().decode()[-3000:]}"
    time.sleep(0.2)  # let it write READY_FILE completely
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    return json.loads(ready.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("point", ["absorb", "save", "commit"])
def test_sigkill_loses_nothing_and_the_job_completes(point, tmp_path, make_service):
    data_dir = tmp_path / "data"
    stored = run_until_stalled(data_dir, point, tmp_path)
    assert len(stored) == 12
    memory = make_service(data_dir=data_dir)
    assert [m.id for m in memory.transcript()] == stored  # every message is there
    job2 = memory.job(2)
    if point == "commit":
        # the adapter was fully written before the kill: adopted, not trained again
        assert job2.status == "done" and job2.metrics["steps"] > 0
    else:
        assert job2.status == "queued"
        assert memory.adapter_path().name == "v1"  # the last committed adapter, intact
        assert not any(m.absorbed_version and m.absorbed_version > 1 for m in memory.transcript())
    folder = memory.adapter_path()
    assert folder.joinpath(ADAPTER_WEIGHTS).is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no torn or stray versions left
    memory.generate(QUESTION)  # loads the adapter (checked shapes and values)
    ended = memory.flush_sync()
    assert all(j.status == "done" for j in ended)
    assert all(j.status == "done" for j in memory.jobs())
    check_invariants(memory, "default", stored)
    assert memory.window_tokens() <= memory.config.window_tokens
