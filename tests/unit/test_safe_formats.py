"""Safe formats: nothing from the data directory is unpickled, and paths stay inside it."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from absorber_memory import ParametricMemory, StorageError
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.layout import inside, session_key
from absorber_memory.testing import tiny_model

from ..conftest import FAST, turn

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(r"torch\.load\(|\bimport pickle\b|\bpickle\.|weights_only\s*=\s*False|trust_remote_code\s*=\s*True"
                       r"|\bmarshal\.loads|\bshelve\b|\byaml\.load\(")


def test_no_unsafe_deserialization_in_the_library():
    sources = sorted((ROOT / "absorber_memory").rglob("*.py")) + sorted((ROOT / "integrations").rglob("*.py"))
    assert len(sources) > 30
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert hits == []


class _Trap:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_a_pickled_adapter_planted_in_a_saved_memory_is_never_loaded(tokenizer, tmp_path):
    memory = ParametricMemory(tiny_model(tokenizer), tokenizer=tokenizer, config=FAST)
    memory.add_messages(turn(0))
    saved = memory.save(tmp_path / "saved")
    marker = tmp_path / "marker"
    adapter = saved / "adapter"
    (adapter / ADAPTER_WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))  # what PEFT would fall back to
    with pytest.raises(StorageError, match="missing"):
        ParametricMemory.load(saved, tiny_model(tokenizer), tokenizer=tokenizer)
    assert not marker.exists()


def test_a_pickled_adapter_planted_in_a_session_is_never_loaded(make_service, tmp_path):
    memory = make_service()
    for k in range(3):
        memory.add_messages(turn(k))
    memory.flush()
    folder = memory.adapter_path()
    marker = tmp_path / "marker"
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    memory.adapters.evict(session_key("default"))
    with pytest.raises(StorageError, match="missing"):
        memory.generate()
    assert not marker.exists()


@pytest.mark.parametrize("parts", [("..", "x"), ("sessions", "..", "..", "etc"), ("/etc",), ("",)])
def test_paths_outside_the_data_directory_are_refused(tmp_path, parts):
    with pytest.raises(StorageError, match="not inside the data directory"):
        inside(tmp_path, *parts)


def test_hostile_session_ids_stay_inside(make_service, tmp_path):
    memory = make_service()
    for sid in ["../../escape", "/etc/passwd", "a/b/../../c", "..", "C:\\Windows", "ünïcødé 会话 🎉"]:
        memory.add_messages(turn(0), session_id=sid)
        folder = memory.layout.session_dir(sid)
        assert folder.parent == memory.data_dir / "sessions" and re.fullmatch(r"[0-9a-f]{32}", folder.name)
        assert memory.transcript(sid)[0].content == turn(0)[0]["content"]
