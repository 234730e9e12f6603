"""AbsorptionMiddleware on create_agent: bounded prompts, intact tool pairs, per-thread absorption."""

from __future__ import annotations

import time

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from absorber_memory import AbsorberError
from langchain_absorber import AbsorptionMiddleware, ChatAbsorber

from ..scripted import Scripted
from ..unit.test_queue import Controlled

CAP = 700  # `context_tokens`: the hard cap on any prompt, pending absorption included
CALL = '<tool_call>{"name": "lookup", "arguments": {"topic": "weather %d"}}</tool_call>'


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    return f"Result for {topic}: sunny."


def script(turns: int) -> list[str]:
    """Even turns call the tool first, then answer; odd turns answer at once."""
    answers: list[str] = []
    for i in range(turns):
        if i % 2 == 0:
            answers.append(CALL % i)
        answers.append(f"Noted, answer number {i}.")
    return answers


def build(make_service, monkeypatch, turns: int, wrap=None, cap: int = CAP):
    memory = make_service(wrap=wrap, window_tokens=160, absorb_tokens=60, sync_tokens=40, context_tokens=cap)
    scripted = Scripted(memory, script(turns) * 2)  # two threads share the script
    monkeypatch.setattr(memory, "stream", scripted)
    agent = create_agent(model=ChatAbsorber(memory=memory, max_tokens=4), tools=[lookup],
                         system_prompt="You are terse.", middleware=[AbsorptionMiddleware(memory)],
                         checkpointer=InMemorySaver())
    return memory, scripted, agent


def question(thread: str, i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"In thread {thread}, my lucky number is {i}. Remember it."}]}


def check_run(memory, scripted, states: dict[str, dict], last_round: float) -> None:
    fmt = memory.fmt
    for thread, state in states.items():
        msgs = state["messages"]
        # Tool pairs intact in the state: every ToolMessage answers an AI call still there.
        calls = {c["id"] for m in msgs if isinstance(m, AIMessage) for c in m.tool_calls}
        assert all(m.tool_call_id in calls for m in msgs if isinstance(m, ToolMessage))
        transcript = memory.transcript(thread)
        absorbed = [m for m in transcript if m.absorbed]
        assert absorbed, f"thread {thread}: nothing absorbed"
        assert f"thread {thread}," in absorbed[0].content  # its own turns, nobody else's
        assert all(f"thread {t}," not in m.content for t in states if t != thread for m in transcript)
        # Absorbed turns leave the state at the next model step; only those absorbed since the
        # last round started may still be there.
        recent = {i for j in memory.jobs(thread, "done") if j.finished > last_round for i in j.message_ids}
        stale = {m.id for m in msgs} & {m.key for m in absorbed if m.id not in recent}
        assert not stale
        assert memory.adapter_path(thread) is not None
    for _, prompt in scripted.prompts:
        system, convo = prompt[0], prompt[1:]
        assert system["role"] == "system" and system["content"].startswith("You are terse.")
        assert len(fmt.encode([system], convo, add_generation_prompt=True)) <= CAP
        for i, m in enumerate(convo):  # a tool result always follows the call (or another result)
            if m["role"] == "tool":
                assert i > 0 and (convo[i - 1]["role"] == "tool" or "<tool_call>" in convo[i - 1]["content"])


def run_sync(agent, memory, threads, turns):
    states, started = {}, 0.0
    for i in range(turns):
        started = time.time()
        for thread in threads:
            states[thread] = agent.invoke(question(thread, i), {"configurable": {"thread_id": thread}})
        memory.flush()
    return states, started


def test_agent_keeps_prompts_bounded_and_absorbs_per_thread(make_service, monkeypatch):
    memory, scripted, agent = build(make_service, monkeypatch, turns=6)
    states, started = run_sync(agent, memory, ["a", "b"], turns=6)
    check_run(memory, scripted, states, started)
    # Once absorption has caught up, the state holds about one window, not the whole chat.
    window = memory.config.window_tokens
    state_msgs = states["a"]["messages"]
    assert len(state_msgs) < len(memory.transcript("a"))
    tokens = sum(memory.fmt.count(m.as_chat()) for m in memory.window("a"))
    assert tokens <= window + 120, tokens  # the newest turn may push it over (it is never absorbed)
    assert all(j.status == "done" for j in memory.jobs())


async def test_agent_under_ainvoke(make_service, monkeypatch):
    memory, scripted, agent = build(make_service, monkeypatch, turns=5)
    states, started = {}, 0.0
    for i in range(5):
        started = time.time()
        for thread in ("x", "y"):
            states[thread] = await agent.ainvoke(question(thread, i), {"configurable": {"thread_id": thread}})
        await memory.aflush()
    check_run(memory, scripted, states, started)


def test_pending_turns_stay_in_the_prompt_until_absorbed(make_service, monkeypatch):
    """Evicted turns whose absorption has not committed are still shown to the model."""
    held = []
    memory, scripted, agent = build(make_service, monkeypatch, turns=4, cap=2000,
                                    wrap=lambda ex: held.append(Controlled(ex, hold=True)) or held[-1])
    try:
        for i in range(4):
            state = agent.invoke(question("p", i), {"configurable": {"thread_id": "p"}})
        assert memory.jobs("p") and not memory.jobs("p", "done")  # all held at the gate
        assert len(state["messages"]) < len(memory.transcript("p"))  # evicted from the state...
        last_prompt = "\n".join(m["content"] for m in scripted.prompts[-1][1])
        for i in range(4):
            assert f"my lucky number is {i}" in last_prompt  # ...but not from what the model reads
    finally:
        held[0].gate.set()


def test_middleware_refuses_a_foreign_model(make_service):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    memory = make_service()
    agent = create_agent(model=FakeListChatModel(responses=["hi"]), middleware=[AbsorptionMiddleware(memory)])
    with pytest.raises(AbsorberError, match="ChatAbsorber"):
        agent.invoke({"messages": [{"role": "user", "content": "hello"}]})
