"""ParametricMemory: Algorithm 2 bookkeeping, generation, persistence."""

import json

import pytest
import torch

from absorber_memory import ConfigError, InvalidMessageError, ParametricMemory, StorageError
from absorber_memory.persistence import ADAPTER_WEIGHTS

from ..conftest import chat

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = chat(*[f"Turn {i}: my favourite number is {i * 7} and I like Paris." for i in range(12)])


def _streamed(make_memory, **overrides):
    pm = make_memory(window_tokens=80, absorb_tokens=30, sync_tokens=40, **overrides)
    reports = pm.add_messages([SYSTEM])
    for turn in TURNS:
        reports += pm.add_message(turn["role"], turn["content"])
    return pm, reports


def test_window_bookkeeping_loses_and_duplicates_nothing(make_memory):
    pm, reports = _streamed(make_memory)
    assert reports and len(pm.absorption_log) == len(reports)
    assert pm.absorbed_messages + pm.window == TURNS  # every message exactly once, in order
    assert pm.window_tokens() <= 80
    assert pm.prefix == [SYSTEM] and pm.context_messages() == [SYSTEM] + pm.window
    firsts = [e["first"] for e in pm.absorption_log]
    counts = [e["count"] for e in pm.absorption_log]
    assert firsts == [sum(counts[:i]) for i in range(len(counts))]  # consecutive, oldest first
    assert sum(counts) == len(pm.absorbed_messages)


def test_absorption_uses_following_turns_and_probes(make_memory):
    pm, reports = _streamed(make_memory)
    assert all(r.probes == 2 for r in reports)
    # With following turns, the probes are asked after them in one chained segment.
    chained = [r for r in reports if r.sync_segments == 1]
    assert chained and all(r.sync_tokens > 40 for r in chained)  # more than sync_tokens of turns alone


def test_auto_absorb_off_keeps_everything_in_the_window(make_memory):
    pm, reports = _streamed(make_memory, auto_absorb=False)
    assert reports == [] and pm.window == TURNS
    assert pm.absorb_overflow() and pm.absorbed_messages + pm.window == TURNS


def test_late_system_message_is_refused_without_changing_state(make_memory):
    pm = make_memory()
    pm.add_messages(TURNS[:2])
    with pytest.raises(InvalidMessageError, match="system messages must come before"):
        pm.add_messages([SYSTEM])
    with pytest.raises(InvalidMessageError, match=r"`messages\[1\].content` is empty"):
        pm.add_messages([TURNS[2], {"role": "user", "content": " "}])
    assert pm.transcript == TURNS[:2] and pm.prefix == []


def test_absorb_argument_errors(make_memory):
    pm = make_memory()
    with pytest.raises(InvalidMessageError, match="only system messages"):
        pm.absorb([SYSTEM])
    with pytest.raises(InvalidMessageError, match="`sync` is an empty list"):
        pm.absorb(TURNS[:2], [])
    with pytest.raises(InvalidMessageError, match=r"`sync\[0\]` must not contain system"):
        pm.absorb(TURNS[:2], [[SYSTEM, TURNS[0]]])
    assert pm.absorption_log == []


def test_generate_uses_the_adapter(make_memory):
    pm = make_memory()
    pm.add_messages([SYSTEM] + TURNS[:1])
    ids = torch.tensor([pm.fmt.encode(pm.prefix, pm.window, add_generation_prompt=True)])
    with pm.adapter_disabled():
        base = pm.model(ids).logits
    assert torch.equal(pm.model(ids).logits, base)  # fresh adapter: B = 0
    pm.absorb(TURNS[1:4])
    assert not torch.allclose(pm.model(ids).logits, base)
    with pm.adapter_disabled():
        assert torch.equal(pm.model(ids).logits, base)
    assert isinstance(pm.generate(), str)
    assert isinstance(pm.generate([{"role": "user", "content": "hi"}], max_new_tokens=3), str)


