"""A child process for the Ray driver-kill test: absorbs through a `RayExecutor`, stalls while a job runs on Ray.

Run as `python -m tests.kill_ray_driver MODEL_DIR DATA_DIR READY_FILE`. It
adds six exchanges, and while job 2 runs on a Ray worker it writes the ids of
the stored messages to READY_FILE and sleeps until the parent SIGKILLs it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absorber_memory import AbsorberConfig, AbsorberMemory, RayExecutor

from .conftest import SERVICE, turn


def main() -> None:
    model_dir, data_dir, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ray_executor = RayExecutor(workers=1, num_threads=1, poll_s=0.05, init_kwargs={"num_cpus": 1})
    stored: list[int] = []

    class Stalling:
        workers, loads_own_model = 1, True

        def run(self, spec, on_step):
            def step(i, loss):
                on_step(i, loss)
                if spec.job_id == 2 and i >= 1:
                    ready.write_text(json.dumps(stored))
                    time.sleep(600)

            return ray_executor.run(spec, step)

        def close(self):
            ray_executor.close()

    config = AbsorberConfig(**{**SERVICE, "max_steps": 200})
    memory = AbsorberMemory(model_dir, config=config, data_dir=data_dir, executor=Stalling())
    for k in range(6):
        stored += memory.add_messages(turn(k))
    memory.flush()
    ready.write_text(json.dumps(stored))  # no stall happened: the parent fails the test


if __name__ == "__main__":
    main()
