"""A LangChain v1 agent whose old turns are absorbed into a per-thread LoRA adapter.

    pip install 'absorber-memory[langchain]'
    python examples/langchain_agent.py

`AbsorptionMiddleware` takes the place of `SummarizationMiddleware`: when the
thread's window overflows, the oldest turns leave `state["messages"]` and are
absorbed in the background into the thread's adapter; the model (a
`ChatAbsorber` on the same core) answers with that adapter active. Uses the
embedded default model (SmolLM2-135M-Instruct); a 135M model answers
loosely, so the script also prints the fidelity figure.
"""

from langchain.agents import create_agent
from langgraph.checkpoint.memory import InMemorySaver

from absorber_memory import AbsorberMemory
from absorber_memory.metrics import session_fidelity
from langchain_absorber import AbsorptionMiddleware, ChatAbsorber


# A small window so the first turns overflow; absorption runs in the background.
memory = AbsorberMemory(config={"window_tokens": 160, "absorb_tokens": 128, "sync_tokens": 64, "max_new_tokens": 48})
agent = create_agent(
    model=ChatAbsorber(memory=memory),
    # tools=[...] work too (calls in the `<tool_call>` JSON format, see integrations/README.md); a 135M
    # model calls tools poorly and the tool list makes every prompt and absorption longer, so none here.
    system_prompt="You are a friendly assistant who remembers what the user tells you.",
    middleware=[AbsorptionMiddleware(memory)],
    checkpointer=InMemorySaver(),  # the thread's live window; the core keeps the rest
)
thread = {"configurable": {"thread_id": "marta"}}

for text in [
    "Hi! My name is Marta Okafor and I just moved to Valencia for a new job.",
    "I'm a marine biologist at the city aquarium. I study octopuses, mostly.",
    "At home I have a grey cat called Pixel who is fourteen years old.",
    "My sister Lena is getting married on the 3rd of June in Porto.",
    "I'm allergic to peanuts, so I need to check the wedding menu carefully.",
    "Anyway, I've been reading a lot of science fiction lately.",
]:
    state = agent.invoke({"messages": [{"role": "user", "content": text}]}, thread)
    print(f"user: {text}\n  ai: {state['messages'][-1].content.strip()[:100]}")
    print(f"  [{len(state['messages'])} messages in the state, jobs: {[j.status for j in memory.jobs('marta')]}]")

print("waiting for background absorption ...")
for job in memory.flush():
    print(f"  job {job.id}: {len(job.message_ids)} messages, {job.metrics['steps']} steps, {job.metrics['seconds']:.0f} s")
state = agent.invoke({"messages": [{"role": "user", "content": "What is my cat called?"}]}, thread)
print("ai:", state["messages"][-1].content.strip())
report = session_fidelity(memory, "marta", ["What is my name?", "Where do I live now?", "What do I do for work?",
                                            "What food am I allergic to?"], max_new_tokens=24)
print(f"fidelity gap closed on held-out questions: {report.gap_closed:.1%} (100% = as if the turns were in the "
      f"prompt; KL to full context {report.kl_absorbed:.3f} absorbed vs {report.kl_dropped:.3f} dropped)")
print("adapter (PEFT folder, loadable by vLLM):", memory.adapter_path("marta"))
memory.close()