def test_loaded_model_needs_a_tokenizer(model):
    with pytest.raises(ConfigError, match="`tokenizer` is required"):
        ParametricMemory(model)


def test_save_load_round_trip_gives_identical_logits(make_memory, tokenizer, tmp_path):
    from absorber_memory.testing import tiny_model

    pm, _ = _streamed(make_memory)
    path = pm.save(tmp_path / "mem")
    assert (path / "adapter" / ADAPTER_WEIGHTS).is_file() and (path / "adapter" / "adapter_config.json").is_file()
    loaded = ParametricMemory.load(path, tiny_model(tokenizer), tokenizer=tokenizer)
    ids = torch.tensor([pm.fmt.encode(pm.prefix, pm.window, add_generation_prompt=True)])
    assert torch.equal(loaded.model(ids).logits, pm.model(ids).logits)
    assert loaded.transcript == pm.transcript and loaded.window == pm.window and loaded.prefix == pm.prefix
    assert loaded.absorption_log == pm.absorption_log and loaded.config == pm.config


def test_saved_adapter_loads_with_plain_peft(make_memory, tokenizer, tmp_path):
    from peft import PeftModel

    from absorber_memory.testing import tiny_model

    pm = make_memory()
    pm.absorb(TURNS[:4])
    pm.save(tmp_path / "mem")
    peft_model = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "mem" / "adapter").eval()
    ids = torch.tensor([pm.fmt.encode([], TURNS[4:6])])
    assert torch.allclose(peft_model(ids).logits, pm.model(ids).logits, atol=1e-6)


def test_save_replaces_atomically_and_recovers_an_interrupted_swap(make_memory, tokenizer, tmp_path):
    from absorber_memory.testing import tiny_model

    pm = make_memory()
    pm.add_messages(TURNS[:2])
    path = pm.save(tmp_path / "mem")
    pm.add_messages(TURNS[2:4])
    pm.save(path)
    assert json.loads((path / "memory.json").read_text())["transcript"] == TURNS[:4]
    # Simulate a crash between the two renames of a save: only .mem.previous exists.
    path.rename(tmp_path / ".mem.previous")
    (tmp_path / ".mem.saving").mkdir()
    loaded = ParametricMemory.load(path, tiny_model(tokenizer), tokenizer=tokenizer)
    assert loaded.transcript == TURNS[:4]
    assert not (tmp_path / ".mem.saving").exists() and not (tmp_path / ".mem.previous").exists()


def test_failed_save_keeps_the_previous_copy(make_memory, tmp_path, monkeypatch):
    import absorber_memory.memory as memory_module

    pm = make_memory()
    pm.add_messages(TURNS[:2])
    path = pm.save(tmp_path / "mem")
    pm.add_messages(TURNS[2:4])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory_module, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pm.save(path)
    assert json.loads((path / "memory.json").read_text())["transcript"] == TURNS[:2]
    assert not (tmp_path / ".mem.saving").exists()


def test_load_refuses_another_base_model(make_memory, tokenizer, tmp_path):
    from absorber_memory.testing import tiny_model

    make_memory().save(tmp_path / "mem")
    with pytest.raises(StorageError, match="saved for another base model"):
        ParametricMemory.load(tmp_path / "mem", tiny_model(tokenizer, hidden_size=64), tokenizer=tokenizer)


def test_load_refuses_corrupt_files(make_memory, tokenizer, tmp_path):
    from absorber_memory.testing import tiny_model

    path = make_memory().save(tmp_path / "mem")
    (path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(StorageError, match="is corrupt"):
        ParametricMemory.load(path, tiny_model(tokenizer), tokenizer=tokenizer)
    (path / "memory.json").write_text("{broken")
    with pytest.raises(StorageError, match="memory.json is unreadable or corrupt"):
        ParametricMemory.load(path, tiny_model(tokenizer), tokenizer=tokenizer)
    with pytest.raises(StorageError, match="is missing"):
        ParametricMemory.load(tmp_path / "nowhere", tiny_model(tokenizer), tokenizer=tokenizer)
