"""The store on its own: every named operation and its transaction, with no model loaded."""

from __future__ import annotations

import pytest

from absorber_memory.errors import InvalidMessageError, InvalidSessionError, StorageError
from absorber_memory.jobs import JobStatus
from absorber_memory.store import Store, check_id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def msgs(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_add_messages_creates_the_session_and_keeps_order(store):
    ids = store.add_messages("s", "alice", msgs("a", "b", "c"))
    assert ids == sorted(ids) and len(ids) == 3
    assert [m.content for m in store.messages("s")] == ["a", "b", "c"]
    assert store.session("s").user_id == "alice" and store.sessions("alice") == ["s"]


def test_system_messages_are_refused_once_the_conversation_started(store):
    store.add_messages("s", None, [{"role": "system", "content": "be brief"}])
    store.add_messages("s", None, msgs("hi"))
    with pytest.raises(InvalidMessageError, match="before the session's conversation starts"):
        store.add_messages("s", None, [{"role": "system", "content": "late"}])
    assert [m.role for m in store.messages("s")] == ["system", "user"]


def test_a_failed_batch_stores_none_of_its_messages(store):
    store.add_messages("s", None, msgs("a"), keys=["k1"])
    with pytest.raises(InvalidMessageError, match="already has a message with key 'k1'"):
        store.add_messages("s", None, msgs("b", "c"), keys=["k2", "k1"])
    assert [m.content for m in store.messages("s")] == ["a"]  # "b" rolled back with the batch


def test_another_user_cannot_claim_a_session(store):
    store.add_messages("s", "alice", msgs("a"))
    with pytest.raises(InvalidSessionError, match="belongs to another user_id"):
        store.add_messages("s", "bob", msgs("b"))
    assert len(store.messages("s")) == 1


def test_replace_prefix_swaps_only_system_messages(store):
    store.add_messages("s", None, [{"role": "system", "content": "old"}] + msgs("hi"))
    store.replace_prefix("s", [{"role": "system", "content": "new"}])
    assert sorted((m.role, m.content) for m in store.messages("s")) == [("system", "new"), ("user", "hi")]


def test_a_job_goes_queued_running_done_and_its_messages_leave_the_window(store):
    ids = store.add_messages("s", None, msgs("a", "b", "c", "d"))
    [job_id] = store.insert_jobs("s", [(ids[:2], ids[2:3])])
    job = store.job(job_id)
    assert job.status is JobStatus.QUEUED and job.context_ids == ids[:2] and job.following_ids == ids[2:3]
    job, session, version = store.claim_job(job_id)
    assert job.status is JobStatus.QUEUED and version == 1 and store.job(job_id).status is JobStatus.RUNNING
    store.commit_job(store.job(job_id), version, {"steps": 3})
    done = store.job(job_id)
    assert done.status is JobStatus.DONE and done.metrics == {"steps": 3} and done.adapter_version == 1
    assert [m.content for m in store.messages("s", window_only=True)] == ["c", "d"]
    assert store.session("s").adapter_version == 1 and store.session("s").rounds == 1


def test_versions_are_never_reused(store):
    store.add_messages("s", None, msgs("a"))
    assert [store.reserve_version("s") for _ in range(3)] == [1, 2, 3]
    with pytest.raises(StorageError, match="no longer exists"):
        store.reserve_version("gone")


def test_claiming_an_ended_job_returns_none(store):
    ids = store.add_messages("s", None, msgs("a", "b"))
    [job_id] = store.insert_jobs("s", [(ids[:1], [])])
    store.end_job(job_id, JobStatus.CANCELLED, "user asked")
    assert store.claim_job(job_id) is None and store.claim_job(999) is None
    assert store.job(job_id).error == "user asked"
    with pytest.raises(ValueError, match="failed or cancelled"):
        store.end_job(job_id, JobStatus.DONE)


def test_requeue_clears_the_start_time(store):
    ids = store.add_messages("s", None, msgs("a"))
    [job_id] = store.insert_jobs("s", [(ids, [])])
    store.claim_job(job_id)
    assert store.job(job_id).started is not None
    store.requeue_job(job_id)
    assert store.job(job_id).status is JobStatus.QUEUED and store.job(job_id).started is None


def test_reset_adapter_returns_messages_and_cancels_pending_jobs(store):
    ids = store.add_messages("s", None, msgs("a", "b", "c"))
    first, second = store.insert_jobs("s", [(ids[:1], []), (ids[1:2], [])])
    _, _, version = store.claim_job(first)
    store.commit_job(store.job(first), version, {})
    store.reset_adapter("s", cancel_pending="adapter was unusable")
    assert all(not m.absorbed for m in store.messages("s"))
    assert store.session("s").adapter_version is None and store.session("s").rounds == 0
    assert store.job(second).status is JobStatus.CANCELLED and store.job(second).error == "adapter was unusable"
    assert store.job(first).status is JobStatus.DONE


def test_delete_messages_with_and_without_adapter_reset(store):
    ids = store.add_messages("s", None, msgs("a", "b", "c"))
    [job_id] = store.insert_jobs("s", [(ids[:2], [])])
    _, _, version = store.claim_job(job_id)
    store.commit_job(store.job(job_id), version, {})
    store.delete_messages("s", [ids[2]], reset_adapter=False)
    assert [m.content for m in store.messages("s")] == ["a", "b"] and store.session("s").adapter_version == 1
    store.delete_messages("s", [ids[0]], reset_adapter=True)
    assert [(m.content, m.absorbed) for m in store.messages("s")] == [("b", False)]
    assert store.session("s").adapter_version is None


def test_delete_messages_never_touches_another_session(store):
    ids_a = store.add_messages("a", None, msgs("x"))
    store.add_messages("b", None, msgs("y"))
    store.delete_messages("b", ids_a, reset_adapter=False)  # an id of session a, named for session b
    assert len(store.messages("a")) == 1


def test_delete_session_removes_rows_and_says_whether_it_existed(store):
    ids = store.add_messages("s", None, msgs("a"))
    store.insert_jobs("s", [(ids, [])])
    assert store.delete_session("s") is True
    assert store.session("s") is None and store.messages("s") == [] and store.jobs("s") == []
    assert store.delete_session("s") is False


def test_jobs_filter_by_status_names_or_enum(store):
    ids = store.add_messages("s", None, msgs("a", "b"))
    first, second = store.insert_jobs("s", [(ids[:1], []), (ids[1:], [])])
    store.end_job(second, JobStatus.FAILED, "boom")
    assert [j.id for j in store.jobs("s", ("queued", "running"))] == [first]
    assert [j.id for j in store.jobs("s", (JobStatus.FAILED,))] == [second]


def test_one_process_per_directory(tmp_path):
    first = Store(tmp_path / "d")
    try:
        with pytest.raises(StorageError, match="in use by another process"):
            Store(tmp_path / "d")
    finally:
        first.close()
    Store(tmp_path / "d").close()  # released on close


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 1025, 5, None, "\ud800"])
def test_bad_ids_are_refused(bad):
    with pytest.raises(InvalidSessionError, match="session_id"):
        check_id(bad)
