"""Slow: a create_agent chat on the default model; early facts evicted, absorbed, and still shaping answers."""

from __future__ import annotations

import pytest

from absorber_memory import AbsorberMemory
from absorber_memory.demo import DEMO_SETTINGS, FOLLOW_UP, HELD_OUT_QUERIES, PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.metrics import session_fidelity

from ..conftest import REAL_MODEL_CACHE

pytestmark = pytest.mark.slow

USER_TURNS = [m["content"] for m in PERSONA_CHAT + FOLLOW_UP if m["role"] == "user"] + [
    "Can you recommend a good book for a long train ride?"
]


def test_agent_absorbs_early_facts_with_fidelity(absorber_home):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    from langchain_absorber import AbsorptionMiddleware, ChatAbsorber

    absorber_home.mkdir(parents=True)
    (absorber_home / "models").symlink_to(REAL_MODEL_CACHE)
    config = dict(DEMO_SETTINGS, show_progress=False, max_new_tokens=24)
    with AbsorberMemory(config=config) as memory:
        agent = create_agent(model=ChatAbsorber(memory=memory), system_prompt=SYSTEM_PROMPT,
                             middleware=[AbsorptionMiddleware(memory)], checkpointer=InMemorySaver())
        thread = {"configurable": {"thread_id": "marta"}}
        for text in USER_TURNS:  # 7 turns; the assistant's answers are the model's own
            state = agent.invoke({"messages": [{"role": "user", "content": text}]}, thread)
        memory.flush()
        jobs = memory.jobs("marta")
        assert len(jobs) >= 2 and all(j.status == "done" for j in jobs)
        absorbed = [m for m in memory.transcript("marta") if m.absorbed]
        assert absorbed[0].content == USER_TURNS[0]  # the earliest facts went into the weights
        assert memory.prefix("marta") == [{"role": "system", "content": SYSTEM_PROMPT}]
        assert len(state["messages"]) < len(memory.transcript("marta"))
        report = session_fidelity(memory, "marta", HELD_OUT_QUERIES, max_new_tokens=24)
        print(f"gap closed {report.gap_closed:.3f} (KL absorbed {report.kl_absorbed:.4f}, "
              f"dropped {report.kl_dropped:.4f})")
        assert report.gap_closed > 0.5
