"""LlamaIndex memory on the tiny model: chat engines, an agent workflow, the flush block, serialization."""

from __future__ import annotations

import json
import time

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.memory import Memory
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, TextNode

from absorber_memory.errors import ConfigError, InvalidMessageError
from llama_index.memory.absorber import AbsorberLLM, AbsorberMemory, AbsorptionMemoryBlock

from ..scripted import Scripted
from ..unit.test_queue import Controlled

FACTS = [f"My name is Ana and I was born in {1980 + i}. I live in Lisbon." for i in range(6)]


def contents(messages) -> list[str]:
    return [m.content for m in messages]


def check_absorbed_once(core, session_id: str) -> list:
    """Every absorbed message was absorbed by exactly one done job of this session; returns the absorbed rows."""
    absorbed = [m for m in core.transcript(session_id) if m.absorbed]
    jobs = [j for j in core.jobs(session_id) if j.status == "done"]
    claimed = [i for j in jobs for i in j.message_ids]
    assert all(j.session_id == session_id for j in core.jobs(session_id))
    assert sorted(claimed) == [m.id for m in absorbed] and len(set(claimed)) == len(claimed)
    return absorbed


def test_simple_chat_engine_absorbs_overflow_and_get_returns_only_the_window(make_service):
    core = make_service()
    memory = AbsorberMemory(core, session_id="ana", system="Be kind.")
    engine = SimpleChatEngine.from_defaults(llm=memory.as_llm(), memory=memory)
    core.stream = script = Scripted(core, [])
    for fact in FACTS:
        engine.chat(fact)
        core.flush("ana")
    absorbed = check_absorbed_once(core, "ana")
    assert absorbed and absorbed[0].content == FACTS[0]
    window = core.window("ana")
    assert contents(memory.get()) == ["Be kind."] + [m.content for m in window]
    assert not {m.content for m in absorbed} & set(contents(memory.get()[1:]))
    # The model read the prefix and the unabsorbed turns only; engine history shows everything.
    last_prompt = script.prompts[-1][1]
    assert last_prompt[0] == {"role": "system", "content": "Be kind."}
    assert FACTS[0] not in [m["content"] for m in last_prompt] and last_prompt[-1]["content"] == FACTS[-1]
    assert contents(engine.chat_history) == ["Be kind."] + [m.content for m in core.transcript("ana")[1:]]
    assert core.adapter_path("ana") is not None


async def test_achat_matches_chat(make_service):
    core = make_service()
    engines = {}
    for sid in ("sync", "async"):
        memory = AbsorberMemory(core, session_id=sid)
        engines[sid] = SimpleChatEngine.from_defaults(llm=memory.as_llm(), memory=memory)
    for fact in FACTS[:4]:
        reply = engines["sync"].chat(fact).response
        assert (await engines["async"].achat(fact)).response == reply
        await core.aflush()
    sync_memory, async_memory = (engines[s]._memory for s in ("sync", "async"))
    assert contents(await async_memory.aget()) == contents(sync_memory.get())
    assert contents(await async_memory.aget_all()) == contents(sync_memory.get_all())
    assert [m.absorbed for m in core.transcript("async")] == [m.absorbed for m in core.transcript("sync")]
    assert any(m.absorbed for m in core.transcript("sync"))


class OneNode(BaseRetriever):
    def _retrieve(self, query_bundle):
        return [NodeWithScore(node=TextNode(text="The office is in Porto."), score=1.0)]


def test_condense_plus_context_engine(make_service):
    core = make_service()
    memory = AbsorberMemory(core, session_id="cpc")
    core.stream = script = Scripted(core, [])
    engine = CondensePlusContextChatEngine.from_defaults(retriever=OneNode(), llm=memory.as_llm(), memory=memory)
    for fact in FACTS[:4]:
        absorbed_before = {r.content for r in core.transcript("cpc") if r.absorbed}
        engine.chat(fact)
        core.flush("cpc")
    stored = core.transcript("cpc")
    assert [m.role for m in stored] == ["user", "assistant"] * 4 and stored[0].content == FACTS[0]
    assert absorbed_before and check_absorbed_once(core, "cpc")
    answer_prompt = script.prompts[-1][1]  # the last call answers; earlier ones condense the question
    assert "Porto" in answer_prompt[0]["content"] and answer_prompt[-1]["content"] == FACTS[3]
    assert all(m["content"] not in absorbed_before for m in answer_prompt[1:])


