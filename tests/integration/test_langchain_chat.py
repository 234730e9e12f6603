"""ChatAbsorber and AbsorberLLM: LangChain's standard unit suite, streaming, stop, usage, tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests

from absorber_memory import AbsorberConfig, AbsorberMemory, SkippedContentWarning
from absorber_memory.testing import tiny_model_and_tokenizer
from langchain_absorber import AbsorberLLM, ChatAbsorber, parse_tool_calls, to_chat, to_chat_messages

from ..conftest import FAST
from ..scripted import Scripted

_SHARED: dict[str, AbsorberMemory] = {}


def tiny_memory() -> AbsorberMemory:
    """One core on the tiny model for this module (the standard suite builds models from properties)."""
    if "memory" not in _SHARED:
        model, tokenizer = tiny_model_and_tokenizer()
        _SHARED["dir"] = tempfile.mkdtemp(prefix="absorber-lc-")
        _SHARED["memory"] = AbsorberMemory(model, tokenizer=tokenizer, config=AbsorberConfig(**FAST),
                                           data_dir=_SHARED["dir"])
    return _SHARED["memory"]


@pytest.fixture(scope="module", autouse=True)
def _close_shared():
    yield
    if "memory" in _SHARED:
        _SHARED.pop("memory").close()
        shutil.rmtree(_SHARED.pop("dir"), ignore_errors=True)


class TestChatAbsorberStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAbsorber]:
        return ChatAbsorber

    @property
    def chat_model_params(self) -> dict:
        return {"memory": tiny_memory(), "session_id": "standard"}


@pytest.fixture
def memory():
    return tiny_memory()


def test_invoke_reports_usage_and_matches_stream(memory):
    chat = ChatAbsorber(memory=memory, max_tokens=10)
    reply = chat.invoke([HumanMessage("Hello! How are you today?")])
    prompt = memory.fmt.encode([], [{"role": "user", "content": "Hello! How are you today?"}], add_generation_prompt=True)
    assert reply.usage_metadata["input_tokens"] == len(prompt)
    assert 1 <= reply.usage_metadata["output_tokens"] <= 10
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.response_metadata["model_name"] == "tiny-llama"
    chunks = list(chat.stream([HumanMessage("Hello! How are you today?")]))
    assert "".join(c.content for c in chunks) == reply.content  # greedy: same text either way
    assert chunks[-1].usage_metadata["output_tokens"] == reply.usage_metadata["output_tokens"]


async def test_async_paths_match_sync(memory):
    chat = ChatAbsorber(memory=memory, max_tokens=8)
    sync = chat.invoke("Tell me more about yourself.").content
    assert (await chat.ainvoke("Tell me more about yourself.")).content == sync
    pieces = [c.content async for c in chat.astream("Tell me more about yourself.")]
    assert len(pieces) >= 2 and "".join(pieces) == sync


def test_stop_and_max_tokens_are_honoured(memory):
    chat = ChatAbsorber(memory=memory, max_tokens=20)
    full = chat.invoke("Hello!").content
    assert len(full) > 6
    stop = full[3:6]
    cut = chat.invoke("Hello!", stop=[stop])
    assert cut.content == full[: full.index(stop)] and stop not in cut.content
    assert "".join(c.content for c in chat.stream("Hello!", stop=[stop])) == cut.content
    short = ChatAbsorber(memory=memory, max_tokens=3).invoke("Hello!")
    assert short.usage_metadata["output_tokens"] <= 3 and short.response_metadata["finish_reason"] == "length"


def test_sampling_follows_temperature(memory):
    greedy = {ChatAbsorber(memory=memory, max_tokens=12).invoke("Hello!").content for _ in range(2)}
    sampled = {ChatAbsorber(memory=memory, max_tokens=12, temperature=5.0).invoke("Hello!").content for _ in range(4)}
    assert len(greedy) == 1 and len(sampled) > 1


def test_sessions_select_their_adapter(memory, monkeypatch):
    bound = ChatAbsorber(memory=memory).with_session("alice")
    assert bound.session_id == "alice" and bound.memory is memory
    scripted = Scripted(memory, ["ok"])
    monkeypatch.setattr(memory, "stream", scripted)
    assert bound.invoke("hi").content == "ok"
    assert scripted.prompts[0][0] == "alice"


def test_bound_tools_are_rendered_and_calls_parsed(memory, monkeypatch):
    @tool
    def lookup(city: str) -> str:
        """Weather of a city."""
        return "sunny"

    scripted = Scripted(memory, ['Let me check.\n<tool_call>{"name": "lookup", "arguments": {"city": "Lisbon"}}</tool_call>',
                                 '<tool_call>{"name": "lookup", "arguments": {"city": }</tool_call>',
                                 '<tool_call>{"name": "lookup", "arguments": {"city": "Oslo"}}</tool_call>'])
    monkeypatch.setattr(memory, "stream", scripted)
    chat = ChatAbsorber(memory=memory).bind_tools([lookup], tool_choice="any")
    reply = chat.invoke([SystemMessage("Be brief."), HumanMessage("Weather in Lisbon?")])
    assert reply.content == "Let me check."
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("lookup", {"city": "Lisbon"})]
    system = scripted.prompts[0][1][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    assert '"name": "lookup"' in system["content"] and "must call at least one function" in system["content"]
    bad = chat.invoke("Weather?")  # malformed JSON: plain text, no exception
    assert bad.tool_calls == [] and "<tool_call>" in bad.content
    streamed = list(chat.stream("Weather in Oslo?"))
    assert streamed[-1].tool_call_chunks[0]["name"] == "lookup"


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # unknown tool
    '<tool_call>{"name": "lookup", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "lookup", "arguments": {}}',  # unclosed
    '<tool_call>["lookup"]</tool_call>',  # not an object
    'just words',
])
def test_malformed_tool_calls_stay_plain_text(text):
    assert parse_tool_calls(text, {"lookup"}) == (text, [])


def test_tool_call_round_trip_through_rendering():
    call = {"name": "lookup", "args": {"city": "Lisbon", "days": 2}, "id": "c1"}
    rendered = to_chat(AIMessage(content="", tool_calls=[call]))
    assert rendered["role"] == "assistant"
    content, calls = parse_tool_calls(rendered["content"], {"lookup"})
    assert content == "" and [(c["name"], c["args"]) for c in calls] == [("lookup", call["args"])]
    assert to_chat(ToolMessage(content="sunny", tool_call_id="c1")) == {"role": "tool", "content": "sunny"}
    assert to_chat(AIMessage(content="")) is None  # nothing to say: dropped from prompts


def test_non_text_content_is_skipped_with_a_warning():
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.warns(SkippedContentWarning, match="image_url"):
        assert to_chat_messages([HumanMessage(content=[{"type": "text", "text": "Look"}, image])]) == [
            {"role": "user", "content": "Look"}]
    with pytest.warns(SkippedContentWarning):
        assert to_chat_messages([HumanMessage(content=[image])]) == []  # no text: dropped like an empty message


def test_llm_completion_flavours(memory):
    llm = AbsorberLLM(memory=memory, max_tokens=8)
    chat = ChatAbsorber(memory=memory, max_tokens=8)
    assert llm.invoke("Hello!") == chat.invoke("Hello!").content  # a user turn, as the chat model sends it
    assert "".join(llm.stream("Hello!")) == llm.invoke("Hello!")
    raw = AbsorberLLM(memory=memory, max_tokens=8, raw=True)
    expected = memory.stream("The quick brown fox", max_new_tokens=8, raw=True).text()
    assert raw.invoke("The quick brown fox") == expected
    assert llm._llm_type == "absorber" and llm.model_name == "tiny-llama"


def test_missing_langchain_names_the_extra():
    code = "import sys; sys.modules['langchain_core'] = None; import langchain_absorber"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "pip install 'absorber-memory[langchain]'" in proc.stderr
