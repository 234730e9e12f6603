"""`RayExecutor` on a local Ray cluster with the tiny model: sessions, live progress, kills, cancels, equivalence.

The cluster is started once for the module (`ray.init(num_cpus=2)`); the
tests that need no cluster run first, while Ray is not initialised.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from absorber_memory import AbsorberConfig, AbsorberError, AbsorberMemory, ConfigError
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.testing import tiny_model, tiny_tokenizer

from ..conftest import SERVICE, turn
from ..unit.test_sessions import check_invariants

ray = pytest.importorskip("ray", reason="RayExecutor tests need `pip install 'absorber-memory[ray]'`")

from absorber_memory.ray_executor import RayExecutor, pack_folder, unpack_folder  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model saved as a folder: Ray workers load their own copy by path."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- no cluster needed (these run before the module's cluster starts) -----------------------------
def test_missing_ray_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"absorber-memory\[ray\]"):
        RayExecutor()


def test_unreachable_cluster_fails_fast_with_a_clear_error():
    assert not ray.is_initialized()
    started = time.monotonic()
    with pytest.raises(AbsorberError, match="Ray is unreachable at '127.0.0.1:"):
        RayExecutor(address=f"127.0.0.1:{free_port()}", connect_timeout_s=2)
    assert time.monotonic() - started < 10
    with pytest.raises(AbsorberError, match="unreachable"):
        RayExecutor(address=f"ray://127.0.0.1:{free_port()}", connect_timeout_s=2)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"workers": 0}, "workers"), ({"retries": -1}, "retries"), ({"job_timeout_s": 0}, "job_timeout_s"),
     ({"poll_s": -1}, "poll_s")],
)
def test_bad_settings_are_refused_before_ray_starts(kwargs, field):
    with pytest.raises(AbsorberError, match=f"`{field}`"):
        RayExecutor(**kwargs)
    assert not ray.is_initialized()


def test_adapter_files_travel_as_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "b.json").write_text("{}")
    files = pack_folder(src)
    assert files == {"a.bin": b"\x00\x01", "sub/b.json": b"{}"}
    unpack_folder(files, tmp_path / "dst")
    assert pack_folder(tmp_path / "dst") == files
    with pytest.raises(AbsorberError, match="outside"):
        unpack_folder({"../evil": b"x"}, tmp_path / "dst2")
    assert not (tmp_path / "evil").exists()


# --- on a local cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def executor(cluster):
    """Two workers kept for the module (each loads the model once and keeps it)."""
    ex = RayExecutor(workers=2, cpus_per_worker=0.5, poll_s=0.05, num_threads=1)  # leaves a CPU for the example
    yield ex
    ex.close()


class Recording:
    """Wraps an executor: records every `(step, loss)` it reports, and can act at a chosen step."""

    def __init__(self, inner, at_step=None, action=None):
        self.inner, self.at_step, self.action = inner, at_step, action
        self.workers = inner.workers
        self.loads_own_model = True
        self.steps: list[tuple[int, float]] = []
        self.acted = 0

    def run(self, spec, on_step):
        def step(i, loss):
            self.steps.append((i, loss))
            if self.action is not None and self.at_step is not None and i >= self.at_step and self.acted < 9:
                self.acted += 1
                self.action(self)
            on_step(i, loss)

        return self.inner.run(spec, step)

    def close(self):
        pass  # the module's executor outlives each memory


def open_memory(model_dir, tmp_path, executor, **overrides):
    config = AbsorberConfig(**{**SERVICE, **overrides})
    return AbsorberMemory(str(model_dir), config=config, data_dir=tmp_path / "data", executor=executor)


def test_several_sessions_absorbed_through_ray_keep_every_message_once(model_dir, tmp_path, executor):
    recording = Recording(executor)
    memory = open_memory(model_dir, tmp_path, recording)
    try:
        added: dict[str, list[int]] = {f"s{k}": [] for k in range(3)}
        for i in range(4):
            for k, session in enumerate(added):
                added[session] += memory.add_messages(turn(i, who=f"Person{k}"), session_id=session)
        ended = memory.flush(timeout=600)
        assert ended and all(j.status == "done" for j in ended), [j.error for j in ended]
        assert {j.metrics["worker"] for j in ended} <= set(executor.worker_names)
        assert all(j.metrics["attempts"] == 1 for j in ended)
        for session, ids in added.items():
            check_invariants(memory, session, ids)
            assert any(m.absorbed for m in memory.transcript(session))
            assert memory.generate(max_new_tokens=4, session_id=session) is not None  # the adapter loads back
        # live progress reached the driver while jobs ran: steps in order, losses finite
        assert recording.steps and all(loss == loss for _, loss in recording.steps)
    finally:
        memory.close()


def test_ray_adapter_equals_the_local_adapter(model_dir, tmp_path, executor):
    """Same spec and seed: the adapter trained on a Ray worker is bit-identical to the local one."""
    adapters = {}
    for name, ex in [("local", None), ("ray", executor)]:
        memory = open_memory(model_dir, tmp_path / name, None if ex is None else Recording(ex), num_threads=1)
        try:
            for i in range(3):
                memory.add_messages(turn(i), session_id="s")
            assert all(j.status == "done" for j in memory.flush(timeout=600))
            adapters[name] = load_file(memory.adapter_path("s") / ADAPTER_WEIGHTS)
        finally:
            memory.close()
    assert adapters["local"].keys() == adapters["ray"].keys() and adapters["local"]
    for key, tensor in adapters["local"].items():
        assert tensor.equal(adapters["ray"][key]), key


def test_a_killed_worker_is_replaced_and_the_job_retried_once(model_dir, tmp_path, executor):
    def kill_running(rec):
        if rec.acted == 1:  # the first attempt only
            (actor,) = executor.running.values()
            ray.kill(actor)

    recording = Recording(executor, at_step=2, action=kill_running)
    memory = open_memory(model_dir, tmp_path, recording, max_steps=30)
    try:
        added = memory.add_messages(turn(0) + turn(1), session_id="s")
        first, *rest = memory.flush(timeout=600)
        assert first.status == "done" and first.metrics["attempts"] == 2, first.error
        assert all(j.status == "done" and j.metrics["attempts"] == 1 for j in rest)
        check_invariants(memory, "s", added)
        assert len(executor.actors) == 2  # the killed workers were replaced
    finally:
        memory.close()


def test_a_worker_lost_twice_fails_the_job_and_keeps_the_previous_adapter(model_dir, tmp_path, executor):
    memory = open_memory(model_dir, tmp_path, Recording(executor))
    try:
        added = memory.add_messages(turn(0) + turn(1), session_id="s")
        memory.flush(timeout=600)
        before = memory.adapter_path("s")
        assert before is not None
    finally:
        memory.close()

    def kill_running(rec):
        for actor in executor.running.values():
            ray.kill(actor)

    memory = open_memory(model_dir, tmp_path, Recording(executor, at_step=1, action=kill_running), max_steps=30)
    try:
        added += memory.add_messages(turn(2) + turn(3), session_id="s")
        ended = memory.flush(timeout=600)
        failed = [j for j in ended if j.status == "failed"]
        assert failed and "Ray worker was lost" in failed[0].error and "attempt 2" in failed[0].error
        assert memory.adapter_path("s") == before  # the previous adapter keeps serving
        check_invariants(memory, "s", added)  # the failed job's messages are still in the window
        assert memory.generate(max_new_tokens=4, session_id="s") is not None
    finally:
        memory.close()


def test_cancel_stops_the_ray_job_and_the_worker_stays_usable(model_dir, tmp_path, executor):
    started = threading.Event()
    recording = Recording(executor, at_step=1, action=lambda rec: started.set())
    memory = open_memory(model_dir, tmp_path, recording, max_steps=100_000)
    try:
        memory.add_messages(turn(0) + turn(1), session_id="s")
        job = memory.jobs("s")[0]
        handle = memory.handle(job.id)
        assert started.wait(300)
        assert memory.cancel(job.id)
        ended = handle.result(timeout=300)
        assert ended.status == "cancelled" and memory.adapter_path("s") is None
        assert len(executor.actors) == 2
    finally:
        memory.close()
    # the workers still run jobs
    memory = open_memory(model_dir, tmp_path / "after", Recording(executor))
    try:
        memory.add_messages(turn(0) + turn(1), session_id="s")
        assert {j.status for j in memory.flush(timeout=600)} == {"done"}
    finally:
        memory.close()


def test_a_job_past_its_timeout_fails_with_the_setting_named(model_dir, tmp_path, executor, monkeypatch):
    monkeypatch.setattr(executor, "job_timeout_s", 3.0)
    memory = open_memory(model_dir, tmp_path, Recording(executor), max_steps=100_000)
    try:
        added = memory.add_messages(turn(0) + turn(1), session_id="s")
        job, *rest = memory.flush(timeout=600)
        assert job.status == "failed" and "job_timeout_s" in job.error
        assert all(j.status == "cancelled" for j in rest)  # later rounds wait for this one
        check_invariants(memory, "s", added)
        assert len(executor.actors) == 2  # the stuck worker was replaced
    finally:
        memory.close()


def test_workers_ray_cannot_place_are_a_clear_error(cluster):
    with pytest.raises(AbsorberError, match="could not start 1 worker"):
        RayExecutor(workers=1, gpus_per_worker=1, start_timeout_s=3)


def test_a_loaded_model_object_is_refused_with_the_fix(tmp_path, executor):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigError, match="model name or path"):
        AbsorberMemory(
            tiny_model(tokenizer), tokenizer=tokenizer, data_dir=tmp_path / "d", executor=Recording(executor)
        )


def test_a_driver_killed_while_a_ray_job_runs_replans_on_reopen(model_dir, tmp_path):
    """SIGKILL the driver mid-job: reopening (here with the local executor) re-runs the job; nothing is lost."""
    import json
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    data_dir, ready = tmp_path / "data", tmp_path / "ready.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.kill_ray_driver", str(model_dir), str(data_dir), str(ready)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its local Ray cluster shares its process group, and dies with it
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.poll() is None, f"child ended without stalling:\n{child.stdout.read().decode()[-3000:]}"
    time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(30)
    stored = json.loads(ready.read_text())
    assert len(stored) == 12
    memory = AbsorberMemory(str(model_dir), config=AbsorberConfig(**SERVICE), data_dir=data_dir)
    try:
        assert [m.id for m in memory.transcript()] == stored
        assert memory.adapter_path().name == "v1"  # job 1 committed; job 2 never did
        ended = memory.flush(timeout=600)
        assert ended and all(j.status == "done" for j in ended)
        assert 2 in {j.id for j in memory.jobs() if j.status == "done"}  # the interrupted job ran again
        check_invariants(memory, "default", stored)
    finally:
        memory.close()


def test_the_ray_example_runs_on_the_tiny_model(tmp_path, cluster, capsys):
    import runpy
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "ray_cluster.py"
    argv = sys.argv
    sys.argv = [str(script), "--model", "tiny", "--workers", "1", "--out", str(tmp_path)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert out.count(" done: ") >= 3 and "failed" not in out
    for session in ("ana", "ben", "chloe"):
        assert (tmp_path / "exports" / session / "adapter_model.safetensors").is_file()


def test_a_closed_executor_refuses_jobs_clearly(cluster):
    from absorber_memory import JobSpec

    ex = RayExecutor(workers=1, cpus_per_worker=0.5)
    ex.close()
    assert ex.actors == []
    spec = JobSpec(job_id=1, session_id="s", model="m", config={}, prefix=[], context=[], following=[],
                   base_adapter=None, base_version=None, output="unused", version=1, round_index=0)  # fmt: skip
    with pytest.raises(AbsorberError, match="closed"):
        ex.run(spec, lambda step, loss: None)
