"""The history teacher: later streaming rounds taught by the frozen model reading every absorbed message.

Against the chained teacher (the current adapter reading only the new chunk),
what round 1 absorbed must still show after the later rounds; when the
history no longer fits the context the rounds fall back to the chained
teacher; and no message is lost or absorbed twice either way.
"""

from __future__ import annotations

import pytest

from absorber_memory import AbsorberConfig, ParametricMemory, fidelity, session_fidelity

from ..conftest import FAST, turn
from .test_sessions import check_invariants

STREAM = dict(FAST, window_tokens=60, absorb_tokens=30, sync_tokens=30)
#: Asks about what the first round absorbed ("number 0" appears only in the first turn).
FIRST_ROUND_QUERY = "Tell me about number 0."


def streamed(tokenizer, teacher: str, seed: int, turns: int = 5) -> ParametricMemory:
    from absorber_memory.testing import tiny_model

    config = AbsorberConfig(**STREAM, streaming_teacher=teacher, seed=seed)
    pm = ParametricMemory(tiny_model(tokenizer, seed=seed), tokenizer=tokenizer, config=config)
    for k in range(turns):
        pm.add_messages(turn(k))
    return pm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_one_survives_later_rounds_better_than_with_the_chained_teacher(tokenizer, seed):
    history, chained = streamed(tokenizer, "history", seed), streamed(tokenizer, "chained", seed)
    assert len(history.absorption_log) >= 4  # round 1 and at least three more
    assert [e["report"]["teacher"] for e in history.absorption_log][:2] == ["frozen", "history"]
    assert {e["report"]["teacher"] for e in chained.absorption_log[1:]} == {"chained"}
    h = fidelity(history, [FIRST_ROUND_QUERY, "What is my name and where was I born?"])
    c = fidelity(chained, [FIRST_ROUND_QUERY, "What is my name and where was I born?"])
    assert h.kl_dropped == pytest.approx(c.kl_dropped)  # same transcript, same split: only the teacher differs
    assert h.kl_absorbed < c.kl_absorbed
    assert h.gap_closed > c.gap_closed + 0.2, (h.gap_closed, c.gap_closed)


def test_history_teacher_is_deterministic(tokenizer):
    a, b = streamed(tokenizer, "history", 0, turns=3), streamed(tokenizer, "history", 0, turns=3)
    curves = [[e["report"]["loss_curve"] for e in pm.absorption_log] for pm in (a, b)]
    assert curves[0] == curves[1]


def test_history_teacher_reads_more_than_the_chunk(tokenizer):
    pm = streamed(tokenizer, "history", 0, turns=4)
    reports = [e["report"] for e in pm.absorption_log]
    assert reports[0]["teacher_context_tokens"] == reports[0]["context_tokens"]
    later = reports[-1]
    assert later["teacher"] == "history" and later["teacher_context_tokens"] > later["context_tokens"]


def test_rounds_fall_back_to_the_chained_teacher_when_the_history_does_not_fit(tokenizer):
    from absorber_memory.testing import tiny_model

    config = AbsorberConfig(**STREAM, context_tokens=240)
    pm = ParametricMemory(tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=config)
    for k in range(8):
        pm.add_messages(turn(k))
    kinds = [e["report"]["teacher"] for e in pm.absorption_log]
    assert kinds[0] == "frozen" and "history" in kinds and kinds[-1] == "chained", kinds
    first_chained = kinds.index("chained")
    assert set(kinds[first_chained:]) == {"chained"}  # once the history outgrows the context, it stays chained


def test_an_explicit_absorb_keeps_later_rounds_chained(tokenizer, make_memory):
    pm = make_memory(**STREAM)
    pm.absorb(turn(9))  # text the transcript does not hold: a history teacher would not know it
    for k in range(4):
        pm.add_messages(turn(k))
    assert {e["report"]["teacher"] for e in pm.absorption_log[1:]} == {"chained"}


@pytest.mark.parametrize("teacher", ["history", "chained"])
def test_service_rounds_use_the_configured_teacher_and_lose_nothing(make_service, teacher):
    memory = make_service(streaming_teacher=teacher)
    added: list[int] = []
    for k in range(6):
        added += memory.add_messages(turn(k), session_id="s")
    memory.flush()
    check_invariants(memory, "s", added)
    jobs = memory.jobs("s")
    assert len(jobs) >= 3 and all(j.status == "done" for j in jobs)
    kinds = [j.metrics["teacher"] for j in jobs]
    assert kinds[0] == "frozen" and set(kinds[1:]) == {teacher}
    absorbed_ids = [i for j in jobs for i in j.message_ids]
    assert len(absorbed_ids) == len(set(absorbed_ids))  # never absorbed twice


def test_service_history_teacher_beats_chained_on_the_first_round(make_service, tmp_path):
    results = {}
    for teacher in ("history", "chained"):
        memory = make_service(data_dir=tmp_path / teacher, streaming_teacher=teacher)
        for k in range(6):
            memory.add_messages(turn(k), session_id="s")
        memory.flush()
        results[teacher] = session_fidelity(memory, "s", [FIRST_ROUND_QUERY])
    assert results["history"].kl_absorbed < results["chained"].kl_absorbed


def test_the_setting_is_validated():
    with pytest.raises(ValueError, match="streaming_teacher"):
        AbsorberConfig(streaming_teacher="oracle")
