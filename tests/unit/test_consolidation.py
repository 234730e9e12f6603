"""Consolidation: one round that re-teaches an adapter everything absorbed so far, absorbing nothing new.

The frozen model reading the whole absorbed history teaches; the student
continues from the current adapter. After chained rounds (which lose round
1), it must bring round 1 back; it never absorbs, loses or repeats a
message; and the idle trigger (`consolidate_when_idle`) runs it once after a
burst of rounds, never while a session has work queued.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from absorber_memory import AbsorberConfig, ConfigError, InvalidMessageError, InvalidSessionError, fidelity
from absorber_memory.stream import leading_fit, teacher_tokens

from ..conftest import turn
from .test_history_teacher import FIRST_ROUND_QUERY, streamed
from .test_queue import Controlled
from .test_sessions import check_invariants

QUERIES = [FIRST_ROUND_QUERY, "What is my name and where was I born?"]


def lora_state(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.model.named_parameters() if "lora_" in k}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the budget helpers ------------------------------------------------------------------------
def test_leading_fit_takes_whole_messages_until_the_first_misfit():
    assert leading_fit([10, 20, 5], 30) == 2
    assert leading_fit([10, 20, 5], 35) == 3
    assert leading_fit([40, 1], 30) == 0  # never cut a message, never skip one
    assert leading_fit([], 30) == 0


def test_teacher_tokens_counts_prefix_messages_probes_and_extra():
    assert teacher_tokens(5, 100, 0, 24) == 105
    assert teacher_tokens(5, 100, 2, 24, extra=7) == 5 + 100 + 2 * (32 + 24) + 7


# --- one conversation (ParametricMemory) -------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consolidation_brings_round_one_back_after_chained_rounds(tokenizer, seed):
    plain, consolidated = streamed(tokenizer, "chained", seed), streamed(tokenizer, "chained", seed)
    assert len(plain.absorption_log) >= 4  # round 1 and at least three chained rounds after it
    report = consolidated.consolidate()
    assert report is not None and report.kind == "consolidation" and report.teacher == "history"
    p, c = fidelity(plain, QUERIES), fidelity(consolidated, QUERIES)
    assert p.kl_dropped == pytest.approx(c.kl_dropped)  # same transcript and window: only the adapter differs
    assert c.kl_absorbed < p.kl_absorbed
    assert c.gap_closed > p.gap_closed + 0.1, (c.gap_closed, p.gap_closed)


def test_consolidation_absorbs_nothing_and_reads_the_whole_history(tokenizer):
    pm = streamed(tokenizer, "history", 0, turns=4)
    transcript, window, absorbed = list(pm.transcript), list(pm.window), list(pm.absorbed_messages)
    report = pm.consolidate()
    assert (pm.transcript, pm.window, pm.absorbed_messages) == (transcript, window, absorbed)
    entry = pm.absorption_log[-1]
    assert entry["count"] == 0 and entry["report"]["kind"] == "consolidation"
    assert report.teacher_context_tokens == sum(pm.fmt.count(m) for m in absorbed) > 0
    pm.add_messages(turn(7))  # later rounds go on from where the transcript stands
    assert pm.absorption_log[-1]["report"]["kind"] == "round" and pm.absorption_log[-1]["count"] > 0
    assert [m for m in pm.transcript] == transcript + turn(7)


def test_consolidation_is_deterministic(tokenizer):
    curves = []
    for _ in range(2):
        pm = streamed(tokenizer, "chained", 0, turns=3)
        curves.append(pm.consolidate().loss_curve)
    assert curves[0] == curves[1]


@pytest.mark.parametrize("cut", [None, 2])
def test_consolidation_steps_caps_the_consolidation_only(tokenizer, cut):
    pm = streamed(tokenizer, "history", 0, turns=3)
    pm.config.consolidation_steps = cut
    before = lora_state(pm)
    report = pm.consolidate()
    assert report.steps == (pm.config.max_steps if cut is None else cut) and report.stopped_by == "max_steps"
    assert not same_weights(before, lora_state(pm))  # even a short consolidation trains
    pm.add_messages(turn(5))
    assert pm.absorption_log[-1]["report"]["kind"] == "round"
    assert pm.absorption_log[-1]["report"]["steps"] == pm.config.max_steps  # rounds keep their budget


def test_a_service_consolidation_runs_consolidation_steps(make_service):
    memory = make_service(consolidate_when_idle=None, consolidation_steps=2)
    added_turns(memory, "s", range(5))
    memory.flush()
    rounds = memory.jobs("s")
    assert rounds and {j.metrics["steps"] for j in rounds} == {memory.config.max_steps} != {2}
    info = memory.consolidate("s").result(timeout=60)
    assert info.kind == "consolidation" and info.metrics["steps"] == 2


def test_consolidation_steps_is_validated():
    for bad in (0, -3, "few", 100_001):
        with pytest.raises(ConfigError, match="consolidation_steps"):
            AbsorberConfig(consolidation_steps=bad)
    assert AbsorberConfig().consolidation_steps is None


def test_a_step_budget_below_one_is_refused(tokenizer):
    pm = streamed(tokenizer, "history", 0, turns=1)
    with pytest.raises(ValueError, match="max_steps"):
        pm.engine.absorber.train([], [turn(0)[0]], [turn(1)], max_steps=0)


def test_nothing_absorbed_means_nothing_to_consolidate(make_memory):
    pm = make_memory(window_tokens=500, absorb_tokens=30, sync_tokens=30)
    pm.add_messages(turn(0))
    before = lora_state(pm)
    assert pm.consolidate() is None
    assert same_weights(before, lora_state(pm)) and pm.absorption_log == []


def refused_untouched(pm, error: type[Exception], match: str) -> None:
    """`pm.consolidate()` raises `error` and changes neither the adapter nor the log."""
    before, log = lora_state(pm), pm.absorption_log
    with pytest.raises(error, match=match):
        pm.consolidate()
    assert same_weights(before, lora_state(pm)) and pm.absorption_log == log


def test_text_absorbed_outside_the_transcript_is_not_consolidated_away(make_memory):
    pm = make_memory(window_tokens=60, absorb_tokens=30, sync_tokens=30)
    pm.absorb(turn(9))
    for k in range(3):
        pm.add_messages(turn(k))
    refused_untouched(pm, InvalidMessageError, "absorb")


def test_a_history_too_long_for_the_context_is_refused_untouched(make_memory):
    pm = make_memory(
        window_tokens=60, absorb_tokens=30, sync_tokens=30, streaming_teacher="chained", context_tokens=240
    )
    for k in range(8):
        pm.add_messages(turn(k))
    refused_untouched(pm, ConfigError, "do not fit")


# --- many sessions (AbsorberMemory) ------------------------------------------------------------
def added_turns(memory, session: str, turns: range) -> list[int]:
    return [i for k in turns for i in memory.add_messages(turn(k), session_id=session)]


def absorbed_once(memory, session: str, *, rebuilt: bool = False) -> None:
    """Each absorbed message came in with the round that committed its version; consolidations absorb none.

    Without a rebuild (`forget_messages` of an absorbed message) no two rounds absorbed the same message.
    """
    jobs = [j for j in memory.jobs(session) if j.status == "done"]
    assert all(j.message_ids == [] and j.following_ids == [] for j in jobs if j.kind == "consolidation")
    by_version = {j.adapter_version: j for j in jobs}
    for m in memory.transcript(session):
        if m.absorbed:
            job = by_version[m.absorbed_version]
            assert job.kind == "round" and m.id in job.message_ids
    if not rebuilt:
        ids = [i for j in jobs for i in j.message_ids]
        assert len(ids) == len(set(ids))
        assert {m.id for m in memory.transcript(session) if m.absorbed} == set(ids)


def test_service_consolidation_commits_a_new_version_and_absorbs_nothing(make_service):
    memory = make_service()
    ids = added_turns(memory, "s", range(5))
    memory.flush()
    before = [(m.id, m.absorbed_version) for m in memory.transcript("s")]
    window, version = [m.id for m in memory.window("s")], memory.adapter_path("s")
    handle = memory.consolidate("s")
    info = handle.result(timeout=60)
    assert info.status == "done" and info.kind == "consolidation" and info.message_ids == []
    assert info.metrics["kind"] == "consolidation" and info.metrics["teacher"] == "history"
    assert [(m.id, m.absorbed_version) for m in memory.transcript("s")] == before
    assert [m.id for m in memory.window("s")] == window
    assert memory.adapter_path("s") != version and not version.exists()  # the old version is replaced
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")
    ids += added_turns(memory, "s", range(5, 8))  # rounds after a consolidation continue from it
    memory.flush()
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")
    assert memory.jobs("s")[-1].kind == "round"


def test_service_consolidation_bad_input(make_service):
    memory = make_service(window_tokens=500)
    with pytest.raises(InvalidSessionError, match="unknown session 'nobody'"):
        memory.consolidate("nobody")
    with pytest.raises(InvalidSessionError):
        memory.consolidate("../x")
    memory.add_messages(turn(0), session_id="s")
    assert memory.consolidate("s") is None  # nothing absorbed yet
    assert memory.jobs("s") == []


def test_service_refuses_a_history_too_long_and_keeps_everything(make_service):
    memory = make_service(context_tokens=240, streaming_teacher="chained")
    ids = added_turns(memory, "s", range(8))
    memory.flush()
    jobs, folder = memory.jobs("s"), memory.adapter_path("s")
    with pytest.raises(ConfigError, match="cannot consolidate session 's'"):
        memory.consolidate("s")
    assert memory.jobs("s") == jobs and memory.adapter_path("s") == folder
    check_invariants(memory, "s", ids)


def held(make_service, **overrides):
    """A service whose jobs wait at a gate (`gate.set()` lets them run), and that gate."""
    gates: list[Controlled] = []

    def wrap(inner):
        gates.append(Controlled(inner, hold=True))
        return gates[-1]

    memory = make_service(wrap=wrap, **overrides)
    return memory, gates[0].gate


def absorbed_then_held(memory, gate, session: str, turns: range) -> list[int]:
    """Add `turns` and let their rounds commit; later jobs wait at the gate again."""
    ids = added_turns(memory, session, turns)
    gate.set()
    memory.flush()
    gate.clear()
    return ids


def test_a_queued_consolidation_is_reused(make_service):
    memory, gate = held(make_service)
    ids = added_turns(memory, "s", range(4))
    assert memory.consolidate("s") is None  # nothing committed yet: the rounds wait at the gate
    gate.set()
    memory.flush()
    gate.clear()
    ids += added_turns(memory, "s", range(4, 6))  # a round runs and waits at the gate
    a, b = memory.consolidate("s"), memory.consolidate("s")
    assert a is not None and b is not None and a.id == b.id
    gate.set()
    memory.flush()
    assert [j.kind for j in memory.jobs("s")].count("consolidation") == 1
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_idle_consolidation_runs_once_after_a_burst_of_rounds(make_service):
    memory, gate = held(make_service, consolidate_when_idle=0)
    ids = added_turns(memory, "s", range(6))  # every round queued while the first waits
    gate.set()
    memory.flush()
    kinds = [j.kind for j in memory.jobs("s")]
    assert kinds.count("round") >= 3 and kinds[-1] == "consolidation" and kinds.count("consolidation") == 1
    assert all(j.status == "done" for j in memory.jobs("s"))
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")
    gate.clear()
    ids += added_turns(memory, "s", range(6, 9))  # the next burst ends with its own consolidation
    gate.set()
    memory.flush()
    kinds = [j.kind for j in memory.jobs("s")]
    assert kinds[-1] == "consolidation" and kinds.count("consolidation") == 2
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_idle_consolidation_waits_for_the_idle_time(make_service):
    memory = make_service(consolidate_when_idle=2.0)
    ids = added_turns(memory, "s", range(4))
    memory.flush()
    assert "consolidation" not in [j.kind for j in memory.jobs("s")]  # 2 s have not passed
    deadline = time.monotonic() + 30
    while "consolidation" not in [j.kind for j in memory.jobs("s")] and time.monotonic() < deadline:
        time.sleep(0.1)
    memory.flush()
    assert [j.kind for j in memory.jobs("s")].count("consolidation") == 1
    check_invariants(memory, "s", ids)


def test_closing_stops_idle_timers_and_nothing_is_queued(make_service):
    memory = make_service(consolidate_when_idle=1.0)
    ids = added_turns(memory, "s", range(4))
    memory.flush()
    memory.close()
    time.sleep(1.5)
    again = make_service()
    assert "consolidation" not in [j.kind for j in again.jobs("s")]
    check_invariants(again, "s", ids)


def test_a_pending_consolidation_resumes_after_a_restart(make_service):
    memory, gate = held(make_service)
    ids = absorbed_then_held(memory, gate, "s", range(4))
    other = added_turns(memory, "o", range(4))  # the one worker is busy with session o's round
    handle = memory.consolidate("s")
    assert handle is not None and handle.info().status == "queued"
    closing = threading.Thread(target=memory.close)
    closing.start()
    while not memory.queue.closed:
        time.sleep(0.01)
    gate.set()
    closing.join(60)
    assert not closing.is_alive()
    again = make_service()
    again.flush()
    jobs = again.jobs("s")
    assert jobs[-1].kind == "consolidation" and jobs[-1].status == "done"
    check_invariants(again, "s", ids)
    check_invariants(again, "o", other)
    absorbed_once(again, "s")


def test_forgetting_an_absorbed_message_cancels_a_queued_consolidation(make_service):
    memory, gate = held(make_service)
    ids = absorbed_then_held(memory, gate, "s", range(5))
    ids += added_turns(memory, "s", range(5, 6))  # a round runs and waits at the gate
    handle = memory.consolidate("s")
    forgotten = [m.id for m in memory.transcript("s") if m.absorbed][:2]
    forgetting = threading.Thread(target=memory.forget_messages, args=("s", forgotten))
    forgetting.start()
    assert handle.result(timeout=30).status == "cancelled"  # queued: cancelled at once
    gate.set()
    forgetting.join(60)
    memory.flush()
    check_invariants(memory, "s", [i for i in ids if i not in forgotten])
    absorbed_once(memory, "s", rebuilt=True)


def test_the_setting_is_validated():
    with pytest.raises(ConfigError, match="consolidate_when_idle"):
        AbsorberConfig(consolidate_when_idle=-1)
    with pytest.raises(ConfigError, match="consolidate_when_idle"):
        AbsorberConfig(consolidate_when_idle="soon")
    assert AbsorberConfig().consolidate_when_idle == 0  # by default, once a burst of rounds is done


# --- what a consolidation's sync text starts with (`consolidation_sync`) ----------------------
def test_consolidation_following_takes_the_whole_window_or_its_head():
    from absorber_memory.stream import consolidation_following

    sizes = {"a": 10, "b": 20, "c": 5}
    window = [{"role": "user", "content": k} for k in sizes]

    def count(m):
        return sizes[m["content"]]

    assert consolidation_following(window, count, "window", 25) == window
    assert consolidation_following(window, count, "head", 25) == window[:1]
    assert consolidation_following([], count, "window", 25) == []
    with pytest.raises(ValueError, match="consolidation_sync"):
        consolidation_following(window, count, "tail", 25)


@pytest.mark.parametrize("mode", ["window", "head"])
def test_parametric_consolidation_syncs_on_the_window_it_is_told_to(tokenizer, monkeypatch, mode):
    pm = streamed(tokenizer, "history", 0, turns=4)
    pm.config.consolidation_sync = mode  # a setting read when consolidating; the adapter stays
    seen = []
    real = pm.engine.consolidate

    def spy(prefix, history, following=None, **kw):
        seen.append(list(following or []))
        return real(prefix, history, following, **kw)

    monkeypatch.setattr(pm.engine, "consolidate", spy)
    window = list(pm.window)
    head = window[: leading_fit([pm.fmt.count(m) for m in window], pm.config.sync_tokens)]
    assert len(head) < len(window)  # the case tells the two apart
    pm.consolidate()
    assert seen == [window if mode == "window" else head]


class Recording:
    """Wraps an executor and records each job's spec."""

    def __init__(self, inner) -> None:
        self.inner, self.specs = inner, []

    def run(self, spec, on_step):
        self.specs.append(spec)
        return self.inner.run(spec, on_step)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("mode", ["window", "head"])
