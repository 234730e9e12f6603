"""`absorb_when="idle"`: the overflow waits in the prompt and is absorbed in one round once the session is idle.

The one round takes exactly the turns the rounds would have taken had the
messages come one at a time, so the same window is left behind; its sync text
is that whole window (or its oldest turns, `consolidation_sync="head"`), so no
consolidation follows it. It runs after
`idle_seconds` without a new message, on `flush`, or at once when the window
no longer fits the prompt; a restart plans waiting overflow again. No message
is ever lost or absorbed twice.
"""

from __future__ import annotations

import random
import time

import pytest

from absorber_memory import LONG_SESSION_RECIPE, AbsorberConfig, ConfigError
from absorber_memory.stream import plan_absorption, replayed_overflow

from ..conftest import turn
from .test_consolidation import absorbed_once, added_turns
from .test_sessions import check_invariants

IDLE = dict(absorb_when="idle", idle_seconds=3600.0)  # only `flush` (or a full prompt) absorbs


def one_at_a_time(counts: list[int], roles: list[str], window_tokens: int, absorb_tokens: int) -> int:
    """What the rounds absorb when each message is planned as it comes (the coordinator's overflow loop)."""
    absorbed = 0
    for end in range(1, len(counts) + 1):
        while True:
            plan = plan_absorption(
                counts[absorbed:end],
                roles[absorbed:end],
                window_tokens=window_tokens,
                absorb_tokens=absorb_tokens,
                sync_tokens=10,
            )
            if plan is None:
                break
            absorbed += plan.absorb
    return absorbed


