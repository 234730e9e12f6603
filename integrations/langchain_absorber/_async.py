"""Running the core's blocking calls from async LangChain code without blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def aiterate(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator on worker threads, one item at a time."""
    try:
        while (item := await asyncio.to_thread(next, iterator, _DONE)) is not _DONE:
            yield item  # type: ignore[misc]
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # stop the generation when the reader leaves early
            await asyncio.to_thread(close)
