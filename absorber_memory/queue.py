"""`AbsorptionQueue`: absorption jobs off the event loop, FIFO per session, fair across sessions.

Worker threads (one per training replica; torch releases the GIL while it
computes) take jobs round-robin over sessions: a session's jobs run in the
order they were queued and never two at once, because each one continues the
adapter the previous one wrote; sessions with work take turns, so one long
backlog cannot starve the others.

The queue knows nothing of SQLite, sessions or models: the owner passes `hooks`
(`prepare` a job into a `JobSpec`, `commit` a result, `finish` a job as failed
or cancelled, describe it with `info`) and an `Executor` that runs the spec.
Every job gets a `concurrent.futures.Future` resolved with its final
`JobInfo`, so sync code can `.result()` and async code can `await` a handle.
An exception inside a job is recorded as the job's failure; it never stops a
worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Generator
from typing import Any, Protocol

from .errors import JobCancelled
from .jobs import Executor, JobInfo, JobResult, JobSpec, JobStatus

__all__ = ["AbsorptionQueue", "JobHandle", "JobInfo", "QueueHooks"]

log = logging.getLogger(__name__)


class QueueHooks(Protocol):
    """What the queue calls on its owner (`coordinator.JobCoordinator` in this library)."""

    def prepare(self, job_id: int) -> JobSpec: ...

    def commit(self, job_id: int, result: JobResult) -> None: ...

    def finish(self, job_id: int, status: JobStatus, error: str) -> None:
        """Record a job that ended without committing: failed, cancelled, or back to queued (interrupted)."""

    def info(self, job_id: int) -> JobInfo: ...


class JobHandle:
    """A queued job: poll `info()`, block on `result()`, `await` it, or `cancel()` it."""

    def __init__(self, queue: AbsorptionQueue, job_id: int, session_id: str, future: concurrent.futures.Future) -> None:
        self.id = job_id
        self.session_id = session_id
        self._queue = queue
        self._future = future

    def info(self) -> JobInfo:
        return self._queue.info(self.id)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> JobInfo:
        """Wait for the job to end (done, failed or cancelled) and return its final info."""
        return self._future.result(timeout)

    def cancel(self) -> bool:
        return self._queue.cancel(self.id)

    def __await__(self) -> Generator[Any, None, JobInfo]:
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id}, session_id={self.session_id!r}, done={self.done()})"


class AbsorptionQueue:
    """Schedules jobs onto `workers` threads that run them through `executor`."""

    def __init__(self, executor: Executor, hooks: QueueHooks, workers: int = 1) -> None:
        self._executor = executor
        self._hooks = hooks
        self._cond = threading.Condition()
        self._queued: OrderedDict[str, deque[int]] = OrderedDict()
        self._running: dict[int, str] = {}
        self._cancel: dict[int, threading.Event] = {}
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._sessions: dict[int, str] = {}
        self._progress: dict[int, tuple[int, float]] = {}
        self._served: dict[str, int] = {}  # session -> turn it was last picked (round-robin)
        self._turn = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"absorber-worker-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # --- submitting and inspecting -------------------------------------------------------
    def submit(self, job_id: int, session_id: str) -> JobHandle:
        """Queue a job that is already durable in the store."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the absorption queue is closed")
            future = self._futures.get(job_id)
            if future is None:
                future = self._futures[job_id] = concurrent.futures.Future()
                self._sessions[job_id] = session_id
                self._cancel[job_id] = threading.Event()
                self._queued.setdefault(session_id, deque()).append(job_id)
                self._cond.notify()
        return JobHandle(self, job_id, session_id, future)

    def handle(self, job_id: int) -> JobHandle | None:
        with self._cond:
            future = self._futures.get(job_id)
            return None if future is None else JobHandle(self, job_id, self._sessions[job_id], future)

    def info(self, job_id: int) -> JobInfo:
        return self._hooks.info(job_id)

    def progress(self, job_id: int) -> tuple[int, float] | None:
        """`(step, loss)` last reported by a running job."""
        return self._progress.get(job_id)

    def pending(self, session_id: str | None = None) -> list[concurrent.futures.Future]:
        """Futures of the jobs not yet finished (of one session, or all)."""
        with self._cond:
            return [f for j, f in self._futures.items() if session_id is None or self._sessions[j] == session_id]

    @property
    def closed(self) -> bool:
        """Whether `close` was called: nothing more can be submitted."""
        return self._closed

    def is_running(self, job_id: int) -> bool:
        with self._cond:
            return job_id in self._running

    # --- cancelling ----------------------------------------------------------------------------
    def cancel(self, job_id: int, reason: str = "cancelled") -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step.

        Returns False if the job is unknown or already finished.
        """
        with self._cond:
            if job_id not in self._futures:
                return False
            self._cancel[job_id].set()
            session = self._sessions[job_id]
            queued = self._queued.get(session)
            was_queued = False
            if queued is not None and job_id in queued:
                queued.remove(job_id)
                was_queued = True
        if was_queued:
            self._end(job_id, JobStatus.CANCELLED, reason)
        return True

    def cancel_session(self, session_id: str, reason: str, *, wait: bool = True) -> list[int]:
        """Cancel every job of a session (queued ones at once); with `wait`, until the running one stops."""
        with self._cond:
            ids = [j for j, s in self._sessions.items() if s == session_id]
        for job_id in ids:
            self.cancel(job_id, reason)
        if wait:
            concurrent.futures.wait(self.pending(session_id))
        return ids

    def drop_queued(self, session_id: str, reason: str) -> list[int]:
        """Cancel the session's queued (not running) jobs."""
        with self._cond:
            ids = list(self._queued.get(session_id, ()))
        for job_id in ids:
            self.cancel(job_id, reason)
        return ids

    # --- workers ---------------------------------------------------------------------------------
    def _pick(self) -> tuple[int, str] | None:
        """The next job of the least recently served session that has work and none running."""
        busy = set(self._running.values())
        ready = [s for s, jobs in self._queued.items() if jobs and s not in busy]
        if not ready:
            return None
        session = min(ready, key=lambda s: self._served.get(s, -1))  # ties: queued first
        self._turn += 1
        self._served[session] = self._turn
        jobs = self._queued[session]
        job_id = jobs.popleft()
        if not jobs:
            del self._queued[session]
        return job_id, session

    def _work(self) -> None:
        while True:
            with self._cond:
                picked = None
                while not self._closed and (picked := self._pick()) is None:
                    self._cond.wait()
                if self._closed or picked is None:
                    return
                job_id, session = picked
                self._running[job_id] = session
            try:
                self._run(job_id)
            finally:
                with self._cond:
                    self._running.pop(job_id, None)
                    self._cond.notify_all()

    def _run(self, job_id: int) -> None:
        cancel = self._cancel[job_id]

        def on_step(step: int, loss: float) -> None:
            self._progress[job_id] = (step, loss)
            if cancel.is_set():
                raise JobCancelled(f"job {job_id} cancelled at step {step}")

        status, error = JobStatus.DONE, ""
        try:
            if cancel.is_set():
                raise JobCancelled(f"job {job_id} cancelled before it started")
            spec = self._hooks.prepare(job_id)
            result = self._executor.run(spec, on_step)
            if cancel.is_set():
                raise JobCancelled(f"job {job_id} cancelled before its adapter was committed")
            self._hooks.commit(job_id, result)
        except JobCancelled as exc:
            # Stopped by `close()`: not the user's cancel, so it stays pending and resumes on reopen.
            status, error = (JobStatus.QUEUED if self._closed else JobStatus.CANCELLED), str(exc)
        except Exception as exc:  # a job's failure must never stop the worker
            log.warning("absorption job %d failed: %s: %s", job_id, type(exc).__name__, exc)
            status, error = JobStatus.FAILED, f"{type(exc).__name__}: {exc}"
        self._end(job_id, status, error)

    def _end(self, job_id: int, status: JobStatus, error: str) -> None:
        """Record how a job ended and resolve its future (even if recording fails)."""
        info: JobInfo | BaseException
        try:
            if status != JobStatus.DONE:
                self._hooks.finish(job_id, status, error)
            info = self._hooks.info(job_id)
        except Exception as exc:
            log.error("could not record the end of job %d: %s", job_id, exc)
            info = exc
        with self._cond:
            future = self._futures.pop(job_id, None)
            self._sessions.pop(job_id, None)
            self._cancel.pop(job_id, None)
            self._progress.pop(job_id, None)
        if future is not None:
            if isinstance(info, BaseException):
                future.set_exception(info)
            else:
                future.set_result(info)

    def close(self, *, cancel_running: bool = True, timeout: float | None = None) -> None:
        """Stop the workers; queued jobs stay durable and resume when the store is reopened."""
        with self._cond:
            self._closed = True
            # A running job may have just ended (its cancel event popped by `_end`) before
            # its worker leaves `_running`, so look events up here, under the lock, with get.
            stopping = [self._cancel.get(j) for j in self._running] if cancel_running else []
            self._cond.notify_all()
        for event in stopping:
            if event is not None:
                event.set()
        for t in self._threads:
            t.join(timeout)
        self._executor.close()
        with self._cond:
            left = [(j, f) for j, f in self._futures.items() if j not in self._running]
            self._futures = {j: f for j, f in self._futures.items() if j in self._running}
        for job_id, future in left:  # still queued in the store; waiting callers get its state
            try:
                future.set_result(self._hooks.info(job_id))
            except Exception as exc:
                future.set_exception(exc)
