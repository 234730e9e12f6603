"""A LlamaIndex agent workflow with `memory=AbsorberMemory(...)`: old turns become adapter weights.

    pip install 'absorber-memory[llamaindex]'
    python examples/llamaindex_agent.py

`AbsorberLLM` has no native function calling (`is_function_calling_model` is
False), so the agent is a `ReActAgent`, which prompts for tool use in text.
The memory travels in the workflow's context like any LlamaIndex memory
(and serializes as ids, never the model: `ctx.to_dict()` works). Uses the
embedded default model (SmolLM2-135M-Instruct): it rarely writes a clean
ReAct step, and the parser takes plain text as the final answer, so the
chat still flows; the script prints the fidelity figure as well.
"""

import asyncio

from llama_index.core.agent.workflow import ReActAgent
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

from absorber_memory import AbsorberMemory as Core
from absorber_memory.demo import DEMO_SETTINGS, FOLLOW_UP, HELD_OUT_QUERIES, PERSONA_CHAT
from absorber_memory.metrics import session_fidelity
from llama_index.memory.absorber import AbsorberMemory


def days_in_weeks(weeks: int) -> int:
    """How many days there are in a number of weeks."""
    return 7 * weeks


async def main() -> None:
    core = Core(config=dict(DEMO_SETTINGS, show_progress=False, max_new_tokens=48))
    core.forget("marta")  # start the example fresh on every run
    memory = AbsorberMemory(core, session_id="marta")
    agent = ReActAgent(tools=[FunctionTool.from_defaults(days_in_weeks)], llm=memory.as_llm())
    ctx = Context(agent)
    for message in PERSONA_CHAT + FOLLOW_UP:
        if message["role"] == "user":
            answer = await agent.run(user_msg=message["content"], memory=memory, ctx=ctx)
            print(f"user: {message['content']}\n  ai: {str(answer).strip()[:100]}")
            print(f"  [{len(await memory.aget())} messages in the prompt's history, "
                  f"jobs: {[j.status for j in core.jobs('marta')]}]")
    print("waiting for background absorption ...")
    for job in await core.aflush():
        print(f"  job {job.id}: {len(job.message_ids)} messages, {job.metrics['steps']} steps, "
              f"{job.metrics['seconds']:.0f} s")
    print("context as JSON (ids and config, no weights):", len(str(ctx.to_dict())), "characters")
    report = session_fidelity(core, "marta", HELD_OUT_QUERIES, max_new_tokens=24)
    print(f"fidelity gap closed on held-out questions: {report.gap_closed:.1%} (KL to full context "
          f"{report.kl_absorbed:.3f} absorbed vs {report.kl_dropped:.3f} dropped)")
    core.close()


asyncio.run(main())
