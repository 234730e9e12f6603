"""Test helper: a scripted answer stream over the real core (for agents the tiny model cannot drive)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class CannedStream:
    """A finished generation whose text is replaced by a scripted answer (token counts stay real)."""

    def __init__(self, real: Any, text: str) -> None:
        real_text = real.text()
        self.input_tokens, self.output_tokens, self.finish_reason = real.input_tokens, real.output_tokens, real.finish_reason
        self._text = real_text if text is None else text

    def __iter__(self) -> Iterator[str]:
        yield self._text

    def text(self) -> str:
        return self._text


class Scripted:
    """Stands in for `memory.stream`: runs the real generation (adapter, counts), answers from a script.

    The tiny test model cannot write a tool call, so tests script what it
    says; everything else (prompt building, adapters, absorption) is real.
    `prompts` records every prompt (chat dicts) the model was given.
    """

    def __init__(self, memory: Any, answers: list[str | None]) -> None:
        self.real = memory.stream
        self.answers = list(answers)
        self.prompts: list[tuple[str, list[dict[str, str]]]] = []

    def __call__(self, messages: Any, **kwargs: Any) -> CannedStream:
        self.prompts.append((kwargs.get("session_id"), messages))
        text = self.answers.pop(0) if self.answers else None
        return CannedStream(self.real(messages, **kwargs), text)
