"""Dev-only check: how often the full-context model states a persona fact, asked plainly or with an answer cue.

The streaming benchmark's questions (`persona_conversation(seed, cued=True)`) end with the start of the
answer ("Your name is"); this script measures what that changes for the default model, on dev seeds only
(100-107, never the reported test seeds). Results: BENCHMARKS.md.

    python benchmarks/dev_question_cues.py
"""

from __future__ import annotations

import torch

from absorber_memory.bench.methods import recall_hit
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.generation import generate_text


def main() -> None:
    torch.set_num_threads(2)
    engine = AbsorptionEngine(config=dict(device="cpu", num_threads=2))
    hits = {"plain": 0, "cued": 0}
    asked = 0
    for chat in agent_chats(list(range(100, 108)), 14, 1, 6):
        for query, keywords, cue in zip(chat.queries, chat.keywords, chat.cues, strict=True):
            asked += 1
            ids = engine.fmt.encode(
                chat.prefix, chat.messages + [{"role": "user", "content": query}], add_generation_prompt=True
            )
            for mode, prompt in (
                ("plain", ids),
                ("cued", ids + engine.tokenizer.encode(cue, add_special_tokens=False)),
            ):
                with engine.adapter_disabled():
                    answer = generate_text(engine.model, engine.tokenizer, prompt, 12)
                hit = recall_hit(answer, keywords)
                hits[mode] += hit
                shown = cue if mode == "cued" else ""
                print(f"{mode:5s} {'+' if hit else '-'} {query} [{keywords[0]}] | {shown} {answer}")
    print(f"full-context answers stating the fact: plain {hits['plain']}/{asked}, cued {hits['cued']}/{asked}")


if __name__ == "__main__":
    main()