def test_service_consolidation_syncs_on_the_window_it_is_told_to(make_service, mode):
    recorder: list[Recording] = []
    memory = make_service(wrap=lambda inner: recorder.append(Recording(inner)) or recorder[0], consolidation_sync=mode)
    ids = added_turns(memory, "s", range(5))
    memory.flush()
    window = [m.as_chat() for m in memory.window("s")]
    head = window[: leading_fit([memory.fmt.count(m) for m in window], memory.config.sync_tokens)]
    assert len(head) < len(window)
    memory.consolidate("s").result(timeout=60)
    (spec,) = [s for s in recorder[0].specs if s.consolidation]
    assert spec.following == (window if mode == "window" else head)
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_consolidation_sync_is_validated():
    with pytest.raises(ConfigError, match="consolidation_sync"):
        AbsorberConfig(consolidation_sync="tail")
    assert AbsorberConfig().consolidation_sync == "window"


# --- consolidating again as the window grows (`reconsolidate_tokens`) -------------------------
SHORT = {"role": "user", "content": "Nice weather today, right?"}


def consolidations(memory, session: str) -> int:
    return sum(j.kind == "consolidation" for j in memory.jobs(session))


@pytest.mark.parametrize("grow", [True, False])
def test_a_grown_window_is_consolidated_again(make_service, tokenizer, grow):
    from absorber_memory.chat import ChatFormat

    short = ChatFormat(tokenizer).count(SHORT)
    memory = make_service(
        window_tokens=400,
        absorb_tokens=70,
        sync_tokens=70,
        consolidate_when_idle=0,
        reconsolidate_tokens=2 * short if grow else None,
    )
    ids = added_turns(memory, "s", range(6))
    memory.flush()
    assert memory.jobs("s")[-1].kind == "consolidation"  # the burst's own consolidation
    rounds, before = len(memory.jobs("s")) - consolidations(memory, "s"), consolidations(memory, "s")
    for k, grown in enumerate([0, 1, 1]):  # growth since the last teaching: 1, 2 (consolidate), then 1 again
        ids += memory.add_messages([SHORT], session_id="s")
        memory.flush()
        assert consolidations(memory, "s") == before + (grown if grow else 0), k
    assert len(memory.jobs("s")) - consolidations(memory, "s") == rounds  # the window never overflowed
    assert all(j.status == "done" for j in memory.jobs("s"))
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_reconsolidate_tokens_is_validated():
    with pytest.raises(ConfigError, match="reconsolidate_tokens"):
        AbsorberConfig(reconsolidate_tokens=0)
    with pytest.raises(ConfigError, match="reconsolidate_tokens"):
        AbsorberConfig(reconsolidate_tokens="lots")
    assert AbsorberConfig().reconsolidate_tokens is None
