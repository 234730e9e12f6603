"""Absorption jobs as plain data, and the executors that run them.

A `JobSpec` holds everything one absorption needs as JSON-ready values:
message texts, the config, the base model's name, and *paths* of the adapter
to continue from and the folder to write, never tensors. `run_job` does the
work on an engine (a `ParametricMemory` used only for its model and
Algorithm 1) and writes the new adapter atomically, with a marker naming the
job, so a restart can tell a finished-but-uncommitted adapter from a stray.

`Executor` is the seam between the queue and compute: `LocalExecutor` runs
jobs in this process on training replicas that share the frozen base
weights with the inference model. A distributed backend (e.g. Ray) only has
to implement `run(spec, on_step)`: ship `spec.model_dump()` to a worker,
`build_engine(spec)` there (cached per worker) and call `run_job`; the
adapter folder must land on storage the serving process can read.
"""

from __future__ import annotations

import copy
import queue
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict

from .config import AbsorberConfig
from .memory import ParametricMemory
from .models import replica
from .persistence import atomic_write_dir, write_json

#: Written beside the adapter weights: which job made this folder, from which version.
JOB_MARKER = "absorber_job.json"

StepCallback = Callable[[int, float], None]


class JobSpec(BaseModel):
    """One absorption, serializable: ids, texts, paths and settings only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: int
    session_id: str
    model: str | None  # base model name or path, for workers that load their own copy
    config: dict[str, Any]
    prefix: list[dict[str, str]]
    context: list[dict[str, str]]  # C: the messages absorbed
    following: list[dict[str, str]]  # the turns after C, used as the lead of the sync text S
    base_adapter: str | None  # folder to continue from; None: a fresh adapter taught by the frozen model
    base_version: int | None
    output: str  # folder to write the new adapter to
    version: int
    round_index: int


class JobResult(BaseModel):
    """What a finished job hands back: where its adapter is, and its report."""

    job_id: int
    output: str
    version: int
    report: dict[str, Any]


class Executor(Protocol):
    """Runs one job to completion; `on_step(step, loss)` may raise to cancel."""

    def run(self, spec: JobSpec, on_step: StepCallback) -> JobResult: ...

    def close(self) -> None: ...


def build_engine(spec: JobSpec) -> ParametricMemory:
    """An engine for `spec` built from scratch (for workers in other processes or machines)."""
    if spec.model is None:
        raise ValueError("`spec.model` is None: this job's base model was passed as an object; name it to run remotely")
    return ParametricMemory(spec.model, config={**spec.config, "auto_absorb": False})


def run_job(engine: ParametricMemory, spec: JobSpec, on_step: StepCallback | None = None) -> JobResult:
    """Absorb `spec.context` into a copy of the session's adapter and write it to `spec.output`."""
    if spec.base_adapter is None:
        engine.reset_adapter()
    else:
        engine.load_adapter(spec.base_adapter)
    report = engine.absorb_turns(
        spec.prefix, spec.context, [], n_probes=engine.config.probe_count, lead=spec.following,
        base_teacher=spec.base_adapter is None, round_index=spec.round_index, on_step=on_step,
    )
    marker = {"job_id": spec.job_id, "session_id": spec.session_id, "version": spec.version,
              "base_version": spec.base_version, "report": report.to_dict()}

    def write(tmp: Path) -> None:
        engine.save_adapter(tmp)
        write_json(tmp / JOB_MARKER, marker)

    atomic_write_dir(Path(spec.output), write)
    return JobResult(job_id=spec.job_id, output=spec.output, version=spec.version, report=report.to_dict())


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
        self._idle: queue.SimpleQueue[ParametricMemory] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(ParametricMemory(replica(base_model), tokenizer=copy.deepcopy(tokenizer), config=cfg))

    def run(self, spec: JobSpec, on_step: StepCallback) -> JobResult:
        engine = self._idle.get()  # blocks only if more threads than replicas call at once
        try:
            return run_job(engine, spec, on_step)
        finally:
            self._idle.put(engine)

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get()
