"""A child process for the kill tests: opens a memory, adds turns, and stalls at a chosen point.

Run as `python -m tests.kill_worker DATA_DIR POINT READY_FILE`. It writes the
ids of the messages it stored to READY_FILE once the stall point is reached
(so the parent knows when to SIGKILL it) and then sleeps until killed.
POINT is one of: absorb (mid-training), save (mid adapter write),
commit (adapter written and fsynced, transaction not yet committed).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from absorber_memory import AbsorberConfig, AbsorberMemory, LocalExecutor, persistence
from absorber_memory.store import Store
from absorber_memory.testing import tiny_model, tiny_tokenizer

from .conftest import SERVICE, turn


def main() -> None:
    data_dir, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    stored: list[int] = []
    all_added = threading.Event()

    def stall() -> None:
        all_added.wait(60)  # so READY_FILE lists every message stored
        ready.write_text(json.dumps(stored))
        time.sleep(600)

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    config = AbsorberConfig(**SERVICE)  # the parent reopens with auto_absorb on; same settings otherwise
    quiet = config.model_copy(update={"auto_absorb": False})
    inner = LocalExecutor(model, tokenizer, config)

    class Stalling:
        def run(self, spec, on_step):
            def step(i, loss):
                on_step(i, loss)
                if point == "absorb" and i == 2 and spec.job_id == 2:
                    stall()

            return inner.run(spec, step)

        def close(self):
            inner.close()

    if point == "save":
        real_save, saves = persistence.save_file, []

        def half_save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            saves.append(filename)
            if len(saves) == 2:  # job 1 commits normally; job 2's write is torn
                Path(filename).write_bytes(Path(filename).read_bytes()[:100])
                stall()

        persistence.save_file = half_save
    if point == "commit":
        real_commit = Store.commit_job

        def stalled_commit(self, job, version, report):
            if job.id == 2:
                stall()
            real_commit(self, job, version, report)

        Store.commit_job = stalled_commit
    memory = AbsorberMemory(model, tokenizer=tokenizer, config=quiet, data_dir=data_dir, executor=Stalling())
    for k in range(6):
        stored += memory.add_messages(turn(k))
    all_added.set()
    memory.schedule()  # jobs start only now, so a stall holding the store lock cannot block adding
    memory.flush()
    ready.write_text(json.dumps(stored))  # no stall happened: the parent fails the test


if __name__ == "__main__":
    main()
