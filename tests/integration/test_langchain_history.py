"""AbsorberChatMessageHistory: round trips, async parity, absorption triggers, RunnableWithMessageHistory."""

from __future__ import annotations

import threading

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_absorber import AbsorberChatMessageHistory, ChatAbsorber, session_history


def exchange(i: int) -> list:
    return [HumanMessage(f"My name is Ana and I was born in {1980 + i}. I live in Lisbon."),
            AIMessage(f"Hello Ana! Tell me more about yourself, number {i}.")]


def test_add_get_clear_round_trip(make_service):
    memory = make_service(auto_absorb=False)
    history = session_history(memory)("s1")
    assert isinstance(history, AbsorberChatMessageHistory) and history.messages == []
    history.add_messages([SystemMessage("Be kind."), *exchange(0)])
    got = history.messages
    assert [type(m) for m in got] == [SystemMessage, HumanMessage, AIMessage]
    assert [m.content for m in got] == ["Be kind.", exchange(0)[0].content, exchange(0)[1].content]
    assert all(m.id for m in got[1:])
    history.add_messages(got[1:])  # ids it already holds: skipped, not doubled
    assert len(history.messages) == 3
    history.clear()
    assert history.messages == [] and "s1" not in memory.sessions()


async def test_async_methods_match_sync(make_service):
    memory = make_service(auto_absorb=False)
    sync, other = session_history(memory)("a"), session_history(memory)("b")
    sync.add_messages(exchange(0))
    await other.aadd_messages(exchange(0))
    assert [m.content for m in await other.aget_messages()] == [m.content for m in sync.messages]
    await other.aclear()
    assert await other.aget_messages() == [] and sync.messages


def test_each_overflow_queues_exactly_one_job(make_service):
    # An exchange is 69 tiny-model tokens: the window holds one, each new one overflows it, once.
    memory = make_service(window_tokens=100, absorb_tokens=60, sync_tokens=40)
    history = session_history(memory)("s")
    counts = []
    for i in range(5):
        before = len(memory.jobs("s"))
        history.add_messages(exchange(i))
        counts.append(len(memory.jobs("s")) - before)
        memory.flush("s")
    assert counts == [0, 1, 1, 1, 1]
    assert all(j.status == "done" for j in memory.jobs("s"))


def test_messages_never_return_absorbed_turns(make_service):
    memory = make_service()
    history = session_history(memory, user_id="u1")("s")
    for i in range(5):
        history.add_messages(exchange(i))
    memory.flush()
    absorbed = {m.content for m in memory.transcript("s") if m.absorbed}
    assert absorbed and not absorbed & {m.content for m in history.messages}
    assert memory.adapter_path("s") is not None and memory.sessions("u1") == ["s"]


def test_concurrent_adds_from_threads_lose_nothing(make_service):
    memory = make_service(auto_absorb=False)
    history = session_history(memory)("t")
    threads = [threading.Thread(target=history.add_messages, args=(exchange(i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(history.messages) == 16


@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_runnable_with_message_history(make_service):
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    memory = make_service()
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")])
    chain = RunnableWithMessageHistory(prompt | ChatAbsorber(memory=memory, max_tokens=6),
                                       session_history(memory), input_messages_key="question",
                                       history_messages_key="history")
    for i in range(4):
        chain.invoke({"question": f"I was born in {1980 + i}. Where do I live?"},
                     config={"configurable": {"session_id": "r"}})
    assert len(memory.transcript("r")) == 8  # each run stored its question and answer
    memory.flush()
    assert memory.adapter_path("r") is not None


def test_system_prompt_becomes_the_prefix(make_service):
    memory = make_service(auto_absorb=False)
    history = session_history(memory, system="Be kind.")("s")
    history.add_messages(exchange(0))
    again = session_history(memory, system="Be kind.")("s")  # the same prompt again: nothing changes
    assert [m.content for m in again.messages][:1] == ["Be kind."] and len(again.messages) == 3
    assert memory.prefix("s") == [{"role": "system", "content": "Be kind."}]


def test_bad_session_ids_are_refused(make_service):
    memory = make_service()
    with pytest.raises(ValueError, match="session_id"):
        session_history(memory)("")
