"""`RunnableWithMessageHistory` over absorber-memory: a bounded history, old turns in the weights.

    pip install 'absorber-memory[langchain]'
    python examples/langchain_history.py

`session_history(memory)` is the `get_session_history` factory: each
session's `messages` is its system prefix plus the unabsorbed window, and
adding messages queues absorption of the overflow into that session's
adapter, which the `ChatAbsorber` (bound to the session at call time) uses.
"""

import warnings

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import ConfigurableField
from langchain_core.runnables.history import RunnableWithMessageHistory

from absorber_memory import AbsorberMemory
from langchain_absorber import ChatAbsorber, session_history

warnings.filterwarnings("ignore", message="RunnableWithMessageHistory is deprecated")

memory = AbsorberMemory(config={"window_tokens": 160, "absorb_tokens": 128, "sync_tokens": 64, "max_new_tokens": 40})
SYSTEM = "You are a friendly assistant who remembers what the user tells you."
# The system prompt lives in the history (as the session's prefix, never absorbed), not in the template.
prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")])
# The session id picks the adapter: expose it as a configurable field of the model.
model = ChatAbsorber(memory=memory).configurable_fields(session_id=ConfigurableField(id="session_id"))
chain = RunnableWithMessageHistory(prompt | model, session_history(memory, system=SYSTEM),
                                   input_messages_key="question", history_messages_key="history")
config = {"configurable": {"session_id": "jonas"}}

for question in [
    "Hi, I'm Jonas. I live in Ghent and I restore old bicycles for a living.",
    "My daughter Ines turns seven next Friday and wants a red bike.",
    "I also play the cello in a small orchestra on Thursdays.",
    "What's a good book for a long train ride?",
]:
    answer = chain.invoke({"question": question}, config=config)
    print(f"user: {question}\n  ai: {answer.content.strip()[:100]}")

memory.flush()
history = session_history(memory)("jonas")
print(f"in the prompt now: {len(history.messages)} messages; absorbed: "
      f"{sum(m.absorbed for m in memory.transcript('jonas'))} (adapter {memory.adapter_path('jonas')})")
print("ai:", chain.invoke({"question": "What is my daughter's name?"}, config=config).content.strip())
memory.close()
