"""`JobCoordinator`: plans absorption rounds, and is the queue's side of a job's life.

`AbsorberMemory` owns one. It plans Algorithm 2 on the part of a session's
window no job has claimed yet and queues one job per round (`schedule`);
then, from the queue's worker threads, it turns a stored job into a
serializable `JobSpec` (`prepare`), commits a finished adapter version
(`commit`), records failure or cancellation (`finish`) and describes a job
(`info`): the `QueueHooks` protocol of `queue.py`. The durable-commit
protocol therefore reads in one place; `store.py` holds its transactions
and says why a crash at any point loses nothing.

It knows the store, the session layout, the chat format (to count tokens)
and the queue; nothing about models.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from pathlib import Path
from typing import Any

from .chat import ChatFormat, Message
from .config import AbsorberConfig
from .errors import ConfigError, InvalidMessageError, JobCancelled
from .jobs import PENDING, Executor, JobInfo, JobResult, JobSpec, JobStatus
from .layout import SessionLayout
from .queue import AbsorptionQueue, JobHandle
from .store import JobRow, Store
from .stream import plan_absorption

log = logging.getLogger("absorber_memory.sessions")


class JobCoordinator:
    """Plans, prepares, commits and describes one data directory's absorption jobs.

    Args:
        store: the directory's store.
        layout: where its adapter folders live.
        config: the memory's settings (window budgets; sent to workers in each spec).
        fmt: the chat format, to count each message's tokens.
        model_name: the base model's name or path, for workers that load their own copy.
        lock: the owner's lock: planning and committing never interleave with its writes.
    """

    def __init__(
        self,
        store: Store,
        layout: SessionLayout,
        config: AbsorberConfig,
        fmt: ChatFormat,
        model_name: str | None,
        lock: threading.RLock,
    ) -> None:
        self.store, self.layout, self.config, self.fmt = store, layout, config, fmt
        self.model_name = model_name
        self.lock = lock
        self.queue: AbsorptionQueue | None = None
        self._specs: dict[int, JobSpec] = {}

    def start(self, executor: Executor, workers: int) -> AbsorptionQueue:
        """Start the queue's workers, resubmit stored pending jobs, and (with `auto_absorb`) plan every session.

        Planning on start covers overflow stored just before a crash (the add
        committed, its jobs never queued) and messages whose adapter recovery
        had to drop. An executor that says how many jobs it runs at once
        (`executor.workers`) gets that many queue threads; one whose workers
        load their own base model (`executor.loads_own_model`) needs the
        model's name or path.
        """
        if getattr(executor, "loads_own_model", False) and self.model_name is None:
            raise ConfigError(
                f"{type(executor).__name__} runs jobs on workers that load their own base model: "
                "build AbsorberMemory from a model name or path, not a loaded model object"
            )
        workers = getattr(executor, "workers", workers)
        self.queue = AbsorptionQueue(executor, self, workers=workers)
        for job in self.store.jobs(statuses=PENDING):
            self.queue.submit(job.id, job.session_id)
        for sid in self.store.sessions() if self.config.auto_absorb else ():
            self.schedule(sid)
        return self.queue

    def _queue(self) -> AbsorptionQueue:
        if self.queue is None:
            raise RuntimeError("the coordinator has no queue yet (call `start`)")
        return self.queue

    # --- planning ------------------------------------------------------------------------------
    def schedule(self, session_id: str, *, everything: bool = False) -> list[JobHandle]:
        """Queue absorption rounds for the session's unclaimed overflow (all of it with `everything`)."""
        with self.lock:
            claimed = [i for job in self.store.jobs(session_id, PENDING) for i in job.context_ids]
            free = [
                m
                for m in self.store.messages(session_id, window_only=True)
                if m.role != "system" and m.id > max(claimed, default=0)
            ]
            cfg, rounds = self.config, []
            while True:
                plan = plan_absorption(
                    [self.fmt.count(m.as_chat()) for m in free],
                    [m.role for m in free],
                    window_tokens=0 if everything else cfg.window_tokens,
                    absorb_tokens=cfg.absorb_tokens,
                    sync_tokens=cfg.sync_tokens,
                    keep_newest=not everything,
                )
                if plan is None:
                    break
                following = free[plan.absorb : plan.absorb + plan.sync]
                rounds.append(([m.id for m in free[: plan.absorb]], [m.id for m in following]))
                free = free[plan.absorb :]
            if not rounds:
                return []
            job_ids = self.store.insert_jobs(session_id, rounds)
            log.info("session %r: queued absorption jobs %s", session_id, job_ids)
            return [self._queue().submit(j, session_id) for j in job_ids]

    def committed(self, session_id: str) -> tuple[int, Path] | None:
        """The session's committed adapter `(version, folder)`, or None before any absorption."""
        row = self.store.session(session_id)
        if row is None or row.adapter_version is None:
            return None
        return row.adapter_version, self.layout.adapter_dir(session_id, row.adapter_version)

    def wait(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """Block until no job is pending (of one session, or all); returns the jobs that ended meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ended: dict[int, JobInfo] = {}
        while futures := self._queue().pending(session_id):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, waiting = concurrent.futures.wait(futures, timeout=left)
            if waiting:
                raise TimeoutError(f"{len(waiting)} absorption job(s) still pending after {timeout} s")
            for f in done:
                if f.exception() is None:
                    ended[f.result().id] = f.result()
        return [ended[k] for k in sorted(ended)]

    # --- forgetting ------------------------------------------------------------------------------
    def forget_session(self, session_id: str) -> bool:
        """Cancel the session's jobs, then delete its rows and folders; returns whether it existed."""
        self._queue().cancel_session(session_id, "session forgotten")
        with self.lock:
            existed = self.store.delete_session(session_id)
            self.layout.remove_session(session_id)
        log.info("forgot session %r", session_id)
        return existed

    def forget_messages(self, session_id: str, message_ids: list[int]) -> list[JobHandle]:
        """Delete messages; if any was absorbed, drop the adapter and plan the rest again."""
        stored = {m.id: m for m in self.store.messages(session_id)}
        if unknown := sorted(set(message_ids) - set(stored)):
            raise InvalidMessageError(f"`message_ids` {unknown[:5]} are not messages of session {session_id!r}")
        self._queue().cancel_session(session_id, "messages forgotten")
        with self.lock:
            rebuild = any(stored[i].absorbed for i in message_ids)
            self.store.delete_messages(session_id, message_ids, reset_adapter=rebuild)
            if rebuild:
                self.layout.remove_adapters(session_id)
            return self.schedule(session_id)

    # --- the queue's hooks -----------------------------------------------------------------------
    def prepare(self, job_id: int) -> JobSpec:
        """Mark a job running and describe it as a `JobSpec` (its output folder reserved)."""
        with self.lock:
            job = self.store.job(job_id)
            if job is None or job.status not in PENDING:
                raise JobCancelled(f"job {job_id} was deleted before it started")
            wanted = job.context_ids + job.following_ids
            msgs = self.store.messages_by_id(wanted)
            if len(msgs) < len(set(wanted)) or any(msgs[i].absorbed for i in job.context_ids):
                raise JobCancelled(f"job {job_id}: its messages were forgotten or absorbed meanwhile")
            claimed = self.store.claim_job(job_id)
            if claimed is None:
                raise JobCancelled(f"job {job_id} was deleted before it started")
            job, session, version = claimed
            base = session.adapter_version
            stored = self.store.messages(job.session_id)  # system messages are never absorbed: the prefix
            prefix: list[Message] = [m.as_chat() for m in stored if m.role == "system"]
            wants_history = base is not None and self.config.streaming_teacher == "history"
            history = [m.as_chat() for m in stored if m.absorbed and m.role != "system"] if wants_history else []
            spec = JobSpec(
                job_id=job_id,
                session_id=job.session_id,
                model=self.model_name,
                config=self.config.model_dump(mode="json"),
                prefix=prefix,
                context=[msgs[i].as_chat() for i in job.context_ids],
                following=[msgs[i].as_chat() for i in job.following_ids],
                history=history,
                base_adapter=None if base is None else str(self.layout.adapter_dir(job.session_id, base)),
                base_version=base,
                output=str(self.layout.adapter_dir(job.session_id, version)),
                version=version,
                round_index=session.rounds,
            )
            self._specs[job_id] = spec
        return spec

    def commit(self, job_id: int, result: JobResult) -> None:
        """Commit a finished job's adapter version, unless its session changed while it ran."""
        with self.lock:
            spec = self._specs.pop(job_id)
            job, session = self.store.job(job_id), self.store.session(spec.session_id)
            if (
                job is None
                or job.status != JobStatus.RUNNING
                or session is None
                or session.adapter_version != spec.base_version
            ):
                self.layout.remove_version(spec.session_id, result.version)
                raise JobCancelled(f"job {job_id}: its session changed while it ran; result discarded")
            commit_version(self.store, self.layout, job, result.version, result.report, spec.base_version)

    def finish(self, job_id: int, status: JobStatus, error: str) -> None:
        """Record a job that did not commit: interrupted by `close` (back to queued), failed or cancelled."""
        with self.lock:
            spec = self._specs.pop(job_id, None)
            if spec is not None:
                self.layout.remove_version(spec.session_id, spec.version)
            job = self.store.job(job_id)
            if job is None:
                return
            if status == JobStatus.QUEUED:
                self.store.requeue_job(job_id)
                return
            self.store.end_job(job_id, status, error)
        if status == JobStatus.FAILED:
            log.warning(
                "session %r: job %d failed (%s); its messages stay in the window", job.session_id, job_id, error
            )
        self._queue().drop_queued(job.session_id, f"an earlier job of this session ({job_id}) was {status}")

    def info(self, job_id: int) -> JobInfo:
        """A job's state, with live step/loss while it runs."""
        row = self.store.job(job_id)
        if row is None:
            return JobInfo(
                id=job_id,
                session_id="",
                status=JobStatus.CANCELLED,
                message_ids=[],
                following_ids=[],
                created=0.0,
                error="job deleted (its session or messages were forgotten)",
            )
        return self.describe(row)

    def describe(self, row: JobRow) -> JobInfo:
        running = row.status == JobStatus.RUNNING and self.queue is not None
        step, loss = (self._queue().progress(row.id) or (None, None)) if running else (None, None)
        return JobInfo(
            id=row.id,
            session_id=row.session_id,
            status=row.status,
            message_ids=row.context_ids,
            following_ids=row.following_ids,
            created=row.created,
            started=row.started,
            finished=row.finished,
            error=row.error,
            step=step,
            loss=loss,
            adapter_version=row.adapter_version,
            metrics=row.metrics or {},
        )


def commit_version(
    store: Store, layout: SessionLayout, job: JobRow, version: int, report: dict[str, Any], previous: int | None
) -> None:
    """Make adapter `version` (already durable on disk) the session's, then delete the `previous` folder."""
    store.commit_job(job, version, report)
    if previous is not None:
        layout.remove_version(job.session_id, previous)
    log.info(
        "session %r: job %d absorbed %d messages (%s tokens, %s steps, %.1f s) into v%d",
        job.session_id,
        job.id,
        len(job.context_ids),
        report.get("context_tokens"),
        report.get("steps"),
        report.get("seconds", 0.0),
        version,
    )
