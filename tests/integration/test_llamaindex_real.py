"""Slow: a SimpleChatEngine chat on the default model; early facts leave the prompt, are absorbed, still count."""

from __future__ import annotations

import pytest

from absorber_memory import AbsorberMemory as Core
from absorber_memory.demo import DEMO_SETTINGS, HELD_OUT_QUERIES, SYSTEM_PROMPT
from absorber_memory.metrics import session_fidelity

from ..conftest import REAL_MODEL_CACHE
from .test_langchain_real import USER_TURNS

pytestmark = pytest.mark.slow


def test_chat_engine_absorbs_early_facts_with_fidelity(absorber_home):
    from llama_index.core.chat_engine import SimpleChatEngine

    from llama_index.memory.absorber import AbsorberMemory

    absorber_home.mkdir(parents=True)
    (absorber_home / "models").symlink_to(REAL_MODEL_CACHE)
    with Core(config=dict(DEMO_SETTINGS, show_progress=False, max_new_tokens=24)) as core:
        memory = AbsorberMemory(core, session_id="marta", system=SYSTEM_PROMPT)
        engine = SimpleChatEngine.from_defaults(llm=memory.as_llm(), memory=memory)
        for text in USER_TURNS:  # 7 turns; the assistant's answers are the model's own
            engine.chat(text)
        core.flush()
        jobs = core.jobs("marta")
        assert len(jobs) >= 2 and all(j.status == "done" for j in jobs)
        absorbed = [m for m in core.transcript("marta") if m.absorbed]
        assert absorbed[0].content == USER_TURNS[0]  # the earliest facts went into the weights
        assert USER_TURNS[0] not in [m.content for m in memory.get()]
        assert len(engine.chat_history) == len(core.transcript("marta"))  # the prefix and every turn
        report = session_fidelity(core, "marta", HELD_OUT_QUERIES, max_new_tokens=24)
        print(f"gap closed {report.gap_closed:.3f} (KL absorbed {report.kl_absorbed:.4f}, "
              f"dropped {report.kl_dropped:.4f})")
        assert report.gap_closed > 0.5
