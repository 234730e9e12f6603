"""A LlamaIndex chat engine whose old turns are absorbed into the session's LoRA adapter.

    pip install 'absorber-memory[llamaindex]'
    python examples/llamaindex_chat_engine.py

`AbsorberMemory` goes where `ChatMemoryBuffer` or `Memory` went: when the
session's window overflows, the oldest turns are absorbed in the background
and leave the prompt; `AbsorberLLM` (the same core and session, from
`memory.as_llm()`) answers with that adapter active. Uses the embedded
default model (SmolLM2-135M-Instruct); a 135M model answers loosely, so the
script also prints the fidelity figure on questions it never trained on.
"""

from llama_index.core.chat_engine import SimpleChatEngine

from absorber_memory import AbsorberMemory as Core
from absorber_memory.demo import DEMO_SETTINGS, FOLLOW_UP, HELD_OUT_QUERIES, PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.metrics import session_fidelity
from llama_index.memory.absorber import AbsorberMemory

# A small window so the first turns overflow. (`AbsorberMemory()` with no arguments also works: it shares
# the process's default core, whose 512-token window takes a longer chat to overflow.)
core = Core(config=dict(DEMO_SETTINGS, show_progress=False, max_new_tokens=48))
core.forget("marta")  # start the example fresh on every run
memory = AbsorberMemory(core, session_id="marta", system=SYSTEM_PROMPT)  # the system prompt is the prefix
engine = SimpleChatEngine.from_defaults(llm=memory.as_llm(), memory=memory)

for message in PERSONA_CHAT + FOLLOW_UP:
    if message["role"] != "user":
        continue
    reply = engine.chat(message["content"])
    print(f"user: {message['content']}\n  ai: {reply.response.strip()[:100]}")
    print(f"  [{len(memory.get())} messages in the prompt, {len(engine.chat_history)} in the history, "
          f"jobs: {[j.status for j in core.jobs('marta')]}]")

print("waiting for background absorption ...")
for job in core.flush():
    print(f"  job {job.id}: {len(job.message_ids)} messages, {job.metrics['steps']} steps, {job.metrics['seconds']:.0f} s")
print("user: What is my cat called?\n  ai:", engine.chat("What is my cat called?").response.strip())
report = session_fidelity(core, "marta", HELD_OUT_QUERIES, max_new_tokens=24)
print(f"fidelity gap closed on held-out questions: {report.gap_closed:.1%} (100% = as if the turns were in the "
      f"prompt; KL to full context {report.kl_absorbed:.3f} absorbed vs {report.kl_dropped:.3f} dropped)")
print("adapter (PEFT folder, loadable by vLLM):", core.adapter_path("marta"))
core.close()
