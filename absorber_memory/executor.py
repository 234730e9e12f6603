"""The executors that run absorption jobs, and `run_job`, the work of one job.

`run_job` does one job on an `AbsorptionEngine`: it loads the session's
adapter (or starts a fresh one), runs one absorption round and writes the
new adapter atomically, with a marker naming the job, so a restart can tell a
finished-but-uncommitted adapter from a stray.

`Executor` (in `jobs.py`) is the seam between the queue and compute:
`LocalExecutor` runs jobs in this process on training replicas that share
the frozen base weights with the inference model. `ray_executor.RayExecutor`
ships `spec.model_dump()` and the previous adapter's bytes to Ray actors,
which `build_engine(spec)` once, call `run_job` on a private folder and send
the new adapter's bytes back for the driver to write.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import AbsorberConfig
from .engine import AbsorptionEngine
from .jobs import Executor, JobResult, JobSpec, StepCallback
from .layout import JOB_MARKER
from .models import replica
from .persistence import atomic_write_dir, write_json

__all__ = [
    "JOB_MARKER",
    "Executor",
    "JobResult",
    "JobSpec",
    "LocalExecutor",
    "StepCallback",
    "build_engine",
    "run_job",
    "write_result",
]


def build_engine(spec: JobSpec) -> AbsorptionEngine:
    """An engine for `spec` built from scratch (for workers in other processes or machines)."""
    if spec.model is None:
        raise ValueError("`spec.model` is None: this job's base model was passed as an object; name it to run remotely")
    return AbsorptionEngine(spec.model, config={**spec.config, "auto_absorb": False})


def run_job(engine: AbsorptionEngine, spec: JobSpec, on_step: StepCallback | None = None) -> JobResult:
    """Absorb `spec.context` (or consolidate) into a copy of the session's adapter; write it to `spec.output`."""
    if spec.base_adapter is None:
        engine.reset_adapter()
    else:
        engine.load_adapter(spec.base_adapter)
    if spec.consolidation:
        report = engine.consolidate(
            spec.prefix, spec.context, spec.following, round_index=spec.round_index, on_step=on_step
        )
    else:
        report = engine.run_round(
            spec.prefix,
            spec.context,
            [],
            n_probes=engine.config.probe_count,
            following=spec.following,
            base_teacher=spec.base_adapter is None,
            history=spec.history,
            round_index=spec.round_index,
            on_step=on_step,
        )
    return write_result(spec, report.to_dict(), engine.save_adapter)


def write_result(spec: JobSpec, report: dict[str, Any], save: Callable[[Path], None]) -> JobResult:
    """Write a finished job's adapter (`save(folder)`) and its job marker to `spec.output`, atomically."""
    marker = {
        "job_id": spec.job_id,
        "session_id": spec.session_id,
        "version": spec.version,
        "base_version": spec.base_version,
        "report": report,
    }

    def write(tmp: Path) -> None:
        save(tmp)
        write_json(tmp / JOB_MARKER, marker)

    atomic_write_dir(Path(spec.output), write)
    return JobResult(job_id=spec.job_id, output=spec.output, version=spec.version, report=report)


class LocalExecutor:
    """Runs jobs in this process on up to `workers` training replicas of one base model.

    Each replica is its own module tree (own LoRA layers, own adapter state)
    over the *same* frozen weight tensors as the inference model, so training
    never disturbs generation and costs no second copy of the weights. The
    tokenizer is copied too: fast tokenizers are not safe to share between
    threads that encode at the same time.
    """

    def __init__(self, base_model: Any, tokenizer: Any, config: AbsorberConfig, workers: int = 1) -> None:
        # Replicas are made now, while `base_model` is still a plain model: once the
        # inference side injects its LoRA layers, its state dict no longer fits a twin.
        cfg = config.model_copy(update={"auto_absorb": False})
        self.workers = workers
        self._idle: queue.SimpleQueue[AbsorptionEngine] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(AbsorptionEngine(replica(base_model), tokenizer=copy.deepcopy(tokenizer), config=cfg))

    def run(self, spec: JobSpec, on_step: StepCallback) -> JobResult:
        engine = self._idle.get()  # blocks only if more threads than replicas call at once
        try:
            return run_job(engine, spec, on_step)
        finally:
            self._idle.put(engine)

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get()
