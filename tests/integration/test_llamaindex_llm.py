"""LlamaIndex AbsorberLLM on the tiny model: chat/complete, streaming, async, metadata."""

from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock

from llama_index.memory.absorber import AbsorberLLM

from absorber_memory import InvalidMessageError, SkippedContentWarning


@pytest.fixture
def llm(make_service):
    return AbsorberLLM(make_service(max_new_tokens=10), session_id="s")


def test_chat_uses_the_core_template_and_matches_stream(llm):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Be kind."), ChatMessage(role="user", content="Hello!")]
    reply = llm.chat(messages)
    expected = llm.core.stream([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"}],
                               session_id="s", max_new_tokens=10).text()
    assert reply.message.content == expected and reply.message.role == MessageRole.ASSISTANT
    assert reply.raw["usage"]["completion_tokens"] <= 10
    streamed = list(llm.stream_chat(messages))
    assert streamed[-1].message.content == expected and "".join(r.delta for r in streamed) == expected


def test_complete_is_a_user_turn(llm):
    assert llm.complete("Hello!").text == llm.chat([ChatMessage(role="user", content="Hello!")]).message.content
    assert list(llm.stream_complete("Hello!"))[-1].text == llm.complete("Hello!").text


async def test_async_matches_sync(llm):
    sync = llm.chat([ChatMessage(role="user", content="Hello!")]).message.content
    assert (await llm.achat([ChatMessage(role="user", content="Hello!")])).message.content == sync
    assert (await llm.acomplete("Hello!")).text == sync
    last = None
    async for r in await llm.astream_chat([ChatMessage(role="user", content="Hello!")]):
        last = r
    assert last.message.content == sync


def test_metadata_is_truthful(llm):
    meta = llm.metadata
    assert meta.is_chat_model and not meta.is_function_calling_model
    assert meta.model_name == "tiny-llama" and meta.num_output == 10
    assert meta.context_window == llm.core.context_limit


def test_non_text_blocks_are_skipped_with_a_warning(llm):
    image = ImageBlock(url="http://example.com/x.png")
    mixed = ChatMessage(role="user", blocks=[TextBlock(text="Hello!"), image])
    with pytest.warns(SkippedContentWarning, match="ImageBlock"):
        answer = llm.chat([mixed]).message.content
    assert answer == llm.chat([ChatMessage(role="user", content="Hello!")]).message.content
    with pytest.warns(SkippedContentWarning), pytest.raises(InvalidMessageError, match="empty"):
        llm.chat([ChatMessage(role="user", blocks=[image])])  # nothing left to answer


def test_missing_llamaindex_names_the_extra():
    import subprocess
    import sys

    code = "import sys; sys.modules['llama_index.core'] = None; import llama_index.memory.absorber"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "pip install 'absorber-memory[llamaindex]'" in proc.stderr
