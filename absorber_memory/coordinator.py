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
from .errors import ConfigError, InvalidMessageError, InvalidSessionError, JobCancelled
from .jobs import PENDING, Executor, JobInfo, JobResult, JobSpec, JobStatus
from .layout import SessionLayout
from .probes import recitation_tokens
from .queue import AbsorptionQueue, JobHandle
from .store import JobRow, Store, StoredMessage
from .stream import consolidation_following, idle_round, plan_absorption, teacher_tokens

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
        limit: most tokens a prompt may hold (whether a consolidation's teacher can read the history).
    """

    def __init__(
        self,
        store: Store,
        layout: SessionLayout,
        config: AbsorberConfig,
        fmt: ChatFormat,
        model_name: str | None,
        lock: threading.RLock,
        limit: int | None = None,
    ) -> None:
        self.store, self.layout, self.config, self.fmt = store, layout, config, fmt
        self.model_name = model_name
        self.lock = lock
        self.limit = limit
        self.queue: AbsorptionQueue | None = None
        self._specs: dict[int, JobSpec] = {}
        self._idle: dict[str, threading.Timer] = {}  # session -> timer that consolidates it when it stays idle
        # absorb_when="idle": session -> timer that absorbs its overflow (a restarted timer's late callback
        # finds another timer here and does nothing)
        self._waiting: dict[str, threading.Timer] = {}
        # deferred rounds' jobs: they sync as a consolidation would, so no consolidation follows them (one resumed
        # after a restart is not known as such and gets the usual consolidation: more compute, nothing lost)
        self._merged: set[int] = set()
        # session -> newest message id when its committed adapter's job was prepared (what that job could read)
        self._taught: dict[str, int] = {}
        self._read: dict[int, int] = {}  # running job -> newest message id of its session when prepared

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
    def schedule(self, session_id: str, *, everything: bool = False, due: bool = False) -> list[JobHandle]:
        """Queue absorption rounds for the session's unclaimed overflow (all of it with `everything`).

        With `absorb_when="idle"` the overflow waits (an idle timer restarts) unless `due` (the session went
        idle, or `flush`) or the window, less what pending rounds absorb, no longer fits the prompt; then one
        round absorbs it (`_deferred_round`).
        """
        with self.lock:
            claimed = [i for job in self.store.jobs(session_id, PENDING) for i in job.context_ids]
            window = [m for m in self.store.messages(session_id, window_only=True) if m.role != "system"]
            free = [m for m in window if m.id > max(claimed, default=0)]
            cfg, rounds = self.config, []
            deferred = cfg.absorb_when == "idle" and not everything
            if deferred:
                # What the pending rounds leave (their C goes when they commit): a round they will make
                # room for is not queued again at every message that arrives while they run.
                fits = self.limit is None or sum(self.fmt.count(m.as_chat()) for m in free) <= self.limit
                if not due:
                    self._defer(session_id)  # whatever a full prompt makes absorb now, the rest waits for idle
                    if fits:
                        return []
                rounds = self._deferred_round(free)
            else:
                while plan := plan_absorption(
                    [self.fmt.count(m.as_chat()) for m in free],
                    [m.role for m in free],
                    window_tokens=0 if everything else cfg.window_tokens,
                    absorb_tokens=cfg.absorb_tokens,
                    sync_tokens=cfg.sync_tokens,
                    keep_newest=not everything,
                ):
                    following = free[plan.absorb : plan.absorb + plan.sync]
                    rounds.append(([m.id for m in free[: plan.absorb]], [m.id for m in following]))
                    free = free[plan.absorb :]
            if not rounds:
                self._reconsolidate_if_grown(session_id)
                return []
            job_ids = self.store.insert_jobs(session_id, rounds)
            if deferred:
                self._merged.update(job_ids)
            log.info("session %r: queued absorption jobs %s", session_id, job_ids)
            return [self._queue().submit(j, session_id) for j in job_ids]

    def _deferred_round(self, free: list[StoredMessage]) -> list[tuple[list[int], list[int]]]:
        """`absorb_when="idle"`: one round `(C ids, S ids)` for the waiting overflow, or none.

        C is what the rounds would have absorbed had the messages come one at a time
        (`stream.replayed_overflow`), so the same window is left behind; S starts as a consolidation's
        does (`consolidation_sync`): all of that window, so the probes sit where the next question will,
        or its oldest turns up to `sync_tokens`.
        """
        cfg = self.config
        end, sync = idle_round(
            [m.as_chat() for m in free],
            self.fmt.count,
            window_tokens=cfg.window_tokens,
            absorb_tokens=cfg.absorb_tokens,
            sync_mode=cfg.consolidation_sync,
            sync_tokens=cfg.sync_tokens,
        )
        if end == 0:
            return []
        return [([m.id for m in free[:end]], [m.id for m in free[end : end + sync]])]

    def _defer(self, session_id: str) -> None:
        """Restart the session's idle timer: its overflow is absorbed after `idle_seconds` without a new message."""
        if (old := self._waiting.pop(session_id, None)) is not None:
            old.cancel()
        timer = threading.Timer(self.config.idle_seconds, self._absorb_if_idle, (session_id,))
        timer.daemon = True
        self._waiting[session_id] = timer
        timer.start()

    def _absorb_if_idle(self, session_id: str) -> None:
        """The idle timer (this thread): absorb the session's overflow unless a newer message restarted it."""
        with self.lock:
            if (
                self._waiting.get(session_id) is not threading.current_thread()
                or self.queue is None
                or self.queue.closed
            ):
                return
            del self._waiting[session_id]
            try:
                self.schedule(session_id, due=True)
            except Exception as exc:  # a timer thread must not die loudly; the messages stay in the window
                log.warning("session %r: deferred absorption not queued: %s", session_id, exc)

    def absorb_due(self, session_id: str | None = None) -> None:
        """`absorb_when="idle"`: absorb the waiting overflow now (of one session, or of every one waiting)."""
        if self.config.absorb_when != "idle":
            return
        with self.lock:
            sessions = [session_id] if session_id is not None else list(self._waiting)
            for sid in sessions:
                if (timer := self._waiting.pop(sid, None)) is not None:
                    timer.cancel()
                if self.store.session(sid) is not None:
                    self.schedule(sid, due=True)

    # --- consolidation ---------------------------------------------------------------------------
    def consolidate(self, session_id: str, *, quiet: bool = False) -> JobHandle | None:
        """Queue a consolidation of the session: one round that re-teaches everything absorbed.

        The frozen model reading every absorbed message teaches (probe answers included), the student
        continues from the committed adapter, and S starts with the window's turns (all of them, or the
        oldest up to `sync_tokens`: `consolidation_sync`); no message is absorbed, so the window does not
        change. It spends spare compute where streaming loses fidelity: rounds stop undertrained, chained
        rounds forget early ones, and a round trained right after its turns over-applies them once the
        window has grown.
        Stored as a job with no messages (`JobRow.consolidation`), so it survives restarts like any job.

        Returns the pending consolidation's handle (an already queued one is reused), or None when nothing
        is absorbed yet. Raises `ConfigError` when the absorbed history does not fit the model's context,
        or returns None then with `quiet` (the idle path).
        """
        with self.lock:
            if self.store.session(session_id) is None:
                raise InvalidSessionError(f"unknown session {session_id!r}")
            pending = self.store.jobs(session_id, PENDING)
            queued = [j for j in pending if j.consolidation and j.status == JobStatus.QUEUED]
            if queued:  # `submit` hands back the queue's existing handle of a job it already holds
                return self._queue().submit(queued[-1].id, session_id)
            prefix, history, following = self._consolidation(self.store.messages(session_id))
            if not history:
                return None
            if (problem := self._too_long(prefix, history, following)) is not None:
                if quiet:
                    log.info("session %r: not consolidated: %s", session_id, problem)
                    return None
                raise ConfigError(f"cannot consolidate session {session_id!r}: {problem}")
            (job_id,) = self.store.insert_jobs(session_id, [([], [])])
            log.info("session %r: queued consolidation job %d", session_id, job_id)
            return self._queue().submit(job_id, session_id)

    def _consolidation(self, stored: list[StoredMessage]) -> tuple[list[Message], list[Message], list[Message]]:
        """A consolidation's `(prefix, C = every absorbed message, following)` from a session's stored messages.

        The following turns are the whole window, or its oldest whole messages up to `sync_tokens`
        (`consolidation_sync`).
        """
        prefix = [m.as_chat() for m in stored if m.role == "system"]
        history = [m.as_chat() for m in stored if m.absorbed and m.role != "system"]
        window = [m.as_chat() for m in stored if not m.absorbed and m.role != "system"]
        cfg = self.config
        following = consolidation_following(window, self.fmt.count, cfg.consolidation_sync, cfg.sync_tokens)
        return prefix, history, following

    def _too_long(self, prefix: list[Message], history: list[Message], following: list[Message]) -> str | None:
        """Why a teacher cannot read the whole absorbed `history` with its probes (None: it can)."""
        if self.limit is None:
            return None
        cfg = self.config
        history_tokens = sum(self.fmt.count(m) for m in history)
        needed = teacher_tokens(
            len(self.fmt.prefix_ids(prefix)),
            history_tokens + sum(self.fmt.count(m) for m in following),
            cfg.probe_count,
            cfg.probe_max_new_tokens,
            recitation_tokens(self.fmt.count, history, cfg.sync_recitation),
        )
        if needed <= self.limit:
            return None
        return (
            f"the absorbed history ({history_tokens} tokens) with its sync text needs {needed} tokens, "
            f"more than the model's context ({self.limit} tokens)"
        )

    def _reconsolidate_if_grown(self, session_id: str) -> None:
        """With `reconsolidate_tokens`, consolidate (as after a round) once the window has grown that much.

        Counts the window's tokens newer than what the committed adapter's last job could read; nothing
        happens while a job is pending, before the first commit, or before one since a restart.
        """
        cfg = self.config
        if cfg.reconsolidate_tokens is None or cfg.consolidate_when_idle is None:
            return
        taught, session = self._taught.get(session_id), self.store.session(session_id)
        if taught is None or session is None or session.adapter_version is None:
            return
        if self.store.jobs(session_id, PENDING):
            return
        new = [m for m in self.store.messages(session_id, window_only=True) if m.id > taught and m.role != "system"]
        if sum(self.fmt.count(m.as_chat()) for m in new) >= cfg.reconsolidate_tokens:
            self._taught[session_id] = max(m.id for m in new)  # once per growth, whatever the consolidation does
            self._after_round(session_id, session.adapter_version)

    def _after_round(self, session_id: str, version: int) -> None:
        """With `consolidate_when_idle`, consolidate the session once it has stayed idle that long after a round."""
        delay = self.config.consolidate_when_idle
        if delay is None:
            return
        if (old := self._idle.pop(session_id, None)) is not None:
            old.cancel()
        if delay == 0:
            self._consolidate_if_idle(session_id, version)
            return
        timer = threading.Timer(delay, self._consolidate_if_idle, (session_id, version))
        timer.daemon = True
        self._idle[session_id] = timer
        timer.start()

    def _consolidate_if_idle(self, session_id: str, version: int) -> None:
        """Consolidate unless the session changed since round `version` committed or has work pending."""
        with self.lock:
            if self.queue is None or self.queue.closed:
                return
            session = self.store.session(session_id)
            if session is None or session.adapter_version != version or self.store.jobs(session_id, PENDING):
                return
            try:
                self.consolidate(session_id, quiet=True)
            except Exception as exc:  # a timer thread must not die loudly; the session keeps its adapter
                log.warning("session %r: consolidation not queued: %s", session_id, exc)

    def close(self) -> None:
        """Stop the idle timers (call before closing the queue); deferred overflow is planned again on start."""
        with self.lock:
            timers = [*self._idle.values(), *self._waiting.values()]
            self._idle, self._waiting = {}, {}
        for timer in timers:
            timer.cancel()

    def committed(self, session_id: str) -> tuple[int, Path] | None:
        """The session's committed adapter `(version, folder)`, or None before any absorption."""
        row = self.store.session(session_id)
        if row is None or row.adapter_version is None:
            return None
        return row.adapter_version, self.layout.adapter_dir(session_id, row.adapter_version)

    def wait(self, session_id: str | None = None, timeout: float | None = None) -> list[JobInfo]:
        """Block until no job is pending (of one session, or all); returns the jobs that ended meanwhile.

        With `absorb_when="idle"`, overflow waiting for its session to go idle is absorbed first.
        """
        self.absorb_due(session_id)
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
        for timers in (self._idle, self._waiting):
            if (timer := timers.pop(session_id, None)) is not None:
                timer.cancel()
        self._taught.pop(session_id, None)
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
            stored = self.store.messages(job.session_id)  # system messages are never absorbed: the prefix
            absorbed = [m.as_chat() for m in stored if m.absorbed and m.role != "system"]
            if job.consolidation and not absorbed:
                raise JobCancelled(f"job {job_id}: nothing absorbed to consolidate (its messages were forgotten)")
            claimed = self.store.claim_job(job_id)
            if claimed is None:
                raise JobCancelled(f"job {job_id} was deleted before it started")
            job, session, version = claimed
            base = session.adapter_version
            prefix: list[Message] = [m.as_chat() for m in stored if m.role == "system"]
            history: list[Message] = []
            if job.consolidation:  # everything absorbed is C again, S starts with the window's oldest turns
                _, context, following = self._consolidation(stored)
            else:
                context = [msgs[i].as_chat() for i in job.context_ids]
                following = [msgs[i].as_chat() for i in job.following_ids]
                if base is not None and self.config.streaming_teacher == "history":
                    history = absorbed
            spec = JobSpec(
                job_id=job_id,
                session_id=job.session_id,
                model=self.model_name,
                config=self.config.model_dump(mode="json"),
                prefix=prefix,
                context=context,
                following=following,
                history=history,
                consolidation=job.consolidation,
                base_adapter=None if base is None else str(self.layout.adapter_dir(job.session_id, base)),
                base_version=base,
                output=str(self.layout.adapter_dir(job.session_id, version)),
                version=version,
                round_index=session.rounds,
            )
            self._specs[job_id] = spec
            self._read[job_id] = max((m.id for m in stored), default=0)
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
            self._taught[spec.session_id] = self._read.pop(job_id, 0)
            if not job.consolidation and job_id not in self._merged:
                self._after_round(spec.session_id, result.version)
            self._merged.discard(job_id)

    def finish(self, job_id: int, status: JobStatus, error: str) -> None:
        """Record a job that did not commit: interrupted by `close` (back to queued), failed or cancelled."""
        with self.lock:
            spec = self._specs.pop(job_id, None)
            self._read.pop(job_id, None)
            if status != JobStatus.QUEUED:
                self._merged.discard(job_id)
            if spec is not None:
                self.layout.remove_version(spec.session_id, spec.version)
            job = self.store.job(job_id)
            if job is None:
                return
            if status == JobStatus.QUEUED:
                self.store.requeue_job(job_id)
                return
            self.store.end_job(job_id, status, error)
        if job.consolidation:  # it absorbs nothing, so the rounds queued after it still apply
            if status == JobStatus.FAILED:
                log.warning("session %r: consolidation job %d failed (%s)", job.session_id, job_id, error)
            return
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
            kind="consolidation" if row.consolidation else "round",
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
