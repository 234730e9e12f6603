"""`AbsorptionMemoryBlock`: absorb what LlamaIndex's `Memory` flushes out of short-term memory.

For users who keep LlamaIndex's own `Memory` (its FIFO window, its SQL
chat store, other blocks such as fact extraction) and want the turns it
ejects absorbed into weights instead of lost. `Memory` awaits `aput` inline
while it manages its queue, so `_aput` only stores the flushed turns in the
core and queues their absorption (milliseconds; training runs on the
core's workers). The knowledge then lives in the session's adapter, so
`_aget` returns an empty string and `Memory` inserts nothing for this block.

The session is `Memory`'s `session_id` (set on each flushed message); answer
with `AbsorberLLM(session_id=memory.session_id)`. Flushed turns are absorbed
whole, in rounds of about `absorb_tokens`, each synced on the flushed turns
after it (and probes); the newest flushed round syncs on probes alone,
since the turns after it are still in `Memory`'s window, out of reach.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory.memory import BaseMemoryBlock
from pydantic import Field

from absorber_memory import DEFAULT_SESSION

from .handle import CoreHandle
from .messages import to_chat


class AbsorptionMemoryBlock(CoreHandle, BaseMemoryBlock[str]):
    """A `Memory` block that queues absorption of flushed turns into the session's adapter.

    Args:
        memory: the core `absorber_memory.AbsorberMemory` (default: the process-wide
            shared one; `core=` is the older, deprecated keyword).
        name: the block's name in `Memory`.
        system: a system prompt to set as the prefix of sessions it absorbs
            into (the prefix absorption trains under; give the agent the same).
        session_id: the session for messages that arrive without one.
    """

    name: str = Field(default="absorbed_memory", description="The block's name in `Memory`.")
    description: str | None = Field(default="Earlier turns, absorbed into the model's weights.")
    system: str | None = Field(default=None, description="Prefix set on the sessions absorbed into.")
    session_id: str = Field(default=DEFAULT_SESSION, description="Session for messages without one.")

    @classmethod
    def class_name(cls) -> str:
        return "AbsorptionMemoryBlock"

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        return ""  # the absorbed turns are in the weights, not the prompt

    async def _aput(self, messages: list[ChatMessage]) -> None:
        by_session: dict[str, list[dict[str, str]]] = defaultdict(list)
        for i, message in enumerate(messages):
            chat = to_chat(message, f"messages[{i}]")
            if chat is not None:
                by_session[message.additional_kwargs.get("session_id") or self.session_id].append(chat)
        if by_session:
            await asyncio.to_thread(self._absorb, dict(by_session))

    def _absorb(self, by_session: dict[str, list[dict[str, str]]]) -> None:
        core = self.memory
        for session_id, chat in by_session.items():
            if self.system is not None:
                core.set_prefix(session_id, self.system)
            core.absorb_messages(chat, session_id=session_id)
