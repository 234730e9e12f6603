"""A child process for the random-kill tests: talks in two sessions with absorption running, until killed.

Run as `python -m tests.kill_random DATA_DIR TRACE_FILE`. It appends to
TRACE_FILE one JSON line per event, flushed at once (a SIGKILL loses no
page-cache writes): `{"ready": true}` once the model is built, then
`{"phase": ...}` when it enters adding, training, saving or committing, and
`{"acked": [ids]}` after each `add_messages` returned. The parent kills it at
a seeded random moment and checks every acknowledged message survived.

Saving and committing take milliseconds on the tiny model; a short sleep in
each widens those windows so that random kill times land in them too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absorber_memory import AbsorberConfig, AbsorberMemory, LocalExecutor, executor, persistence
from absorber_memory.store import Store
from absorber_memory.testing import tiny_model, tiny_tokenizer

from .conftest import SERVICE, turn

WIDEN = 0.05  # seconds added inside the save and before the commit


def main() -> None:
    data_dir, trace_path = Path(sys.argv[1]), Path(sys.argv[2])
    trace = trace_path.open("a", buffering=1)

    def note(**event) -> None:
        trace.write(json.dumps(event) + "\n")
        trace.flush()

    real_save = persistence.save_file

    def slow_save(tensors, filename, metadata=None):
        note(phase="save")
        real_save(tensors, filename, metadata=metadata)
        time.sleep(WIDEN)

    persistence.save_file = slow_save
    real_commit = Store.commit_job

    def noted_commit(self, job, version, report):
        note(phase="commit")
        time.sleep(WIDEN)
        real_commit(self, job, version, report)
        note(phase="committed")

    Store.commit_job = noted_commit
    real_run = executor.run_job

    def noted_run(engine, spec, on_step=None):
        note(phase="train")
        return real_run(engine, spec, on_step)

    executor.run_job = noted_run

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    config = AbsorberConfig(**SERVICE)
    memory = AbsorberMemory(model, tokenizer=tokenizer, config=config, data_dir=data_dir,
                            executor=LocalExecutor(model, tokenizer, config))
    note(ready=True)
    for k in range(40):
        note(phase="add")
        ids = memory.add_messages(turn(k, who=f"P{k % 2}"), session_id=f"s{k % 2}")
        note(acked=ids)
        time.sleep(0.05)
    memory.flush()
    note(phase="idle")
    time.sleep(600)


if __name__ == "__main__":
    main()
