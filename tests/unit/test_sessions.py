"""AbsorberMemory: sessions, background absorption, isolation, restart, forgetting."""

from __future__ import annotations

import asyncio
import json

import pytest
from safetensors.torch import load_file

from absorber_memory import AbsorberMemory, InvalidMessageError, InvalidSessionError, StorageError
from absorber_memory.chat import ChatFormat
from absorber_memory.generation import generate_ids
from absorber_memory.config import lora_config
from absorber_memory.persistence import ADAPTER_WEIGHTS, load_adapter_weights
from absorber_memory.testing import tiny_model

from ..conftest import SERVICE, turn

QUESTION = [{"role": "user", "content": "What do you remember about me?"}]


def reference_answer(tokenizer, folder, messages, config) -> str:
    """Greedy answer of a fresh base model with the adapter in `folder` (None: no adapter)."""
    from peft import get_peft_model

    model = tiny_model(tokenizer, seed=0)
    if folder is not None:
        model = get_peft_model(model, lora_config(config, model), adapter_name="ref")
        load_adapter_weights(model, "ref", folder)
    ids = ChatFormat(tokenizer).encode([], messages, add_generation_prompt=True)
    return tokenizer.decode(generate_ids(model, tokenizer, ids, config.max_new_tokens), skip_special_tokens=True).strip()


def check_invariants(memory: AbsorberMemory, session_id: str, added: list[int]) -> None:
    """Every added message is stored once, either in the window or in the committed adapter."""
    stored = memory.transcript(session_id)
    assert [m.id for m in stored] == added  # none lost, none duplicated, in order
    window = {m.id for m in memory.window(session_id)}
    absorbed = {m.id for m in stored if m.absorbed}
    assert window.isdisjoint(absorbed) and window | absorbed == set(added)
    # absorption is in order: absorbed messages are exactly the oldest ones
    flags = [m.absorbed for m in stored]
    assert flags == sorted(flags, reverse=True)
    current = memory.adapter_path(session_id)
    versions = {m.absorbed_version for m in stored if m.absorbed}
    if versions:
        # the newest absorbed message came in with the last round; a consolidation after it moves on the version
        done = [j for j in memory.jobs(session_id) if j.status == "done"]
        rounds = [j for j in done if j.kind == "round"]
        assert rounds and max(versions) == rounds[-1].adapter_version
        assert current is not None and int(current.name[1:]) == done[-1].adapter_version
    prefix = memory.prefix(session_id)
    assert memory.context_messages(session_id) == prefix + [m.as_chat() for m in memory.window(session_id)]


async def test_four_sessions_interleaved_through_the_queue(make_service, tokenizer):
    memory = make_service()
    added: dict[str, list[int]] = {f"s{k}": [] for k in range(4)}

    async def talk(session: str, k: int) -> None:
        for i in range(10):
            added[session] += await memory.aadd_messages(turn(i, who=f"Person{k}"), session_id=session)
            if i % 4 == 3:
                assert await memory.agenerate(session_id=session)
            await asyncio.sleep(0)

    await asyncio.gather(*(talk(s, k) for k, s in enumerate(added)))
    ended = await memory.aflush()
    assert ended and all(j.status == "done" for j in ended)
    assert not [j for j in memory.jobs() if j.pending]
    for session, ids in added.items():
        check_invariants(memory, session, ids)
        assert memory.window_tokens(session) <= SERVICE["window_tokens"]
    folders = {s: memory.adapter_path(s) for s in added}
    weights = {s: load_file(f / ADAPTER_WEIGHTS) for s, f in folders.items()}
    keys = next(iter(weights.values())).keys()
    for a in added:
        for b in added:
            if a < b:
                assert any(not (weights[a][k] == weights[b][k]).all() for k in keys), (a, b)
    # each session answers with its own adapter, whichever was used last
    for session in ["s2", "s0", "s3", "s1", "s0"]:
        expected = reference_answer(tokenizer, folders[session], QUESTION, memory.config)
        assert memory.generate(QUESTION, session_id=session) == expected


def test_jobs_interleave_fairly_across_sessions(make_service):
    memory = make_service()
    for i in range(6):
        memory.add_messages(turn(i), session_id="a")
    for i in range(6):
        memory.add_messages(turn(i), session_id="b")
    memory.flush()
    order = [j.session_id for j in sorted(memory.jobs(), key=lambda j: j.started)]
    assert order.count("a") == order.count("b") >= 3
    # once both have work, no session runs twice in a row while the other waits
    first_b = order.index("b")
    tail = order[first_b - 1 :]
    assert all(x != y for x, y in zip(tail, tail[1:len(tail) - 1]))


