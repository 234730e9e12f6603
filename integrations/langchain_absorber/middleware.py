"""`AbsorptionMiddleware`: bounded agent prompts for `create_agent`, old turns absorbed per thread.

The LangChain v1 replacement for `SummarizationMiddleware`, with weights
instead of a summary. Each model step of a `create_agent` agent:

1. `before_model` mirrors the thread's new messages into the core store
   (keyed by message id, so nothing is stored twice; with or without a
   checkpointer) and removes from `state["messages"]` the oldest messages
   that the core has claimed for absorption or already absorbed. The core
   cuts only at turn boundaries (a message plus the tool results that
   answer it), so an AI tool call is never separated from its
   `ToolMessage`s (a guard like `SummarizationMiddleware`'s cut-point
   check makes sure).
2. `wrap_model_call` records the agent's system prompt (and tool list) as
   the thread's prefix, plans absorption (Algorithm 2 on the core's
   `window_tokens` / `absorb_tokens` / `sync_tokens`), and points the model
   at the thread's adapter. The prompt it sends is the core's
   `context_rows`: the unabsorbed window, which includes turns already
   evicted from the state whose absorption has not committed yet, capped at
   `context_tokens`. So no fact is ever missing from both the prompt and
   the adapter, and no turn is in both.

The thread is `runtime.execution_info.thread_id` (or `config["configurable"]
["thread_id"]`); without one, the middleware's `session_id` is used. The
agent's model must be a `ChatAbsorber` on the same core.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AnyMessage, RemoveMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from absorber_memory import DEFAULT_SESSION, check_id, resolve_memory
from absorber_memory.errors import AbsorberError

from .chat_models import ChatAbsorber
from .messages import from_chat, to_chat, to_chat_messages, tool_choice_name


def thread_of(runtime: Any, default: str) -> str:
    """The LangGraph thread id of this run, or `default` when it has none."""
    info = getattr(runtime, "execution_info", None)
    thread = getattr(info, "thread_id", None)
    if thread is None:
        try:
            from langgraph.config import get_config

            thread = get_config().get("configurable", {}).get("thread_id")
        except RuntimeError:  # not inside a runnable context
            thread = None
    return check_id(str(thread)) if thread is not None else default


class AbsorptionMiddleware(AgentMiddleware):
    """Keep an agent's prompt bounded by absorbing evicted turns into the thread's adapter.

    Args:
        memory: the core `AbsorberMemory` (default: the process-wide shared one);
            its config sets the window (`window_tokens`, `absorb_tokens`,
            `sync_tokens`) and the hard prompt cap (`context_tokens`).
        session_id: the session used when a run has no thread id.
    """

    def __init__(self, memory: Any = None, *, session_id: str = DEFAULT_SESSION) -> None:
        super().__init__()
        self.memory = resolve_memory(memory)
        self.session_id = check_id(session_id)

    # --- before_model: mirror new messages, evict what absorption has claimed -----------------
    def _mirror(self, thread: str, messages: list[AnyMessage]) -> dict[str, Any]:
        """Store the state's new messages; returns the rows stored *before* them, by key.

        The new ones are left out: they are unclaimed, so eviction stops at the first of them anyway.
        """
        rows = {m.key: m for m in self.memory.transcript(thread) if m.key is not None}
        new = [
            (msg.id, chat)
            for i, msg in enumerate(messages)
            if msg.id not in rows and (chat := to_chat(msg, f"state messages[{i}]")) is not None
        ]
        if new:
            self.memory.add_messages([c for _, c in new], session_id=thread, keys=[k for k, _ in new], schedule=False)
        return rows

    def _evict(self, state: dict[str, Any], runtime: Any) -> dict[str, Any] | None:
        messages: list[AnyMessage] = state["messages"]
        for msg in messages:
            if msg.id is None:
                msg.id = str(uuid.uuid4())
        thread = thread_of(runtime, self.session_id)
        rows = self._mirror(thread, messages)
        claimed = {i for job in self.memory.jobs(thread) if job.pending for i in job.message_ids}
        cut = 0
        for msg in messages:
            row = rows.get(msg.id)
            if row is None and to_chat(msg) is not None:
                break  # an unstored message with text: never evict it
            if row is not None and not (row.absorbed or row.id in claimed):
                break
            cut += 1
        cut = min(cut, len(messages) - 1)  # the message being answered stays
        # The core never splits a turn; guard anyway, as SummarizationMiddleware does: a kept
        # ToolMessage keeps the AI message that called it.
        while cut > 0 and isinstance(messages[cut], ToolMessage):
            cut -= 1
        if cut <= 0:
            return None
        return {"messages": [RemoveMessage(id=m.id) for m in messages[:cut]]}

    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return self._evict(state, runtime)

    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._evict, state, runtime)

    # --- wrap_model_call: prefix, absorption, the thread's adapter, the prompt ------------------
    def _prepare(self, request: ModelRequest) -> ModelRequest:
        model = request.model
        if not isinstance(model, ChatAbsorber):
            raise AbsorberError(
                f"AbsorptionMiddleware needs the agent's model to be a ChatAbsorber, "
                f"got {type(model).__name__}: create_agent(model=ChatAbsorber(memory=memory), ...)"
            )
        if resolve_memory(model.memory) is not self.memory:
            raise AbsorberError(
                "the agent's ChatAbsorber and AbsorptionMiddleware use different AbsorberMemory objects"
            )
        thread = thread_of(request.runtime, self.session_id)
        tools = [t if isinstance(t, dict) else convert_to_openai_tool(t) for t in request.tools]
        system = [request.system_message] if request.system_message is not None else []
        prefix = to_chat_messages(system, tools, tool_choice_name(request.tool_choice))
        if prefix:
            self.memory.set_prefix(thread, prefix)
        self.memory.schedule(thread)
        _, rows = self.memory.context_rows(thread)
        live = {m.id: m for m in request.messages}
        prompt = [live.get(r.key) or from_chat(r.as_chat(), r.key) for r in rows]
        stored = {r.key for r in rows}
        known = {m.key for m in self.memory.transcript(thread)}
        # Messages another middleware added after before_model have no row yet: keep them, in order.
        prompt += [m for m in request.messages if m.id not in stored and m.id not in known]
        return request.override(model=model.with_session(thread), messages=prompt)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        return handler(self._prepare(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        return await handler(await asyncio.to_thread(self._prepare, request))