@pytest.mark.parametrize("seed", range(20))
def test_replayed_overflow_takes_what_the_rounds_would_have_taken(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    counts = [rng.randint(1, 60) for _ in range(n)]
    roles = [rng.choice(["user", "assistant", "tool"]) for _ in range(n)]
    window, absorb = rng.randint(20, 200), rng.randint(5, 20)
    got = replayed_overflow(counts, roles, window_tokens=window, absorb_tokens=absorb)
    assert got == one_at_a_time(counts, roles, window, absorb)
    assert 0 <= got < n or n == 0
    if got:  # what is left fits the window, unless only the newest turn is left
        assert sum(counts[got:]) <= window or all(r == "tool" for r in roles[got + 1 :])


def test_replayed_overflow_differs_from_one_plan_over_the_whole_window():
    # When the second message came, the first (10 tokens, under absorb_tokens) was all a round could take
    # (the newest turn stays), and the 30 tokens left fit the window. Planned over all three at once, the
    # first chunk would take two messages and leave only the third: not the window the rounds leave.
    counts, roles = [10, 25, 5], ["user", "assistant", "user"]
    assert replayed_overflow(counts, roles, window_tokens=30, absorb_tokens=15) == 1
    plan = plan_absorption(counts, roles, window_tokens=30, absorb_tokens=15, sync_tokens=0)
    assert plan is not None and plan.absorb == 2


def test_absorb_when_and_idle_seconds_are_validated():
    assert AbsorberConfig().absorb_when == "overflow"  # Algorithm 2 as in the paper stays the default
    for bad in ("later", "", None, 3):
        with pytest.raises(ConfigError, match="absorb_when"):
            AbsorberConfig(absorb_when=bad)
    for bad in (-1, "soon", 86_401, float("nan")):
        with pytest.raises(ConfigError, match="idle_seconds"):
            AbsorberConfig(absorb_when="idle", idle_seconds=bad)


# --- many sessions (AbsorberMemory) ------------------------------------------------------------
def test_overflow_waits_in_the_prompt_until_flush(make_service):
    memory = make_service(**IDLE)
    ids = added_turns(memory, "s", range(6))
    time.sleep(0.2)
    assert memory.jobs("s") == [] and [m.id for m in memory.window("s")] == ids  # nothing absorbed yet
    check_invariants(memory, "s", ids)
    memory.flush("s")
    jobs = memory.jobs("s")
    assert [j.kind for j in jobs] == ["round"] and jobs[0].status == "done"
    window = [m.id for m in memory.window("s")]
    assert jobs[0].message_ids + jobs[0].following_ids == ids  # C, then the whole window as S
    assert jobs[0].following_ids == window and window
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_a_head_synced_idle_round_trains_on_the_window_s_oldest_turns_only(make_service):
    memory = make_service(consolidation_sync="head", window_tokens=120, sync_tokens=40, **IDLE)
    ids = added_turns(memory, "s", range(8))
    memory.flush("s")
    [job] = memory.jobs("s")
    window = [m.id for m in memory.window("s")]
    budget = memory.config.sync_tokens
    counts = [memory.fmt.count(m.as_chat()) for m in memory.window("s")]
    head = window[: next((k for k in range(len(counts) + 1) if sum(counts[: k + 1]) > budget or k == len(counts)))]
    assert job.following_ids == head and 0 < len(head) < len(window)  # not the whole window, as "window" syncs
    assert [m.id for m in memory.window("s")] == window  # the same window is left either way
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_one_round_leaves_the_window_the_rounds_would_have_left(make_service, tmp_path):
    rounds = make_service(data_dir=tmp_path / "rounds", consolidate_when_idle=None)
    idle = make_service(data_dir=tmp_path / "idle", **IDLE)
    for memory in (rounds, idle):
        for k in range(7):
            for message in turn(k):
                memory.add_messages([message], session_id="s")  # one at a time, as a chat adds them
        memory.flush()
    assert len(rounds.jobs("s")) >= 3 and len(idle.jobs("s")) == 1
    assert [m.as_chat() for m in idle.window("s")] == [m.as_chat() for m in rounds.window("s")]
    absorbed = [m.id for m in idle.transcript("s") if m.absorbed]
    assert idle.jobs("s")[0].message_ids == absorbed


def test_no_consolidation_follows_a_deferred_round(make_service):
    memory = make_service(consolidate_when_idle=0, **IDLE)  # the library's consolidation default
    ids = added_turns(memory, "s", range(6))
    memory.flush()
    assert [j.kind for j in memory.jobs("s")] == ["round"]  # its sync text was the whole window already
    ids += added_turns(memory, "s", range(6, 10))  # the next idle round continues from the adapter
    memory.flush()
    jobs = memory.jobs("s")
    assert [j.kind for j in jobs] == ["round", "round"] and jobs[1].metrics["teacher"] == "history"
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_the_idle_timer_absorbs_and_a_new_message_restarts_it(make_service):
    memory = make_service(absorb_when="idle", idle_seconds=1.5)
    ids = added_turns(memory, "s", range(5))
    for k in range(5, 8):  # keep talking: each message restarts the timer
        time.sleep(0.5)
        ids += added_turns(memory, "s", range(k, k + 1))
        assert memory.jobs("s") == []
    deadline = time.monotonic() + 30
    while not memory.jobs("s") and time.monotonic() < deadline:
        time.sleep(0.05)
    memory.flush()
    jobs = memory.jobs("s")
    assert [j.kind for j in jobs] == ["round"] and jobs[0].status == "done"
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_a_window_too_long_for_the_prompt_is_absorbed_at_once(make_service):
    memory = make_service(context_tokens=200, **IDLE)
    ids = added_turns(memory, "s", range(12))  # far more than 200 tokens of turns
    jobs = memory.jobs("s")
    assert jobs and all(j.kind == "round" for j in jobs)  # queued without waiting for idle or flush
    memory.flush()
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_a_full_prompt_queues_no_second_round_while_the_first_will_make_room(make_service):
    """While a forced round runs, new messages queue another only if its window would still not fit."""
    from .test_queue import Controlled

    box = {}
    memory = make_service(context_tokens=200, wrap=lambda inner: box.setdefault("ex", Controlled(inner, hold=True)), **IDLE)
    ids, k = [], 0
    while not memory.jobs("s"):  # talk until the window no longer fits the prompt
        ids += added_turns(memory, "s", range(k, k + 1))
        k += 1
    assert box["ex"].started.wait(30)
    free = memory.window("s")[len(memory.jobs("s")[0].message_ids) :]  # what the running round leaves
    assert sum(memory.fmt.count(m.as_chat()) for m in free) + 2 * 40 < 200  # room for the turns below
    ids += added_turns(memory, "s", range(k, k + 1))  # the window still holds the round's turns: over 200
    assert len(memory.jobs("s")) == 1  # once the round commits, what is left fits: nothing more to queue
    box["ex"].gate.set()
    memory.flush()
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


def test_waiting_overflow_is_absorbed_after_a_restart(make_service):
    memory = make_service(**IDLE)
    ids = added_turns(memory, "s", range(6))
    memory.close()  # closes with the overflow waiting: nothing queued, nothing lost
    again = make_service(**IDLE)
    check_invariants(again, "s", ids)
    assert again.jobs("s") == []
    again.flush()
    assert [j.kind for j in again.jobs("s")] == ["round"]
    check_invariants(again, "s", ids)
    absorbed_once(again, "s")


def test_forgetting_a_session_stops_its_timer(make_service):
    memory = make_service(absorb_when="idle", idle_seconds=0.3)
    added_turns(memory, "s", range(6))
    other = added_turns(memory, "o", range(2))
    assert memory.forget("s")
    time.sleep(0.6)
    memory.flush()
    assert memory.jobs("s") == [] and memory.sessions() == ["o"]
    check_invariants(memory, "o", other)


def test_overflow_mode_is_unchanged(make_service):
    memory = make_service(consolidate_when_idle=None)
    ids = added_turns(memory, "s", range(6))
    assert memory.jobs("s")  # queued as the window overflowed, before any flush
    memory.flush()
    assert len(memory.jobs("s")) >= 2
    check_invariants(memory, "s", ids)
    absorbed_once(memory, "s")


# --- one conversation (ParametricMemory) -------------------------------------------------------
def test_parametric_memory_absorbs_the_overflow_in_one_round_when_asked(make_memory):
    budgets = dict(window_tokens=60, absorb_tokens=30, sync_tokens=30)
    rounds, idle = make_memory(**budgets), make_memory(absorb_when="idle", **budgets)
    for k in range(6):
        for message in turn(k):
            rounds.add_messages([message])
            assert idle.add_messages([message]) == []  # nothing absorbed while the conversation goes on
    assert idle.absorbed_messages == [] and idle.window == idle.transcript
    reports = idle.absorb_overflow()
    assert len(reports) == 1 and len(rounds.absorption_log) >= 3
    assert idle.window == rounds.window and idle.absorbed_messages == rounds.absorbed_messages
    entry = idle.absorption_log[0]
    assert entry["first"] == 0 and entry["count"] == len(idle.absorbed_messages)
    sync_messages = sum(idle.fmt.count(m) for m in idle.window)
    assert reports[0].sync_tokens > sync_messages  # the whole window, then the probes and recitation
    assert idle.absorb_overflow() == []  # nothing left over the window: nothing more to absorb


def test_parametric_memory_idle_round_honours_consolidation_sync(make_memory):
    budgets = dict(
        window_tokens=120, absorb_tokens=30, sync_tokens=40, absorb_when="idle", probe_count=1, sync_recitation="off"
    )
    whole, head = make_memory(**budgets), make_memory(consolidation_sync="head", **budgets)
    for memory in (whole, head):
        for k in range(8):
            memory.add_messages(turn(k))
    [w], [h] = whole.absorb_overflow(), head.absorb_overflow()
    assert whole.window == head.window and whole.absorbed_messages == head.absorbed_messages
    counts = [head.fmt.count(m) for m in head.window]
    assert counts[0] <= 40 < sum(counts)  # the head is the first turn; the window is longer
    assert w.sync_tokens - h.sync_tokens >= sum(counts[1:]) - 8  # what the head leaves out (give or take the probe)


def test_the_long_session_recipe_absorbs_once_idle_with_short_answers_decoded_together(make_memory):
    config = AbsorberConfig(**LONG_SESSION_RECIPE)
    assert (config.absorb_when, config.probe_answers, config.train_window) == ("idle", "independent", False)
    assert config.window_grad_every == 3 and config.losses == {"l1": 1.0} and config.sync_recitation == "off"
    memory = make_memory(**LONG_SESSION_RECIPE, window_tokens=60, absorb_tokens=30, sync_tokens=30)
    asked: list[tuple[int, int]] = []  # (questions, answer tokens) per call of the teacher
    generate_all = memory.engine.generate_all

    def recording(prefix, conversations, max_new_tokens, **kwargs):
        asked.append((len(conversations), max_new_tokens))
        return generate_all(prefix, conversations, max_new_tokens, **kwargs)

    memory.engine.generate_all = recording
    for k in range(6):
        assert memory.add_messages(turn(k)) == []  # nothing absorbed while the conversation goes on
    [report] = memory.absorb_overflow()
    assert asked == [(memory.config.probe_count, 20)]  # every probe answered in one call, 20 tokens at most
    assert report.steps == 20 and memory.absorbed_messages and memory.absorb_overflow() == []
