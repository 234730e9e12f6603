"""`AbsorberLLM` for LlamaIndex: the local model with one session's absorbed memory.

A `CustomLLM` whose chat methods go through the model's own chat template
(not LlamaIndex's generic `messages_to_prompt`), so prompts look exactly
like what absorption trains on. No native function calling: the metadata
says `is_function_calling_model=False`, so agents use ReAct prompting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field

from absorber_memory import DEFAULT_SESSION
from absorber_memory.generation import TextStream, aiterate, sampling_settings

from .handle import CoreHandle
from .messages import to_chat_messages


class AbsorberLLM(CoreHandle, CustomLLM):
    """LlamaIndex LLM over an `AbsorberMemory` core, answering with a session's adapter.

    Args:
        memory: the core `absorber_memory.AbsorberMemory` (default: the process-wide
            shared one; `core=` is the older, deprecated keyword).
        session_id: whose adapter to use (the same as the memory's).
        max_tokens: most new tokens per answer (default: the core's `max_new_tokens`).
        temperature: 0 (default) decodes greedily; above 0 samples.
    """

    session_id: str = Field(default=DEFAULT_SESSION, description="Whose adapter to use.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens per answer.")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy; above 0: sampling.")

    @classmethod
    def class_name(cls) -> str:
        return "AbsorberLLM"

    @property
    def metadata(self) -> LLMMetadata:
        core = self.memory_if_open()
        window = core.context_limit if core is not None else None
        return LLMMetadata(
            context_window=window or 8192,
            num_output=self.max_tokens or (core.config.max_new_tokens if core is not None else 128),
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=getattr(core, "model_label", None) or "smollm2-135m-instruct",
            system_role=MessageRole.SYSTEM,
        )

    def _stream(self, prompt: list[dict[str, str]] | str, kwargs: dict[str, Any]) -> TextStream:
        settings = sampling_settings(kwargs.pop("temperature", self.temperature))
        kwargs.pop("formatted", None)
        return self.memory.stream(
            prompt,
            session_id=kwargs.pop("session_id", self.session_id),
            max_new_tokens=kwargs.pop("max_tokens", self.max_tokens),
            **settings,
        )

    # --- completion ---------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        stream = self._stream([{"role": "user", "content": prompt}], kwargs)
        return CompletionResponse(text=stream.text(), raw=_usage(stream))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._stream([{"role": "user", "content": prompt}], kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in stream:
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    # --- chat -----------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        stream = self._stream(to_chat_messages(messages), kwargs)
        text = stream.text()
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=_usage(stream))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._stream(to_chat_messages(messages), kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for piece in stream:
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return aiterate(self.stream_chat(messages, **kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return aiterate(self.stream_complete(prompt, formatted, **kwargs))


def _usage(stream: TextStream) -> dict[str, Any]:
    return {
        "usage": {
            "prompt_tokens": stream.input_tokens,
            "completion_tokens": stream.output_tokens,
            "total_tokens": stream.input_tokens + stream.output_tokens,
        },
        "finish_reason": stream.finish_reason,
    }
