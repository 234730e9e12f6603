"""Recited sync text (`sync_recitation`): the absorbed user turns, quoted, where the teacher's predictions carry C."""

from __future__ import annotations

import pytest

from absorber_memory import AbsorberConfig, ConfigError
from absorber_memory.metrics import answer_logprobs, kl_sum
from absorber_memory.probes import RECITE_PROMPT, recitation_segments

from ..conftest import chat, turn
from .test_sessions import check_invariants

CONTEXT = chat("My name is Ana and I live in Lisbon.", "Nice to meet you!") + chat("My dog is Bruno.", "Cute!")
LEAD = chat("How is the weather?", "Sunny.")


def quote(text: str) -> list[dict]:
    return [{"role": "user", "content": RECITE_PROMPT}, {"role": "assistant", "content": f'You told me: "{text}"'}]


def test_segments_quote_each_user_turn_in_order():
    assert recitation_segments(CONTEXT, "off", LEAD) == []
    assert recitation_segments(CONTEXT, "each", LEAD) == [
        quote("My name is Ana and I live in Lisbon."),
        quote("My dog is Bruno."),
    ]
    assert recitation_segments(CONTEXT, "after", LEAD) == [
        LEAD + quote("My name is Ana and I live in Lisbon.") + quote("My dog is Bruno.")
    ]
    assert recitation_segments(CONTEXT, "after") == [quote("My name is Ana and I live in Lisbon.") + quote("My dog is Bruno.")]
    assert recitation_segments(CONTEXT[1:2], "after", LEAD) == []  # no user turn: nothing to recite
    with pytest.raises(ValueError, match="recitation mode must be"):
        recitation_segments(CONTEXT, "sometimes")
    with pytest.raises(ConfigError, match="sync_recitation"):
        AbsorberConfig(sync_recitation="sometimes")


def test_recitations_reach_training_and_teach_the_quoted_turns(make_memory):
    def recital_kl(pm) -> float:
        """KL(teacher reading C || adapted student) along the recitation of the first user turn."""
        answer = pm.tokenizer.encode('You told me: "My name is Ana and I live in Lisbon."', add_special_tokens=False)
        ask = [{"role": "user", "content": RECITE_PROMPT}]
        with pm.adapter_disabled():
            teacher = answer_logprobs(pm.model, pm.fmt.encode([], CONTEXT + ask, add_generation_prompt=True), answer)
        student = answer_logprobs(pm.model, pm.fmt.encode([], ask, add_generation_prompt=True), answer)
        return kl_sum(teacher, student)

    off, each = make_memory(max_steps=20), make_memory(max_steps=20, sync_recitation="each")
    reports = off.absorb(CONTEXT), each.absorb(CONTEXT)
    assert reports[1].sync_tokens > reports[0].sync_tokens  # the quotes were trained on
    assert recital_kl(each) < 0.8 * recital_kl(off)


def test_streaming_with_recitation_loses_and_repeats_nothing(make_service):
    memory = make_service(sync_recitation="after")
    added = []
    for k in range(5):
        added += memory.add_messages(turn(k), session_id="s")
    memory.flush()
    assert memory.jobs("s") and all(j.status == "done" for j in memory.jobs("s"))
    check_invariants(memory, "s", added)


def test_recited_turns_count_when_deciding_whether_the_history_fits(tokenizer):
    from absorber_memory import ParametricMemory
    from absorber_memory.testing import tiny_model

    from .test_history_teacher import STREAM

    def kinds(mode: str) -> list[str]:
        config = AbsorberConfig(**{**STREAM, "context_tokens": 240, "sync_recitation": mode})
        pm = ParametricMemory(tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=config)
        for k in range(8):
            pm.add_messages(turn(k))
        return [e["report"]["teacher"] for e in pm.absorption_log]

    off, after = kinds("off"), kinds("after")
    assert len(off) == len(after) and "history" in off
    assert after.index("chained") < off.index("chained"), (off, after)  # quotes take room: fallback comes sooner
