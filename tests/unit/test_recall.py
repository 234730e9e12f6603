"""`recall`: what the weights alone hold, as text, beside the base model's answers."""

from __future__ import annotations

import asyncio

import pytest

from absorber_memory import RECALL_QUESTIONS, InvalidMessageError

from ..conftest import turn


def test_session_recall_differs_from_the_base_model_after_absorption(make_service):
    memory = make_service(max_steps=8)
    before = memory.recall("s")  # nothing absorbed: the adapted model is the base model
    assert [r.question for r in before] == list(RECALL_QUESTIONS)
    assert all(r.absorbed == r.base for r in before)
    added = []
    for k in range(4):
        added += memory.add_messages(turn(k), session_id="s")
    memory.flush("s")
    assert any(m.absorbed for m in memory.transcript("s"))
    after = memory.recall("s", ["What do you know about me?"])
    assert len(after) == 1 and after[0].base == before[0].base
    assert after[0].absorbed != after[0].base  # the adapter changed what the model says with no conversation
    assert after[0].to_dict() == {"question": "What do you know about me?", "absorbed": after[0].absorbed,
                                  "base": after[0].base}
    assert asyncio.run(memory.arecall("s", ["What do you know about me?"])) == after
    assert [m.id for m in memory.transcript("s")] == added  # recall stores nothing


def test_parametric_recall_and_bad_questions(make_memory, make_service):
    pm = make_memory(max_steps=10)
    pm.absorb(turn(0))
    (row,) = pm.recall(["Who am I?"])
    assert row.absorbed != row.base
    memory = make_service()
    for bad, match in [("Who am I?", "non-empty list of strings"), ([], "non-empty list"),
                       ([""], "empty or whitespace"), ([3], "got int")]:
        with pytest.raises(InvalidMessageError, match=match):
            memory.recall("s", bad)


def test_both_integrations_expose_recall(make_service):
    from langchain_absorber import AbsorberChatMessageHistory
    from llama_index.memory.absorber import AbsorberMemory as LlamaMemory

    memory = make_service()
    for k in range(4):
        memory.add_messages(turn(k), session_id="s")
    memory.flush("s")
    expected = memory.recall("s", ["Who am I?"])
    assert AbsorberChatMessageHistory(memory, "s").recall(["Who am I?"]) == expected
    assert LlamaMemory(memory, session_id="s").recall(["Who am I?"]) == expected
