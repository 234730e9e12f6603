"""The absorption queue's callbacks into `AbsorberMemory`: job in, adapter version committed.

`AbsorptionQueue` calls these from its worker threads: `prepare` turns a
stored job into a serializable `JobSpec` (reserving the adapter folder),
`commit` marks the job's messages absorbed into the new version in one
transaction once the executor has written it, `finish` records failure or
cancellation, `info` reports a job's state. Kept apart from `sessions.py` so
the durable-commit protocol reads in one place; see `store.py` for why a
crash at any point loses nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import Any

from .errors import JobCancelled
from .executor import JobResult, JobSpec
from .queue import JobInfo
from .store import PENDING, JobRow

log = logging.getLogger("absorber_memory.sessions")


class QueueHooks:
    """Mixin for `AbsorberMemory`: the hooks `AbsorptionQueue` calls (uses its store, lock and paths)."""

    _lock: Any
    _store: Any
    _queue: Any
    _specs: dict[int, JobSpec]
    config: Any
    model_name: str | None

    def prepare(self, job_id: int) -> JobSpec:
        with self._lock:
            job = self._store.job(job_id)
            if job is None or job.status not in PENDING:
                raise JobCancelled(f"job {job_id} was deleted before it started")
            msgs = self._store.messages_by_id(job.context_ids + job.sync_ids)
            if len(msgs) < len(set(job.context_ids + job.sync_ids)) or any(msgs[i].absorbed for i in job.context_ids):
                raise JobCancelled(f"job {job_id}: its messages were forgotten or absorbed meanwhile")
            session = self._store.session(job.session_id)
            version = self._store.reserve_version(job.session_id)
            self._store.set_job_status(job_id, "running")
            spec = JobSpec(
                job_id=job_id, session_id=job.session_id, model=self.model_name,
                config=self.config.model_dump(mode="json"), prefix=self.prefix(job.session_id),
                context=[msgs[i].as_chat() for i in job.context_ids], following=[msgs[i].as_chat() for i in job.sync_ids],
                base_adapter=None if session.adapter_version is None else str(self.adapter_dir(job.session_id, session.adapter_version)),
                base_version=session.adapter_version, output=str(self.adapter_dir(job.session_id, version)),
                version=version, round_index=session.rounds,
            )
            self._specs[job_id] = spec
        return spec

    def commit(self, job_id: int, result: JobResult) -> None:
        with self._lock:
            spec = self._specs.pop(job_id)
            job, session = self._store.job(job_id), self._store.session(spec.session_id)
            if job is None or job.status != "running" or session is None or session.adapter_version != spec.base_version:
                shutil.rmtree(result.output, ignore_errors=True)
                raise JobCancelled(f"job {job_id}: its session changed while it ran; result discarded")
            self.commit_version(job, result.version, result.report, spec.base_version)

    def commit_version(self, job: JobRow, version: int, report: dict[str, Any], previous: int | None) -> None:
        """Mark a job's messages absorbed into adapter `version` (already durable), in one transaction."""
        with self._store.transaction() as db:
            db.executemany("UPDATE messages SET absorbed_version = ? WHERE id = ? AND absorbed_version IS NULL",
                           [(version, i) for i in job.context_ids])
            db.execute("UPDATE sessions SET adapter_version = ?, rounds = rounds + 1 WHERE session_id = ?",
                       (version, job.session_id))
            db.execute("UPDATE jobs SET status = 'done', finished = ?, metrics = ?, adapter_version = ?, error = NULL "
                       "WHERE id = ?", (time.time(), json.dumps(report), version, job.id))
        if previous is not None:
            shutil.rmtree(self.adapter_dir(job.session_id, previous), ignore_errors=True)
        log.info("session %r: job %d absorbed %d messages (%s tokens, %s steps, %.1f s) into v%d", job.session_id,
                 job.id, len(job.context_ids), report.get("context_tokens"), report.get("steps"),
                 report.get("seconds", 0.0), version)

    def finish(self, job_id: int, status: str, error: str) -> None:
        with self._lock:
            spec = self._specs.pop(job_id, None)
            if spec is not None:
                shutil.rmtree(spec.output, ignore_errors=True)
            job = self._store.job(job_id)
            if job is None:
                return
            if status == "interrupted":
                self._store.set_job_status(job_id, "queued")
                return
            self._store.set_job_status(job_id, status, error=error)
        if status == "failed":
            log.warning("session %r: job %d failed (%s); its messages stay in the window", job.session_id, job_id, error)
        self._queue.drop_queued(job.session_id, f"an earlier job of this session ({job_id}) was {status}")

    def info(self, job_id: int) -> JobInfo:
        row = self._store.job(job_id)
        if row is None:
            return JobInfo(id=job_id, session_id="", status="cancelled", message_ids=[], sync_ids=[], created=0.0,
                           error="job deleted (its session or messages were forgotten)")
        return self._info(row)

    def _info(self, row: JobRow) -> JobInfo:
        step, loss = (self._queue.progress(row.id) or (None, None)) if row.status == "running" else (None, None)
        return JobInfo(id=row.id, session_id=row.session_id, status=row.status, message_ids=row.context_ids,
                       sync_ids=row.sync_ids, created=row.created, started=row.started, finished=row.finished,
                       error=row.error, step=step, loss=loss, adapter_version=row.adapter_version,
                       metrics=row.metrics or {})