async def test_react_agent_workflow_with_memory_survives_ctx_serialization(make_service):
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.tools import FunctionTool
    from llama_index.core.workflow import Context, JsonSerializer

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    core = make_service()
    memory = AbsorberMemory(core, session_id="agent")
    agent = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=memory.as_llm())
    core.stream = Scripted(core, [
        'Thought: I need to add.\nAction: add\nAction Input: {"a": 2, "b": 3}',
        "Thought: I can answer.\nAnswer: 2 + 3 = 5.",
        *[f"Thought: I can answer.\nAnswer: Noted, number {i}." for i in range(4)],
    ])
    ctx = Context(agent)
    result = await agent.run(user_msg="What is 2 + 3?", memory=memory, ctx=ctx)
    assert "5" in str(result)
    data = ctx.to_dict(serializer=JsonSerializer())
    text = json.dumps(data)
    assert "llama_index.memory.absorber.base.AbsorberMemory" in text
    assert len(text) < 100_000  # ids and config, not weights
    restored = Context.from_dict(agent, data, serializer=JsonSerializer())
    again = await restored.store.get("memory")
    assert isinstance(again, AbsorberMemory) and again is not memory
    assert again.session_id == "agent" and again.core is core  # the open core of that data directory
    for fact in FACTS[:4]:
        await agent.run(user_msg=fact, ctx=restored)
    await core.aflush("agent")
    stored = core.transcript("agent")
    assert stored[0].content == "What is 2 + 3?" and "2 + 3 = 5" in stored[1].content
    assert [m.content for m in stored if m.role == "user"] == ["What is 2 + 3?", *FACTS[:4]]
    check_absorbed_once(core, "agent")
    assert any(m.absorbed for m in stored)


async def test_sessions_are_kept_apart_and_flushed_turns_are_queued_once(make_service):
    core = make_service()
    a, b = AbsorberMemory(core, session_id="a"), AbsorberMemory(core, session_id="b")
    for i, fact in enumerate(FACTS):
        a.put_messages([ChatMessage(role="user", content=fact), ChatMessage(role="assistant", content=f"Ok {i}.")])
        await b.aput(ChatMessage(role="user", content=fact.replace("Ana", "Bo")))
        await b.aput(ChatMessage(role="assistant", content=f"Ok {i}."))
    await core.aflush()
    for memory, name in ((a, "Ana"), (b, "Bo")):
        absorbed = check_absorbed_once(core, memory.session_id)
        assert absorbed and all(name in m.content or m.role == "assistant" for m in absorbed)
        assert contents(memory.get()) == [m.content for m in core.window(memory.session_id)]
    assert contents(a.get()) == [c.replace("Bo", "Ana") for c in contents(await b.aget())]


def test_reset_forgets_messages_and_adapter(make_service):
    core = make_service()
    memory = AbsorberMemory(core, session_id="r", system="Be kind.")
    for fact in FACTS:
        memory.put(ChatMessage(role="user", content=fact))
    core.flush("r")
    assert core.adapter_path("r") is not None
    memory.reset()
    assert core.adapter_path("r") is None and core.transcript("r") == []
    assert contents(memory.get()) == ["Be kind."]  # the memory's own system prompt comes back


async def test_areset_matches_reset(make_service):
    core = make_service(auto_absorb=False)
    memory = AbsorberMemory(core, session_id="r")
    await memory.aput_messages([ChatMessage(role="user", content=FACTS[0])])
    await memory.areset()
    assert await memory.aget() == [] and await memory.aget_all() == []


def test_set_extends_or_replaces_and_bad_input_changes_nothing(make_service):
    core = make_service()
    memory = AbsorberMemory(core, session_id="s")
    history = [ChatMessage(role=r, content=f"{fact} ({r})") for fact in FACTS for r in ("user", "assistant")]
    memory.set(history[:8])
    core.flush("s")
    version = core.adapter_path("s")
    assert version is not None
    memory.set(history)  # extends what is stored: only the tail is added, the adapter stays
    assert core.adapter_path("s") is not None and len(core.transcript("s")) == 12
    assert all(p.exists() for p in [core.adapter_path("s")])
    before = [(m.id, m.content) for m in core.transcript("s")]
    with pytest.raises(InvalidMessageError, match="NUL"):
        memory.set([ChatMessage(role="user", content="binary\x00data")])
    with pytest.raises(InvalidMessageError, match="system message after"):
        memory.set([history[0], ChatMessage(role="system", content="late")])
    assert [(m.id, m.content) for m in core.transcript("s")] == before
    memory.set([ChatMessage(role="system", content="New rules."), ChatMessage(role="user", content="Hi.")])
    assert core.adapter_path("s") is None and contents(memory.get_all()) == ["New rules.", "Hi."]


