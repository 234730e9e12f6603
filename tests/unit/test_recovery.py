"""Reopening after a crash, on the store and the session layout alone (fake adapter folders, no model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from absorber_memory.errors import StorageError
from absorber_memory.jobs import JobStatus
from absorber_memory.layout import JOB_MARKER, SessionLayout
from absorber_memory.persistence import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from absorber_memory.recovery import check_base_model, readable_adapter, recover_sessions
from absorber_memory.store import Store


@pytest.fixture
def parts(tmp_path):
    store = Store(tmp_path)
    yield store, SessionLayout(tmp_path)
    store.close()


def fake_adapter(folder, marker=None):
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    save_file({"w": torch.zeros(2, 2)}, folder / ADAPTER_WEIGHTS)
    if marker is not None:
        (folder / JOB_MARKER).write_text(json.dumps(marker))
    return folder


def committed_session(store, layout, sid="s"):
    """A session whose first job committed v1; a second job queued on the rest."""
    ids = store.add_messages(sid, None, [{"role": "user", "content": f"m{i}"} for i in range(4)])
    first, second = store.insert_jobs(sid, [(ids[:1], []), (ids[1:2], [])])
    _, _, version = store.claim_job(first)
    fake_adapter(layout.adapter_dir(sid, version))
    store.commit_job(store.job(first), version, {})
    return ids, second


def test_a_healthy_session_is_left_alone(parts):
    store, layout = parts
    ids, second = committed_session(store, layout)
    recover_sessions(store, layout)
    assert store.session("s").adapter_version == 1 and layout.versions("s").keys() == {1}
    assert store.job(second).status is JobStatus.QUEUED


def test_running_job_goes_back_to_queued_and_half_written_folders_go(parts):
    store, layout = parts
    _, second = committed_session(store, layout)
    store.claim_job(second)  # reserves v2, marks running; then the process died
    (layout.adapters_dir("s") / ".v2.saving").mkdir()
    recover_sessions(store, layout)
    assert store.job(second).status is JobStatus.QUEUED
    assert sorted(p.name for p in layout.adapters_dir("s").iterdir()) == ["v1"]


def test_finished_but_uncommitted_adapter_is_adopted(parts):
    store, layout = parts
    ids, second = committed_session(store, layout)
    _, _, version = store.claim_job(second)
    fake_adapter(layout.adapter_dir("s", version),
                 marker={"job_id": second, "base_version": 1, "report": {"steps": 7}})
    recover_sessions(store, layout)
    assert store.session("s").adapter_version == version
    assert store.job(second).status is JobStatus.DONE and store.job(second).metrics == {"steps": 7}
    assert [m.absorbed for m in store.messages("s")] == [True, True, False, False]
    assert layout.versions("s").keys() == {version}  # the previous version folder is gone


def test_a_stray_version_whose_marker_does_not_match_is_deleted(parts):
    store, layout = parts
    _, second = committed_session(store, layout)
    fake_adapter(layout.adapter_dir("s", 5), marker={"job_id": second, "base_version": 3})
    recover_sessions(store, layout)
    assert store.session("s").adapter_version == 1 and layout.versions("s").keys() == {1}
    assert store.job(second).status is JobStatus.QUEUED


@pytest.mark.parametrize("damage", ["missing", "corrupt weights", "bad config"])
def test_an_unusable_committed_adapter_returns_its_messages(parts, damage):
    store, layout = parts
    _, second = committed_session(store, layout)
    folder = layout.adapter_dir("s", 1)
    if damage == "missing":
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    elif damage == "corrupt weights":
        (folder / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    else:
        (folder / ADAPTER_CONFIG).write_text("[]")
    recover_sessions(store, layout)
    assert store.session("s").adapter_version is None
    assert all(not m.absorbed for m in store.messages("s")) and len(store.messages("s")) == 4
    assert store.job(second).status is JobStatus.CANCELLED and "unusable" in store.job(second).error
    assert not layout.adapters_dir("s").exists()


def test_folders_of_forgotten_sessions_are_deleted(parts):
    store, layout = parts
    committed_session(store, layout, "kept")
    stray = layout.session_dir("forgotten")
    fake_adapter(stray / "adapters" / "v1")
    recover_sessions(store, layout)
    assert not stray.exists() and layout.session_dir("kept").exists()


def test_readable_adapter_names_the_problem(tmp_path):
    folder = fake_adapter(tmp_path / "v1")
    assert readable_adapter(folder) is None
    save_file({}, folder / ADAPTER_WEIGHTS)
    assert "holds no tensors" in readable_adapter(folder)


def test_a_directory_remembers_its_base_model(parts):
    store, _ = parts
    ident = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
             "vocab_size": 400, "name": "tiny"}
    check_base_model(store, ident)
    check_base_model(store, {**ident, "name": "renamed"})  # the name may differ
    with pytest.raises(StorageError, match="another base model"):
        check_base_model(store, {**ident, "hidden_size": 48})