def test_generation_before_any_absorption_is_the_base_model(make_service, tokenizer):
    memory = make_service(auto_absorb=False)
    memory.add_messages(turn(0))
    assert memory.adapter_path() is None
    assert memory.generate(QUESTION) == reference_answer(tokenizer, None, QUESTION, memory.config)


def test_restart_resumes_sessions_windows_and_adapters(make_service, tmp_path):
    memory = make_service()
    ids = [i for k in range(5) for i in memory.add_messages(turn(k), session_id="x", user_id="u1")]
    memory.flush()
    answer, folder = memory.generate(QUESTION, session_id="x"), memory.adapter_path("x")
    window = [m.id for m in memory.window("x")]
    memory.close()
    again = make_service()
    assert again.sessions() == ["x"] and again.sessions("u1") == ["x"]
    assert [m.id for m in again.transcript("x")] == ids
    assert [m.id for m in again.window("x")] == window
    assert again.adapter_path("x") == folder
    assert again.generate(QUESTION, session_id="x") == answer


def test_restart_reruns_jobs_that_were_still_queued(make_service):
    memory = make_service(auto_absorb=False)
    ids = [i for k in range(5) for i in memory.add_messages(turn(k))]
    memory.close()  # nothing scheduled yet
    again = make_service()  # opening with auto_absorb plans the overflow no job holds yet
    planned = again.jobs()
    assert planned and again.schedule() == []  # planned once, not twice
    again.close()  # close before the queue drains: jobs stay queued in the store
    third = make_service()
    pending = [j for j in third.jobs() if j.pending]
    assert len(third.jobs()) == len(planned) and (pending or all(j.status == "done" for j in third.jobs()))
    third.flush()
    assert all(j.status == "done" for j in third.jobs())
    check_invariants(third, "default", ids)


def test_second_open_of_a_data_directory_is_refused(make_service):
    make_service()
    with pytest.raises(StorageError, match="in use by another process"):
        make_service()


def test_another_base_model_is_refused_and_data_kept(make_service, tokenizer, tmp_path):
    memory = make_service()
    ids = memory.add_messages(turn(0))
    memory.close()
    with pytest.raises(StorageError, match="another base model"):
        AbsorberMemory(tiny_model(tokenizer, hidden_size=48), tokenizer=tokenizer, config=SERVICE,
                       data_dir=tmp_path / "data")
    assert [m.id for m in make_service().transcript()] == ids


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 1025, 7, None, b"bytes", "\udc80"])
def test_bad_session_ids_are_refused(make_service, bad):
    memory = make_service()
    with pytest.raises(InvalidSessionError, match="session_id"):
        memory.add_messages(turn(0), session_id=bad)
    assert memory.sessions() == []


def test_session_ids_never_become_paths(make_service, tmp_path):
    memory = make_service()
    for sid in ["../../escape", "/etc/passwd", "ünïcødé 会话", "a/b\\c"]:
        for k in range(4):
            memory.add_messages(turn(k), session_id=sid)
    memory.flush()
    root = (tmp_path / "data").resolve()
    for sid in memory.sessions():
        folder = memory.adapter_path(sid).resolve()
        assert folder.is_relative_to(root / "sessions")
    assert not (tmp_path / "escape").exists()


def test_user_ownership_is_checked(make_service):
    memory = make_service()
    memory.add_messages(turn(0), session_id="s", user_id="alice")
    with pytest.raises(InvalidSessionError, match="another user_id"):
        memory.add_messages(turn(1), session_id="s", user_id="bob")
    assert len(memory.transcript("s")) == 2


def test_system_message_after_start_is_refused_and_nothing_stored(make_service):
    memory = make_service()
    memory.add_messages([{"role": "system", "content": "You are kind."}, *turn(0)])
    with pytest.raises(InvalidMessageError, match="system messages"):
        memory.add_messages([*turn(1), {"role": "system", "content": "late"}])
    assert len(memory.transcript()) == 3
    assert memory.prefix() == [{"role": "system", "content": "You are kind."}]
    assert memory.context_messages()[0]["role"] == "system"


def test_context_is_capped_while_a_backlog_waits(make_service, caplog):
    memory = make_service(auto_absorb=False, context_tokens=80)
    for k in range(6):
        memory.add_messages(turn(k))
    context = memory.context_messages()
    assert 0 < len(context) < len(memory.window())
    assert context[-1]["content"] == memory.window()[-1].content
    assert "left out of the prompt" in caplog.text


