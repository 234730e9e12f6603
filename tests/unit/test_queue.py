"""The absorption queue: status, progress, cancel, failures, and the executor seam."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from absorber_memory import JobSpec, run_job
from absorber_memory.executor import build_engine
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.testing import tiny_model

from ..conftest import SERVICE, turn


class Controlled:
    """Wraps an executor: holds jobs at a gate, fails chosen jobs, and records what ran."""

    def __init__(self, inner, fail: dict[int, Exception] | None = None, hold: bool = False) -> None:
        self.inner = inner
        self.fail = fail or {}
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.started = threading.Event()
        self.ran: list[int] = []

    def run(self, spec, on_step):
        self.ran.append(spec.job_id)
        if spec.job_id in self.fail:
            self.gate.wait(30)
            raise self.fail[spec.job_id]

        def step(i, loss):
            on_step(i, loss)  # reports progress first, so a waiting test sees step/loss
            self.started.set()
            self.gate.wait(30)

        return self.inner.run(spec, step)

    def close(self):
        self.gate.set()
        self.inner.close()


def overflow(memory, session="default", turns=4) -> list[int]:
    return [i for k in range(turns) for i in memory.add_messages(turn(k), session_id=session)]


def test_status_shows_running_progress_then_done(make_service):
    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault("ex", Controlled(inner, hold=True)))
    overflow(memory)
    assert box["ex"].started.wait(30)
    running = [j for j in memory.jobs() if j.status == "running"]
    assert len(running) == 1 and running[0].step == 0 and running[0].loss > 0
    assert all(j.status == "queued" for j in memory.jobs() if j.id != running[0].id)
    box["ex"].gate.set()
    ended = memory.flush()
    assert {j.status for j in ended} == {"done"} and memory.job(running[0].id).finished


def test_flush_times_out_with_a_clear_error(make_service):
    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault("ex", Controlled(inner, hold=True)))
    overflow(memory)
    with pytest.raises(TimeoutError, match="still pending"):
        memory.flush(timeout=0.2)
    box["ex"].gate.set()
    memory.flush()


def test_cancel_running_job_keeps_messages_and_previous_adapter(make_service):
    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault("ex", Controlled(inner)))
    overflow(memory, turns=3)
    memory.flush()
    before = memory.adapter_path()
    weights = before.joinpath(ADAPTER_WEIGHTS).read_bytes()
    box["ex"].gate.clear()
    box["ex"].started.clear()
    window_before = {m.id for m in memory.window()}
    for k in range(3, 6):
        memory.add_messages(turn(k))
    assert box["ex"].started.wait(30)
    running = next(j for j in memory.jobs() if j.status == "running")
    assert any(j.status == "queued" for j in memory.jobs())
    assert memory.cancel(running.id)
    box["ex"].gate.set()
    memory.flush()
    info = memory.job(running.id)
    assert info.status == "cancelled" and "cancelled" in info.error
    assert memory.adapter_path() == before and before.joinpath(ADAPTER_WEIGHTS).read_bytes() == weights
    assert window_before <= {m.id for m in memory.window()}
    later = [j for j in memory.jobs() if j.id > running.id]
    assert later and all(j.status == "cancelled" and "earlier job" in j.error for j in later)
    assert memory.cancel(running.id) is False


def test_cancel_queued_job_through_its_handle(make_service):
    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault("ex", Controlled(inner, hold=True)))
    overflow(memory, session="a")
    assert box["ex"].started.wait(30)  # a's first job holds the worker
    overflow(memory, session="b")
    queued_b = [j for j in memory.jobs("b") if j.status == "queued"]
    assert queued_b
    handle = memory.handle(queued_b[0].id)
    assert handle.cancel()
    assert handle.result(5).status == "cancelled"
    box["ex"].gate.set()
    memory.flush()
    assert memory.job(queued_b[0].id).status == "cancelled"
    assert queued_b[0].id not in box["ex"].ran
    assert all(j.status == "done" for j in memory.jobs("a"))
    assert {m.id for m in memory.window("b")} == {m.id for m in memory.transcript("b")}


def test_failing_job_is_recorded_and_later_jobs_still_run(make_service):
    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault(
        "ex", Controlled(inner, fail={1: RuntimeError("injected")}, hold=True)))
    ids = overflow(memory, session="a")
    overflow(memory, session="b")
    # Jobs wait until every turn is in: a failure seen mid-`overflow` would let the next turn replan "a".
    box["ex"].gate.set()
    memory.flush()
    failed = memory.job(1)
    assert failed.status == "failed" and "RuntimeError: injected" in failed.error
    assert memory.adapter_path("a") is None
    assert {m.id for m in memory.window("a")} == set(ids)  # nothing absorbed, nothing lost
    assert memory.adapter_path("b") is not None  # the worker lived on
    assert all(j.status == "done" for j in memory.jobs("b"))
    memory.add_messages(turn(9), session_id="a")  # the next turn plans again, oldest first
    memory.flush()
    assert memory.adapter_path("a") is not None
    assert memory.transcript("a")[0].absorbed


def test_nan_loss_fails_the_job_and_keeps_the_previous_adapter(make_service, monkeypatch):
    memory = make_service()
    overflow(memory, turns=3)
    memory.flush()
    before = memory.adapter_path()
    weights = before.joinpath(ADAPTER_WEIGHTS).read_bytes()
    from absorber_memory import losses

    monkeypatch.setattr(losses, "hidden_sync_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    memory.add_messages(turn(5))
    memory.add_messages(turn(6))
    ended = memory.flush()
    assert ended and ended[0].status == "failed" and "nan" in ended[0].error
    assert memory.adapter_path() == before and before.joinpath(ADAPTER_WEIGHTS).read_bytes() == weights
    monkeypatch.undo()
    memory.add_messages(turn(7))
    assert {j.status for j in memory.flush()} == {"done"}


def test_job_handle_can_be_awaited(make_service):
    memory = make_service(auto_absorb=False)
    overflow(memory)

    async def wait():
        return [await h for h in memory.schedule()]

    import asyncio

    infos = asyncio.run(wait())
    assert infos and all(i.status == "done" for i in infos)


def test_jobs_run_from_a_json_payload_on_a_separate_engine(make_service, tokenizer, tmp_path):
    """The executor seam: a 'remote' worker gets only JSON and builds its own engine from a model path."""
    base_dir = tmp_path / "base"
    tiny_model(tokenizer, seed=0).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    class JsonRoundTrip:
        def __init__(self):
            self.engine = None  # built on the first job, as a worker process would
            self.payloads: list[str] = []

        def run(self, spec, on_step):
            payload = spec.model_copy(update={"model": str(base_dir)}).model_dump_json()
            self.payloads.append(payload)
            remote = JobSpec.model_validate_json(payload)
            self.engine = self.engine or build_engine(remote)
            return run_job(self.engine, remote, on_step)

        def close(self):
            pass

    box = {}
    memory = make_service(wrap=lambda inner: box.setdefault("ex", JsonRoundTrip()))
    ids = overflow(memory, turns=5)
    memory.flush()
    assert box["ex"].payloads and all("tensor" not in p.lower() for p in box["ex"].payloads)
    assert memory.adapter_path() is not None
    assert {m.id for m in memory.transcript() if m.absorbed} < set(ids)


def test_adapter_lru_keeps_at_most_its_capacity(make_service):
    memory = make_service(max_loaded_adapters=2)
    for s in ["a", "b", "c"]:
        overflow(memory, session=s)
    memory.flush()
    answers = {s: memory.generate(session_id=s) for s in ["a", "b", "c"]}
    assert len(memory.adapters.loaded()) == 2
    assert memory.adapters.stats.evictions >= 1
    started = time.perf_counter()
    assert {s: memory.generate(session_id=s) for s in ["c", "a", "b"]} == answers
    assert time.perf_counter() - started < 60
