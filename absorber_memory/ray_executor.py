"""`RayExecutor`: absorption jobs on Ray actors, with nothing shared but Ray's object store.

Each worker is a Ray actor that loads the base model once (from the job's
model name or path, which must resolve on the worker's machine) and keeps
it, with its LoRA engine, between jobs. No filesystem is shared: the previous
adapter travels to the worker as bytes through the object store, and the new
adapter (safetensors + config) and the round's report come back the same way;
the driver then writes them with the same durable protocol as a local job
(atomic folder write with its job marker, then the store's transaction).

While a job runs the driver polls the actor for `(step, loss)`, so
`memory.jobs()` shows live progress, and forwards a cancel to it. Failures:

- a worker that dies mid-job (killed, out of memory, node lost) is replaced
  by a fresh actor and the job retried `retries` times (default once), from
  the same inputs; after that the job fails with the reason. Until a job
  commits, the session keeps its previous adapter and the job's messages stay
  in the window.
- a job running past `job_timeout_s` has its actor killed and replaced, and
  fails with a timeout; a cancel the actor does not honour within
  `cancel_timeout_s` does the same.
- an unreachable cluster, or workers Ray cannot place within
  `start_timeout_s`, raise `AbsorberError` at construction.

`ray` is imported only when a `RayExecutor` is built (`pip install
'absorber-memory[ray]'`).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import AbsorberError, JobCancelled
from .jobs import JobResult, JobSpec, StepCallback
from .layout import JOB_MARKER

__all__ = ["AbsorptionWorker", "RayExecutor", "pack_folder", "unpack_folder"]

log = logging.getLogger(__name__)

RAY_HINT = "RayExecutor needs Ray: pip install 'absorber-memory[ray]'"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{RAY_HINT} ({exc})") from exc
    return ray


def pack_folder(folder: str | Path) -> dict[str, bytes]:
    """Every file under `folder` as `{relative path: bytes}` (what an adapter is, to ship it)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unpack_folder(files: dict[str, bytes], folder: str | Path) -> None:
    """Write `pack_folder`'s result into `folder`, refusing paths that would leave it."""
    root = Path(folder).resolve()
    for name, data in files.items():
        path = (root / name).resolve()
        if root not in path.parents:
            raise AbsorberError(f"adapter file {name!r} would be written outside {root}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class AbsorptionWorker:
    """What runs inside one Ray actor: a cached engine, and jobs sent as plain data.

    The actor runs with two threads, so `progress` and `cancel` are answered
    while `run` trains.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        self._engine: Any = None
        self._key: tuple[str, str] | None = None
        self._progress: dict[int, tuple[int, float]] = {}
        self._cancelled: set[int] = set()
        self._num_threads = num_threads

    def _engine_for(self, spec: JobSpec) -> Any:
        import json

        from .executor import build_engine
        from .models import set_threads

        key = (str(spec.model), json.dumps(spec.config, sort_keys=True))
        if self._key != key:  # one engine at a time: a new base model or config replaces the old one
            self._engine = None
            set_threads(self._num_threads)
            self._engine, self._key = build_engine(spec), key
        return self._engine

    def run(self, spec_data: dict[str, Any], base_files: dict[str, bytes] | None) -> dict[str, Any]:
        """Run one job; returns `{"files": new adapter, "report": ..., "worker": "host:pid"}`."""
        from .executor import run_job

        spec = JobSpec.model_validate(spec_data)
        engine = self._engine_for(spec)

        def on_step(step: int, loss: float) -> None:
            self._progress[spec.job_id] = (step, loss)
            if spec.job_id in self._cancelled:
                raise JobCancelled(f"job {spec.job_id} cancelled at step {step}")

        try:
            with tempfile.TemporaryDirectory(prefix="absorber-ray-") as tmp:
                base = None
                if base_files is not None:
                    unpack_folder(base_files, Path(tmp, "base"))
                    base = str(Path(tmp, "base"))
                local = spec.model_copy(update={"base_adapter": base, "output": str(Path(tmp, "out"))})
                result = run_job(engine, local, on_step)
                files = {k: v for k, v in pack_folder(Path(tmp, "out")).items() if k != JOB_MARKER}
        finally:
            self._progress.pop(spec.job_id, None)
            self._cancelled.discard(spec.job_id)
        return {"files": files, "report": result.report, "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def progress(self, job_id: int) -> tuple[int, float] | None:
        return self._progress.get(job_id)

    def cancel(self, job_id: int) -> None:
        self._cancelled.add(job_id)

    def ping(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"


class _WorkerLost(Exception):
    """The actor running a job died or has to be killed; unless `final`, the job may be retried."""

    def __init__(self, reason: str, *, final: bool = False, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.final, self.cause = final, cause


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast (`AbsorberError`) if `host:port` or `ray://host:port` does not accept a TCP connection.

    `ray.init` keeps retrying an address nobody listens on; this check is what
    keeps a wrong address from hanging the caller.
    """
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        return  # not a host:port form; ray.init judges it
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as exc:
        raise AbsorberError(f"Ray is unreachable at {address!r} ({exc}); start a cluster or fix `address`") from None


class RayExecutor:
    """Runs absorption jobs on `workers` Ray actors (the `Executor` protocol of `jobs.py`).

    Args:
        address: None starts (or joins, with `RAY_ADDRESS` set) a local Ray
            instance; "auto" joins the cluster running on this machine;
            "host:port" or "ray://host:port" joins a remote one.
        workers: actors to start; jobs of different sessions run on them at once.
        gpus_per_worker: GPUs each actor reserves (its engine uses CUDA when it has one).
        cpus_per_worker: CPUs each actor reserves.
        num_threads: torch CPU threads in each actor (None: `cpus_per_worker`).
        runtime_env: Ray runtime environment for the actors (e.g. `{"pip": [...]}`).
        retries: times a job is retried on a fresh actor after its actor died.
        job_timeout_s: a job running longer has its actor killed and fails.
        start_timeout_s: how long Ray may take to place and start the actors.
        connect_timeout_s: how long to wait for a remote address to answer.
        cancel_timeout_s: how long a cancelled job may take to stop before its actor is killed.
        poll_s: how often the driver asks a running actor for its progress.
        init_kwargs: extra arguments for `ray.init` (e.g. `num_cpus`), used only if Ray is not initialised yet.

    Use it with a model given by name or path (the workers load their own copy):
    `AbsorberMemory("path/or/hub-id", executor=RayExecutor(workers=2), config={"absorb_workers": 2})`.
    """

    #: Workers load the base model from `spec.model` (AbsorberMemory must be given a name or path).
    loads_own_model = True

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int = 1,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        num_threads: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        retries: int = 1,
        job_timeout_s: float = 3600.0,
        start_timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        cancel_timeout_s: float = 60.0,
        poll_s: float = 0.5,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if workers < 1:
            raise AbsorberError(f"`workers` must be >= 1, got {workers}")
        if retries < 0:
            raise AbsorberError(f"`retries` must be >= 0, got {retries}")
        timeouts = {"job_timeout_s": job_timeout_s, "start_timeout_s": start_timeout_s, "poll_s": poll_s}
        for name, seconds in {**timeouts, "cancel_timeout_s": cancel_timeout_s}.items():
            if not seconds > 0:
                raise AbsorberError(f"`{name}` must be > 0, got {seconds}")
        ray = self._ray = _import_ray()
        self.retries, self.job_timeout_s, self.poll_s = retries, job_timeout_s, poll_s
        self.start_timeout_s, self.cancel_timeout_s = start_timeout_s, cancel_timeout_s
        self._started_ray = False
        if not ray.is_initialized():
            if address not in (None, "auto", "local"):
                _check_reachable(str(address), connect_timeout_s)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
            except Exception as exc:
                raise AbsorberError(f"could not start or join Ray at {address!r}: {type(exc).__name__}: {exc}") from exc
            self._started_ray = address is None
        threads = num_threads or max(1, int(cpus_per_worker))
        self._actor_class = ray.remote(AbsorptionWorker).options(
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_concurrency=2,
            max_restarts=0,
            runtime_env=runtime_env,
        )
        self._threads = threads
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        #: The live actors (replaced ones removed), and which one runs each job: for operations and tests.
        self.actors: list[Any] = []
        self.running: dict[int, Any] = {}
        actors = [self._new_actor() for _ in range(workers)]
        try:
            self.worker_names = ray.get([a.ping.remote() for a in actors], timeout=start_timeout_s)
        except Exception as exc:
            for a in actors:
                ray.kill(a)
            self.actors = []
            raise AbsorberError(
                f"Ray could not start {workers} worker(s) with {cpus_per_worker} CPU and {gpus_per_worker} GPU each "
                f"within {start_timeout_s} s (cluster resources: {ray.cluster_resources()}): {type(exc).__name__}"
            ) from None
        for a in actors:
            self._idle.put(a)
        self.workers = workers

    def _new_actor(self) -> Any:
        actor = self._actor_class.remote(self._threads)
        self.actors.append(actor)
        return actor

    # --- the Executor protocol -----------------------------------------------------------------
    def run(self, spec: JobSpec, on_step: StepCallback) -> JobResult:
        """Ship `spec` and the previous adapter to an idle actor; write what comes back to `spec.output`."""
        if self._closed:
            raise AbsorberError("this RayExecutor is closed (its memory was closed); build a new one")
        if spec.model is None:
            raise AbsorberError(
                "RayExecutor workers load their own base model: build AbsorberMemory from a model name or path"
            )
        ray = self._ray
        base = None if spec.base_adapter is None else ray.put(pack_folder(spec.base_adapter))
        data = ray.put(spec.model_dump(mode="json"))
        for attempt in range(self.retries + 1):
            actor = self.running[spec.job_id] = self._idle.get()
            try:
                out = self._run_on(actor, spec, data, base, on_step)
            except _WorkerLost as exc:
                self._replace(actor)
                if exc.cause is not None:  # a cancel that needed the actor killed: still a cancel
                    raise exc.cause from None
                if exc.final or attempt == self.retries:
                    raise AbsorberError(f"job {spec.job_id}: {exc} (attempt {attempt + 1})") from None
                log.warning("job %d: %s; retrying on a fresh Ray worker", spec.job_id, exc)
                continue
            except BaseException:
                self._idle.put(actor)
                raise
            finally:
                self.running.pop(spec.job_id, None)
            self._idle.put(actor)
            report = {**out["report"], "worker": out["worker"], "attempts": attempt + 1}
            return self._write(spec, out["files"], report)
        raise AssertionError("unreachable")

    def _run_on(self, actor: Any, spec: JobSpec, data: Any, base: Any, on_step: StepCallback) -> dict[str, Any]:
        ray = self._ray
        ref = actor.run.remote(data, base)
        deadline, last = time.monotonic() + self.job_timeout_s, None
        while not ray.wait([ref], timeout=self.poll_s)[0]:
            if time.monotonic() > deadline:
                raise _WorkerLost(f"timed out after {self.job_timeout_s} s (`job_timeout_s`)", final=True)
            try:
                progress = ray.get(actor.progress.remote(spec.job_id), timeout=self.poll_s)
            except Exception:  # a dead actor shows on `ref` at the next wait
                continue
            if progress is not None and tuple(progress) != last:
                last = tuple(progress)
                try:
                    on_step(*last)
                except JobCancelled as exc:
                    actor.cancel.remote(spec.job_id)
                    if not ray.wait([ref], timeout=self.cancel_timeout_s)[0]:
                        reason = f"cancelled, but its worker did not stop within {self.cancel_timeout_s} s"
                        raise _WorkerLost(reason, final=True, cause=exc) from None
                    raise
        try:
            out: dict[str, Any] = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise _WorkerLost(f"its Ray worker was lost ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None
        return out

    def _replace(self, actor: Any) -> None:
        self.actors = [a for a in self.actors if a is not actor]
        try:
            self._ray.kill(actor)
        except Exception:
            pass
        if not self._closed:
            self._idle.put(self._new_actor())

    def _write(self, spec: JobSpec, files: dict[str, bytes], report: dict[str, Any]) -> JobResult:
        from .executor import write_result

        return write_result(spec, report, lambda folder: unpack_folder(files, folder))

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it."""
        self._closed = True
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
