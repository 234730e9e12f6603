"""Dev-only experiment: which sync text S carries the facts of an agent chat into the adapter (one-shot).

Each dev session (persona facts, then real chat) is split as the streaming path sees it: the last
256 tokens stay in the window, the rest (C) is absorbed in one round by the frozen teacher, then the
benchmark's cued held-out questions are scored (KL to the full-context model along its answers, and
whether the fact is stated). Variants of S, all with the following turns (capped to 128 tokens) and
8 chained probes unless stated:

- `default`: what the library does today;
- `recite`: plus one segment per user message of C, right after the prefix:
  "Remind me what I told you." -> 'You told me: "<the message>"' (`sync_recitation="each"`);
- `after`: the same recitations chained after the following turns, in one segment (`"after"`);
- `aftereach`: one segment per recitation, each after the following turns;
- options `+steps=N`, `+probes=N`, `+per=N` (sync_batch_segments), `+lr=X`, `+ans=N`,
  `+kl=W` (adds the logit KL loss with weight W beside L1).

    python benchmarks/dev_sync_text.py 100,101 default,recite,after,aftereach,default+steps=60

Dev seeds only (the streaming benchmark reports seeds 0-2). Results: BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from absorber_memory.bench.experiments import capped
from absorber_memory.bench.methods import recall_hit
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.generation import generate_text
from absorber_memory.metrics import answer_logprobs, kl_sum, reference_answer
from absorber_memory.probes import recitation_segments

WINDOW = 256


def main(seeds: list[int], variants: list[str]) -> None:
    torch.set_num_threads(2)
    eng = AbsorptionEngine(config=dict(device="cpu", num_threads=2))

    def split(messages):
        window, used = [], 0
        for m in reversed(messages):
            used += eng.fmt.count(m)
            if used > WINDOW:
                break
            window.insert(0, m)
        return messages[: len(messages) - len(window)], window

    def ask(chat, messages, i):
        ids = eng.fmt.encode(
            chat.prefix, messages + [{"role": "user", "content": chat.queries[i]}], add_generation_prompt=True
        )
        return ids + eng.tokenizer.encode(chat.cues[i], add_special_tokens=False)

    def score(chat, window, refs, adapter):
        kl = tokens = both = 0
        answers = []
        with contextlib.nullcontext() if adapter else eng.adapter_disabled():
            for i, (target, logprobs, right) in enumerate(refs):
                ids = ask(chat, window, i)
                kl += kl_sum(logprobs, answer_logprobs(eng.model, ids, target))
                tokens += len(target)
                answer = generate_text(eng.model, eng.tokenizer, ids, 12)
                both += right and recall_hit(answer, chat.keywords[i])
                answers.append(answer)
        return kl, both, answers

    pooled: dict[str, list[float]] = {}
    for chat in agent_chats(seeds, 14, 1, 6):
        context, window = split(chat.messages)
        refs = []
        with eng.adapter_disabled():
            for i in range(len(chat.queries)):
                answer, target, logprobs = reference_answer(eng.model, eng.tokenizer, ask(chat, chat.messages, i), 12)
                text = eng.tokenizer.decode(answer, skip_special_tokens=True)
                refs.append((target, logprobs, recall_hit(text, chat.keywords[i])))
        right = sum(r[2] for r in refs)
        base_kl, _, _ = score(chat, window, refs, False)
        tokens = sum(eng.fmt.count(m) for m in context)
        print(f"{chat.name}: C {len(context)} messages, {tokens} tokens; full context states {right} facts", flush=True)
        for variant in variants:
            name, *opts = variant.split("+")
            opt = dict(o.split("=") for o in opts)
            probes = int(opt.get("probes", 8))
            over = {"max_steps": int(opt.get("steps", 30)), "probe_count": probes}
            for key, field, kind in (("per", "sync_batch_segments", int), ("lr", "lr", float)):
                if key in opt:
                    over[field] = kind(opt[key])
            over["losses"] = {"l1": 1.0, **({"logit_kl": float(opt["kl"])} if "kl" in opt else {})}
            if "ans" in opt:
                over["probe_max_new_tokens"] = int(opt["ans"])
            eng.reconfigure(**over)
            following = capped(eng, window, 128)
            segments = {
                "default": [],
                "recite": recitation_segments(context, "each"),
                "after": recitation_segments(context, "after", following),
                "aftereach": [following + r for r in recitation_segments(context, "each")],
            }[name]
            start = time.perf_counter()
            report = eng.run_round(
                chat.prefix, context, segments, n_probes=probes, following=following, base_teacher=True
            )
            seconds = time.perf_counter() - start
            kl, both, answers = score(chat, window, refs, True)
            print(
                f"  {variant}: gap closed {1 - kl / base_kl:.3f}, facts {both}/{right}, {seconds:.0f} s, "
                f"S {report.sync_tokens} tokens, loss {report.initial_loss:.3f} -> {report.final_loss:.3f}",
                flush=True,
            )
            print("     ", [a[:40] for a in answers], flush=True)
            row = pooled.setdefault(variant, [0.0, 0.0, 0.0, 0.0])
            for k, v in enumerate((kl, base_kl, both, right)):
                row[k] += v
    for variant, (kl, base_kl, both, right) in pooled.items():
        print(f"pooled {variant:30s} gap closed {1 - kl / base_kl:.3f}  facts {both:.0f}/{right:.0f}")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1].split(",")], sys.argv[2].split(","))
