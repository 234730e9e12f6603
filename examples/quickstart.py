"""Quickstart: stream a chat through ParametricMemory, then ask about absorbed turns.

    python examples/quickstart.py

Uses the embedded default model (SmolLM2-135M-Instruct) on CPU or GPU.
"""

from absorber_memory import AbsorberConfig, ParametricMemory, fidelity

# A small window so the first turns overflow and get absorbed.
memory = ParametricMemory(config=AbsorberConfig(window_tokens=96, absorb_tokens=64, show_progress=True))
memory.add_messages([{"role": "system", "content": "You are a helpful assistant."}])

chat = [
    ("user", "Hi, I'm Jonas. I live in Ghent and I restore old bicycles for a living."),
    ("assistant", "Nice to meet you, Jonas! Restoring bicycles sounds rewarding."),
    ("user", "It is. My daughter Ines turns seven next Friday and wants a red bike."),
    ("assistant", "Then a red bike it is! Happy early birthday to Ines."),
    ("user", "By the way, what's a good book for a long train ride?"),
]
for role, content in chat:
    for report in memory.add_message(role, content):
        print(f"absorbed {report.context_tokens} tokens in {report.steps} steps ({report.seconds:.1f} s)")

print("still in the prompt:", [m["content"][:40] for m in memory.window])
question = [{"role": "user", "content": "What is my daughter's name?"}]
print("answer:", memory.generate(memory.context_messages()[:1] + memory.window + question, max_new_tokens=40))

report = fidelity(memory, ["Where do I live?", "What do I do for work?"])
print(f"fidelity gap closed on held-out questions: {report.gap_closed:.1%}")
memory.save("jonas-memory")  # jonas-memory/adapter is a plain PEFT folder
