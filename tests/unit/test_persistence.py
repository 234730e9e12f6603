"""Durable files without a model: atomic directory writes, crash leftovers, JSON, the session layout."""

from __future__ import annotations

import pytest

from absorber_memory.errors import StorageError
from absorber_memory.layout import SessionLayout, inside, session_key
from absorber_memory.persistence import atomic_write_dir, read_json, recover_dir, write_json


def write_files(**files: str):
    def write(tmp):
        for name, text in files.items():
            (tmp / name).write_text(text)

    return write


def test_atomic_write_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "adapter"
    atomic_write_dir(target, write_files(a="1", b="2"))
    atomic_write_dir(target, write_files(a="3"))
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no leftovers


def test_a_failed_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "adapter"
    atomic_write_dir(target, write_files(a="old"))

    def broken(tmp):
        (tmp / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, broken)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_recover_dir_puts_back_a_folder_a_crash_left_as_previous(tmp_path):
    target = tmp_path / "adapter"
    previous, saving = tmp_path / ".adapter.previous", tmp_path / ".adapter.saving"
    previous.mkdir()
    (previous / "a").write_text("complete")
    saving.mkdir()  # the new one never finished
    recover_dir(target)
    assert (target / "a").read_text() == "complete" and not previous.exists() and not saving.exists()


def test_json_round_trip_and_clear_errors(tmp_path):
    write_json(tmp_path / "x.json", {"k": "é"})
    assert read_json(tmp_path / "x.json") == {"k": "é"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StorageError, match="corrupt"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(StorageError, match="missing"):
        read_json(tmp_path / "nope.json")


def test_layout_names_folders_by_hash_and_stays_inside(tmp_path):
    layout = SessionLayout(tmp_path)
    folder = layout.adapter_dir("../../etc", 3)
    assert folder.parent.parent.name == session_key("../../etc") and folder.name == "v3"
    assert str(folder).startswith(str(tmp_path))
    with pytest.raises(StorageError, match="not inside the data directory"):
        inside(tmp_path, "..", "x")


def test_layout_versions_skips_and_deletes_partial_folders(tmp_path):
    layout = SessionLayout(tmp_path)
    adapters = layout.adapters_dir("s")
    for name in ("v1", "v12", ".v13.saving", "notes"):
        (adapters / name).mkdir(parents=True)
    assert sorted(layout.versions("s")) == [1, 12]
    assert sorted(p.name for p in adapters.iterdir()) == ["notes", "v1", "v12"]
    layout.remove_version("s", 1)
    layout.remove_adapters("s")
    assert not adapters.exists() and layout.session_dir("s").exists()
    layout.remove_strays(["other"])
    assert not layout.session_dir("s").exists()
