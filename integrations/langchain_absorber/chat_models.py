"""`ChatAbsorber`: the local model, with one session's absorbed memory, as a LangChain chat model.

Generation goes through the core `AbsorberMemory`: its base model with the
session's committed LoRA adapter active (or the frozen base model before
any absorption). Several `ChatAbsorber`s, one per session, share one core;
`with_session(id)` is a cheap copy bound to another session, which is how
`AbsorptionMiddleware` points an agent's model at the right thread.

The model reads only the messages it is given: use `AbsorberChatMessageHistory`
or `AbsorptionMiddleware` to keep a bounded window and absorb the rest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from absorber_memory import DEFAULT_MODEL, DEFAULT_SESSION, resolve_memory
from absorber_memory.generation import TextStream, aiterate, sampling_settings

from .messages import parse_tool_calls, to_chat_messages, tool_choice_name

#: Call-time kwargs that are ours (bound by `bind_tools`), not `model.generate`'s.
_OWN_KWARGS = ("tools", "tool_choice", "ls_structured_output_format", "session_id", "model")


def model_label(memory: Any, current: str, fields_set: set[str]) -> str:
    """The model name for traces: as given, else the core's model."""
    if "model_name" in fields_set or memory is None:
        return current
    return getattr(memory, "model_label", None) or current


class AbsorberParams(BaseModel):
    """Settings shared by `ChatAbsorber` and `AbsorberLLM` (a pydantic mixin)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    memory: Any = Field(default=None, exclude=True)
    session_id: str = DEFAULT_SESSION
    model_name: str = Field(default=DEFAULT_MODEL, alias="model")
    temperature: float | None = Field(default=0.0, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _name_from_memory(self) -> AbsorberParams:
        object.__setattr__(self, "model_name", model_label(self.memory, self.model_name, self.model_fields_set))
        return self

    @property
    def _llm_type(self) -> str:
        return "absorber"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "session_id": self.session_id,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
        }

    def _settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pop per-call `temperature`/`top_p` from `kwargs`; the `model.generate` sampling settings."""
        return sampling_settings(kwargs.pop("temperature", self.temperature), kwargs.pop("top_p", self.top_p))


class ChatAbsorber(AbsorberParams, BaseChatModel):
    """A local chat model whose weights carry a session's absorbed conversation.

    Args:
        memory: the core `AbsorberMemory` (default: the process-wide shared one,
            built on first use with the default model).
        session_id: whose adapter to use (a LangGraph thread id, a user's chat).
        temperature: 0 (default) decodes greedily; above 0 samples.
        max_tokens: most new tokens per answer (default: the core's `max_new_tokens`).
        top_p: nucleus sampling when `temperature` > 0.
        stop: strings that end an answer (not included in it).

    Example:
        ```python
        from absorber_memory import AbsorberMemory
        from langchain_absorber import ChatAbsorber

        memory = AbsorberMemory()
        chat = ChatAbsorber(memory=memory, session_id="alice")
        chat.invoke("What is my dog called?").content
        ```
    """

    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="absorber",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    def with_session(self, session_id: str) -> ChatAbsorber:
        """The same model bound to another session's memory (a cheap copy sharing the core)."""
        return self.model_copy(update={"session_id": session_id})

    # --- tools --------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools in the documented `<tool_call>` JSON format (see `messages.py`).

        Args:
            tools: LangChain tools, functions, pydantic models or OpenAI tool dicts.
            tool_choice: "auto" (default), "any"/"required"/True (must call one),
                "none", or a tool name (must call that one); said in the prompt,
                since a local model cannot be forced.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice_name(tool_choice), **kwargs)

    # --- generation -----------------------------------------------------------------------
    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> TextStream:
        chat = to_chat_messages(messages, kwargs.get("tools"), kwargs.get("tool_choice"))
        extra = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}
        max_tokens = extra.pop("max_tokens", self.max_tokens)
        settings = self._settings(extra)
        return resolve_memory(self.memory).stream(
            chat,
            session_id=kwargs.get("session_id", self.session_id),
            max_new_tokens=max_tokens,
            stop=stop if stop is not None else self.stop,
            **settings,
            **extra,
        )

    def _message(self, text: str, stream: TextStream, kwargs: dict[str, Any]) -> AIMessage:
        tools = kwargs.get("tools")
        content, calls = parse_tool_calls(text, {t["function"]["name"] for t in tools}) if tools else (text, [])
        return AIMessage(
            content=content, tool_calls=calls, usage_metadata=_usage(stream), response_metadata=self._metadata(stream)
        )

    def _metadata(self, stream: TextStream) -> dict[str, Any]:
        return {"model_name": self.model_name, "finish_reason": stream.finish_reason, "model_provider": "absorber"}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        stream = self._start(messages, stop, kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._message(stream.text(), stream, kwargs))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        """Text chunks as generated, then a last chunk with usage (tool calls when tools are bound)."""
        stream = self._start(messages, stop, kwargs)
        if kwargs.get("tools"):  # a tool call is only known once complete: one chunk at the end
            message = self._message(stream.text(), stream, kwargs)
            calls = [
                tool_call_chunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i)
                for i, c in enumerate(message.tool_calls)
            ]
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=message.content,
                    tool_call_chunks=calls,
                    usage_metadata=message.usage_metadata,
                    response_metadata=message.response_metadata,
                    chunk_position="last",
                )
            )
            return
        for piece in stream:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage(stream),
                response_metadata=self._metadata(stream),
                chunk_position="last",
            )
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in aiterate(self._chunks(messages, stop, kwargs)):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _usage(stream: TextStream) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=stream.input_tokens,
        output_tokens=stream.output_tokens,
        total_tokens=stream.input_tokens + stream.output_tokens,
    )
