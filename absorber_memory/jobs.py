"""Absorption jobs as plain data: their status, their spec, their result, and what runs them.

A `JobSpec` holds everything one absorption needs as JSON-ready values:
message texts, the config, the base model's name, and *paths* of the adapter
to continue from and the folder to write, never tensors. An `Executor` runs a
spec and hands back a `JobResult`; `JobInfo` is what users see of a job.

This module imports no torch and no model code, so the queue, the store and
the integrations can name these types without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class JobStatus(str, Enum):
    """Where a job is in its life: queued -> running -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def pending(self) -> bool:
        """Queued or running: the job's messages are claimed but not yet absorbed."""
        return self in PENDING


#: The statuses of a job that has not ended.
PENDING: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)

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
    following: list[dict[str, str]]  # the turns after C, read first in the sync text S
    # What earlier rounds absorbed, for a teacher that reads the whole history (`streaming_teacher`).
    history: list[dict[str, str]] = []
    # A consolidation: `context` is everything absorbed so far, re-taught by the frozen model; nothing new.
    consolidation: bool = False
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
    """Runs one job to completion; `on_step(step, loss)` may raise to cancel.

    Optional attributes the queue reads: `workers` (how many jobs it runs at
    once; the queue starts that many threads) and `loads_own_model` (True when
    its workers load the base model from `spec.model`, which then must be set).
    """

    def run(self, spec: JobSpec, on_step: StepCallback) -> JobResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JobInfo:
    """A job's state as users see it.

    `message_ids` are the messages it absorbs (C); `following_ids` the turns
    after them that its sync text starts with. A consolidation (`kind`)
    absorbs no message: it re-teaches the adapter what is already absorbed.
    """

    id: int
    session_id: str
    status: JobStatus
    message_ids: list[int]
    following_ids: list[int]
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    step: int | None = None  # while running: the last step reported
    loss: float | None = None
    adapter_version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # when done: the absorption report
    kind: str = "round"  # "round" or "consolidation"

    @property
    def pending(self) -> bool:
        return self.status in PENDING

    @property
    def sync_ids(self) -> list[int]:
        """Deprecated name of `following_ids`."""
        import warnings

        warnings.warn("`JobInfo.sync_ids` is deprecated; use `following_ids`", DeprecationWarning, stacklevel=2)
        return self.following_ids