def test_forget_deletes_everything_of_a_session(make_service, tmp_path):
    memory = make_service()
    for k in range(5):
        memory.add_messages(turn(k), session_id="gone", user_id="u")
        memory.add_messages(turn(k), session_id="kept", user_id="v")
    memory.flush()
    folder = memory.layout.session_dir("gone")
    assert folder.exists()
    assert memory.forget("gone") is True
    assert memory.forget("gone") is False
    assert not folder.exists() and memory.transcript("gone") == [] and memory.jobs("gone") == []
    assert memory.sessions() == ["kept"] and memory.adapter_path("kept") is not None
    memory.add_messages(turn(0), session_id="u2s", user_id="u2")
    assert memory.forget_user("v") == ["kept"]
    assert memory.sessions() == ["u2s"]


def test_forget_messages_rebuilds_the_adapter_without_them(make_service):
    memory = make_service()
    ids = [i for k in range(6) for i in memory.add_messages(turn(k))]
    memory.flush()
    old = memory.adapter_path()
    forgotten = ids[:2]
    assert all(m.absorbed for m in memory.transcript() if m.id in forgotten)
    memory.forget_messages("default", forgotten)
    assert memory.adapter_path() is None  # the old adapter held them: dropped at once
    memory.flush()
    remaining = [i for i in ids if i not in forgotten]
    check_invariants(memory, "default", remaining)
    assert memory.adapter_path() is not None and memory.adapter_path() != old
    assert not old.exists()
    with pytest.raises(InvalidMessageError, match="not messages of session"):
        memory.forget_messages("default", [99999])
    assert [m.id for m in memory.transcript()] == remaining


@pytest.mark.parametrize("bad", ["1", [1.0], None, [True]])
def test_forget_messages_refuses_ids_that_are_not_ints(make_service, bad):
    memory = make_service(auto_absorb=False)
    ids = memory.add_messages(turn(0))
    with pytest.raises(InvalidMessageError, match="message_ids"):
        memory.forget_messages("default", bad)
    assert [m.id for m in memory.transcript()] == ids


def test_job_metrics_are_recorded(make_service):
    memory = make_service()
    for k in range(4):
        memory.add_messages(turn(k))
    done = memory.flush()
    info = memory.job(done[0].id)
    assert info.status == "done" and info.adapter_version is not None
    m = info.metrics
    assert m["steps"] == SERVICE["max_steps"] and len(m["loss_curve"]) == m["steps"] + 1
    assert m["context_tokens"] > 0 and m["seconds"] > 0
    assert json.dumps(m)


def test_a_schema_v1_database_is_migrated_in_place(tmp_path, make_service):
    import sqlite3

    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "absorber.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, role TEXT NOT NULL,
                               content TEXT NOT NULL, created REAL NOT NULL, absorbed_version INTEGER);
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, user_id TEXT, created REAL NOT NULL,
                               adapter_version INTEGER, last_version INTEGER NOT NULL DEFAULT 0,
                               rounds INTEGER NOT NULL DEFAULT 0);
        INSERT INTO sessions (session_id, created) VALUES ('old', 0);
        INSERT INTO messages (session_id, role, content, created) VALUES ('old', 'user', 'kept from v1', 0);
    """)
    db.commit()
    db.close()
    memory = make_service(data_dir=data, auto_absorb=False)
    assert [(m.content, m.key) for m in memory.transcript("old")] == [("kept from v1", None)]
    memory.add_messages([{"role": "assistant", "content": "a keyed reply"}], session_id="old", keys=["k1"])
    with pytest.raises(ValueError, match="already has a message with key 'k1'"):
        memory.add_messages([{"role": "user", "content": "again"}], session_id="old", keys=["k1"])
    assert [m.key for m in memory.transcript("old")] == [None, "k1"]  # the refused add stored nothing


def test_set_prefix_replaces_the_system_messages(make_service):
    memory = make_service(auto_absorb=False)
    memory.add_messages([{"role": "system", "content": "Old."}, {"role": "user", "content": "hi"}], session_id="s")
    assert memory.set_prefix("s", "New.") and not memory.set_prefix("s", "New.")
    assert memory.context_messages("s") == [{"role": "system", "content": "New."}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="only system messages"):
        memory.set_prefix("s", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="keys"):
        memory.add_messages([{"role": "user", "content": "x"}], session_id="s", keys=["a", "b"])


def test_absorb_messages_absorbs_every_message_now(make_service):
    memory = make_service(window_tokens=2000)  # the window policy alone would absorb nothing
    rows = [r for k in range(3) for r in turn(k)]
    handles = memory.absorb_messages(rows, session_id="s")
    assert handles and all(h.session_id == "s" for h in handles)
    memory.flush("s")
    jobs = memory.jobs("s")
    assert all(j.status == "done" for j in jobs) and jobs[-1].following_ids == []  # the newest round: probes only
    assert [m.absorbed for m in memory.transcript("s")] == [True] * 6 and memory.window("s") == []
    assert sorted(i for j in jobs for i in j.message_ids) == [m.id for m in memory.transcript("s")]
