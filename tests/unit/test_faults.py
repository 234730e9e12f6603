"""Injected faults: exploding gradients, a full disk during a save, corrupt adapters, two processes.

Every test ends by checking that no message was lost (each stored message is
either in the window or in the committed adapter, in order) and that the
memory keeps working afterwards. The random-SIGKILL tests are in
`test_kill.py`, concurrency isolation in `test_isolation.py`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from absorber_memory import SkippedContentWarning, StorageError, losses, persistence
from absorber_memory.persistence import ADAPTER_WEIGHTS

from ..conftest import turn
from .test_sessions import check_invariants

ROOT = Path(__file__).resolve().parents[2]


def talk(memory, turns: range, session: str = "default") -> list[int]:
    return [i for k in turns for i in memory.add_messages(turn(k), session_id=session)]


class _Explode(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_exploding_gradients_roll_back_and_fail_the_job(make_service, monkeypatch, max_grad_norm):
    memory = make_service(max_grad_norm=max_grad_norm)
    added = talk(memory, range(3))
    memory.flush()
    before = memory.adapter_path()
    weights = before.joinpath(ADAPTER_WEIGHTS).read_bytes()
    real = losses.hidden_sync_loss
    monkeypatch.setattr(losses, "hidden_sync_loss", lambda *a, **k: _Explode.apply(real(*a, **k)))
    added += talk(memory, range(5, 7))
    ended = memory.flush()
    assert ended and ended[0].status == "failed" and "exploding gradients" in ended[0].error
    assert memory.adapter_path() == before and before.joinpath(ADAPTER_WEIGHTS).read_bytes() == weights
    check_invariants(memory, "default", added)
    monkeypatch.undo()
    added += talk(memory, range(7, 8))  # the next turn plans again and succeeds
    assert {j.status for j in memory.flush()} == {"done"}
    check_invariants(memory, "default", added)


def test_disk_full_during_an_adapter_save_keeps_the_previous_adapter(make_service, monkeypatch):
    memory = make_service()
    added = talk(memory, range(3), "a")
    memory.flush()
    before = memory.adapter_path("a")
    weights = before.joinpath(ADAPTER_WEIGHTS).read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(persistence, "save_file", full_disk)
    added += talk(memory, range(3, 5), "a")
    ended = memory.flush()
    assert ended and all(j.status in ("failed", "cancelled") for j in ended)
    assert "No space left on device" in ended[0].error
    assert memory.adapter_path("a") == before and before.joinpath(ADAPTER_WEIGHTS).read_bytes() == weights
    assert [p.name for p in before.parent.iterdir()] == [before.name]  # the torn `.vN.saving` is gone
    check_invariants(memory, "a", added)
    memory.generate(session_id="a")  # the previous adapter still serves
    monkeypatch.undo()
    other = talk(memory, range(3), "b")  # the worker lived on
    added += talk(memory, range(5, 6), "a")
    assert {j.status for j in memory.flush()} == {"done"}
    check_invariants(memory, "a", added)
    check_invariants(memory, "b", other)


def test_a_corrupt_adapter_found_on_open_is_rebuilt_from_the_messages(make_service, tmp_path):
    data = tmp_path / "data"
    memory = make_service(data_dir=data)
    added = talk(memory, range(4))
    memory.flush()
    folder = memory.adapter_path()
    absorbed = [m.id for m in memory.transcript() if m.absorbed]
    assert absorbed
    memory.close()
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:300])  # torn by a bad disk or a careless copy
    reopened = make_service(data_dir=data)
    assert [m.id for m in reopened.transcript()] == added  # every message kept
    assert not folder.exists()
    reopened.flush()  # re-absorbed from the oldest message
    assert set(absorbed) <= {m.id for m in reopened.transcript() if m.absorbed}
    check_invariants(reopened, "default", added)
    reopened.generate()


def test_other_control_characters_are_kept_exactly(make_service):
    memory = make_service()
    text = "tab\there, bell\a, escape \x1b[31mred\x1b[0m, form\x0cfeed, del\x7f, \u200b zero-width, emoji \U0001F600"
    memory.add_messages([{"role": "user", "content": text}])
    assert memory.transcript()[0].content == text


def test_multimodal_content_keeps_the_text_and_warns_about_the_rest(make_service):
    memory = make_service()
    content = [{"type": "text", "text": "What is in "}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
               "this picture?", {"type": "input_audio", "input_audio": {"data": "..."}}]
    with pytest.warns(SkippedContentWarning, match=r"2 non-text content part\(s\) \['image_url', 'input_audio'\]"):
        memory.add_messages([{"role": "user", "content": content}])
    assert memory.transcript()[0].content == "What is in this picture?"


HOLDER = """
import sys, time
from absorber_memory import AbsorberConfig, AbsorberMemory
from absorber_memory.testing import tiny_model_and_tokenizer
from tests.conftest import SERVICE
model, tok = tiny_model_and_tokenizer()
memory = AbsorberMemory(model, tokenizer=tok, config=AbsorberConfig(**SERVICE), data_dir=sys.argv[1])
memory.add_messages([{"role": "user", "content": sys.argv[2]}], session_id=sys.argv[2])
print("READY", flush=True)
time.sleep(float(sys.argv[3]))
memory.close()
print("CLOSED", flush=True)
"""


def _spawn(data: Path, name: str, hold: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(data), name, str(hold)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_on_one_data_directory_never_share_it(make_service, tmp_path):
    data = tmp_path / "data"
    # Two processes start at once: exactly one gets the directory, the other a clear error.
    racers = [_spawn(data, f"p{k}", 1.0) for k in range(2)]
    outputs = [r.communicate(timeout=120) for r in racers]
    won = [k for k, (out, _) in enumerate(outputs) if "CLOSED" in out]
    lost = [k for k, (_, err) in enumerate(outputs) if "StorageError" in err and "in use by another process" in err]
    assert len(won) == 1 and len(lost) == 1, outputs
    # While a process holds it, this one is refused (naming the pid) and writes nothing.
    holder = _spawn(data, "holder", 30)
    assert holder.stdout.readline().strip() == "READY"
    db = (data / "absorber.db").read_bytes()
    with pytest.raises(StorageError, match=rf"in use by another process \(pid {holder.pid}\)"):
        make_service(data_dir=data)
    assert (data / "absorber.db").read_bytes() == db
    holder.kill()  # SIGKILL: the OS drops the lock with the process
    holder.wait(30)
    memory = make_service(data_dir=data)
    assert sorted(memory.sessions()) == sorted([f"p{won[0]}", "holder"])
    assert memory.transcript("holder")[0].content == "holder"
