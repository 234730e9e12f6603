"""`AbsorberLLM`: the text-completion flavour of `ChatAbsorber` (LangChain's `LLM` interface).

By default the prompt is sent as one user turn through the chat template,
under the session's prefix: that is the format absorption trains in, so the
adapter's memory shows best there. `raw=True` continues the prompt as plain
text instead, with no template.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM
from langchain_core.outputs import GenerationChunk

from absorber_memory import resolve_memory
from absorber_memory.generation import TextStream, aiterate

from .chat_models import AbsorberParams


class AbsorberLLM(AbsorberParams, LLM):
    """A local completion model whose weights carry a session's absorbed conversation.

    Args:
        memory: the core `AbsorberMemory` (default: the process-wide shared one).
        session_id: whose adapter to use.
        raw: continue the prompt as plain text instead of answering it as a user turn.
        temperature, max_tokens, top_p, stop: as in `ChatAbsorber`.
    """

    raw: bool = False
    stop: list[str] | None = None

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "raw": self.raw}

    def _start(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> TextStream:
        settings = self._settings(kwargs)
        messages: Any = prompt if self.raw else [{"role": "user", "content": prompt}]
        return resolve_memory(self.memory).stream(
            messages,
            raw=self.raw,
            session_id=kwargs.pop("session_id", self.session_id),
            max_new_tokens=kwargs.pop("max_tokens", self.max_tokens),
            stop=stop if stop is not None else self.stop,
            **settings,
            **kwargs,
        )

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._start(prompt, stop, kwargs).text()

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return await asyncio.to_thread(self._call, prompt, stop, None, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for piece in self._start(prompt, stop, kwargs):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for piece in aiterate(iter(self._start(prompt, stop, kwargs))):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