def test_get_honours_initial_token_count_while_a_backlog_waits(make_service):
    held = []
    core = make_service(context_tokens=200, wrap=lambda ex: held.append(Controlled(ex, hold=True)) or held[-1])
    memory = AbsorberMemory(core, session_id="s")
    for fact in FACTS:
        memory.put_messages([ChatMessage(role="user", content=fact), ChatMessage(role="assistant", content="Ok.")])
    full = memory.get()
    fewer = memory.get(initial_token_count=120)
    assert 0 < len(fewer) < len(full) and contents(fewer) == contents(full)[-len(fewer):]
    assert len(AbsorberMemory(core, session_id="s", token_limit=80).get()) == len(fewer)
    held[0].gate.set()


def test_serialization_keeps_ids_and_finds_the_open_core(make_service):
    core = make_service()
    memory = AbsorberMemory(core, session_id="s", user_id="u", system="Be kind.")
    data = json.loads(memory.to_json())
    assert data["session_id"] == "s" and data["core_spec"]["data_dir"] == str(core.data_dir.resolve())
    back = AbsorberMemory.from_dict(data)
    assert back.core is core and back.user_id == "u" and back.system == "Be kind."
    llm = AbsorberLLM.from_dict(memory.as_llm().to_dict())
    assert llm.core is core and llm.session_id == "s"
    with pytest.raises(ValueError, match="session_id"):
        AbsorberMemory(core, session_id="a\x00b")
    core.close()  # no open core for that directory, and a model object cannot be reopened from a spec
    with pytest.raises(ConfigError, match="cannot be rebuilt"):
        AbsorberMemory.from_dict(data).get()


def test_defaults_share_the_process_core(make_service, monkeypatch):
    import absorber_memory.shared as shared

    core = make_service()
    monkeypatch.setattr(shared, "_memory", core)
    memory = AbsorberMemory()
    engine = SimpleChatEngine.from_defaults(llm=AbsorberLLM(), memory=memory)
    engine.chat("Hello!")
    assert memory.core is core and memory.core_spec is None
    assert [m.role for m in core.transcript("default")] == ["user", "assistant"]
    assert AbsorberMemory.from_defaults(llm=AbsorberLLM(core, session_id="x")).session_id == "x"
    with pytest.raises(ValueError, match="unexpected arguments"):
        AbsorberMemory.from_defaults(tokenizer_fn=len)


async def test_block_absorbs_what_llamaindex_memory_flushes(make_service):
    held = []
    core = make_service(wrap=lambda ex: held.append(Controlled(ex, hold=True)) or held[-1])
    block = AbsorptionMemoryBlock(core, system="Be kind.")
    li_memory = Memory.from_defaults(session_id="blk", token_limit=120, token_flush_size=40,
                                     memory_blocks=[block], tokenizer_fn=core.tokenizer.encode)
    started = time.monotonic()
    for i, fact in enumerate(FACTS):
        await li_memory.aput(ChatMessage(role="user", content=fact))
        await li_memory.aput(ChatMessage(role="assistant", content=f"Ok {i}."))
    assert time.monotonic() - started < 10  # jobs are held at the gate: aput only queued them
    from llama_index.core.storage.chat_store.sql import MessageStatus

    flushed = await li_memory.aget_all(status=MessageStatus.ARCHIVED)
    assert flushed and [m.content for m in core.transcript("blk") if m.role != "system"] == contents(flushed)
    assert core.prefix("blk") == [{"role": "system", "content": "Be kind."}]
    assert all(m.role != "system" for m in await li_memory.aget())  # the block adds nothing to the prompt
    held[0].gate.set()
    await core.aflush("blk")
    assert len(check_absorbed_once(core, "blk")) == len(flushed)  # every flushed turn, the newest included


async def test_streaming_chat_writes_the_answer_to_memory(make_service):
    core = make_service(auto_absorb=False)
    memory = AbsorberMemory(core, session_id="st")
    engine = SimpleChatEngine.from_defaults(llm=memory.as_llm(), memory=memory)
    streamed = engine.stream_chat("Hello!")
    text = "".join(streamed.response_gen)
    streamed = await engine.astream_chat("Hello again!")
    async for _ in streamed.async_response_gen():
        pass
    stored = core.transcript("st")
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1].content == text.strip() or stored[1].content == text
