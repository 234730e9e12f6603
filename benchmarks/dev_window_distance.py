"""Does a round trained right after C over-apply it once the window has grown? (tuning data, not reported)

A streaming round trains on the turns right after C (the window's first `--sync` tokens) and probes
after them, so its adapter learns what C does to text close to it. Questions asked later come after
a longer window, where the full-context model leans on C less. On long dev sessions (persona facts,
then `--chats` real chats, 12 by default: about 4k tokens), with the last `--window` tokens of turns kept
in the prompt and the rest as C, per session (`--recipe plain` by default: L1 on hidden states, probes,
no recitation; `--recipe defaults`: the library's defaults):

- `truncation`: the window only, no adapter;
- `near`: one round, frozen teacher, sync text = the window's first `--sync` tokens of turns and the
  probes (what a streaming round sees);
- `near+far`: `near`, then one consolidation whose sync text is the whole window and the probes after
  it (`engine.consolidate(following=window)`), the student continuing from `near`'s adapter;
- `far`: one round from a fresh adapter with the whole window and the probes as sync text;
- `near+far@K`: `near+far` with the consolidation cut to K optimizer steps (`consolidation_steps`; the
  round keeps `max_steps`), since it starts from a trained adapter.

Each is scored as `bench streaming` scores it: per-token KL to the full-context model along its
answers to the held-out questions, and the gap closed against truncation.

    python benchmarks/dev_window_distance.py --sessions 100 101 102 103 --window 1024 --json bench-out/distance.json
    python benchmarks/dev_window_distance.py --sessions 100 101 102 --arms near+far@10 near+far@15 \
        --json bench-out/distance-steps.json
    python benchmarks/dev_window_distance.py --sessions 100 101 --chats 1 --window 256 --recipe defaults \
        --arms near far --json bench-out/distance-short.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from absorber_memory.bench.data import Conversation
from absorber_memory.bench.experiments import capped
from absorber_memory.bench.methods import fact_hits, references, score
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.models import DEFAULT_MODEL
from absorber_memory.stream import fit_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[100, 101, 102, 103])
    parser.add_argument("--window", type=int, default=1024, help="tokens of recent turns kept in the prompt")
    parser.add_argument("--sync", type=int, default=128, help="tokens of the window's first turns a round trains on")
    parser.add_argument("--arms", nargs="+", default=["near", "near+far", "far"])
    parser.add_argument("--chats", type=int, default=12, help="real chats after the facts (1: the short sessions)")
    parser.add_argument(
        "--recipe",
        choices=["plain", "defaults"],
        default="plain",
        help="plain: L1, probes, no recitation; defaults: the library's defaults (recitation, logit KL)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = dict(sync_recitation="off", losses={"l1": 1.0}) if args.recipe == "plain" else {}
    engine = AbsorptionEngine(DEFAULT_MODEL, config=dict(num_threads=args.threads, show_progress=False, **plain))
    rows = []
    for chat in agent_chats(args.sessions, 14, chitchat_seed=1, queries=6, chats=args.chats):
        messages = chat.messages
        start = fit_window([engine.fmt.count(m) for m in messages], [m["role"] for m in messages], args.window)
        context, window = messages[:start], messages[start:]
        conv = Conversation(chat.name, "agent", context, window, chat.queries, chat.keywords, chat.prefix, chat.cues)
        refs = references(engine, conv, 24)

        def kl(result: dict) -> float:
            return result["kl_sum"] / result["tokens"]

        scored = score(engine, conv, refs, chat.prefix, with_context=False, adapter=False, max_new_tokens=24)
        trunc = kl(scored)
        row: dict = {
            "chat": chat.name,
            "context_tokens": len(engine.fmt.encode([], context)),
            "window_tokens": sum(engine.fmt.count(m) for m in window),
            "truncation_kl": trunc,
            "full_hits": fact_hits(refs, [r.answer for r in refs]),
            "truncation_hits": fact_hits(refs, scored["answers"]),
        }
        near = capped(engine, window, args.sync)
        n = engine.config.probe_count
        for arm in args.arms:
            engine.reset_adapter()
            began = time.perf_counter()
            kind, _, cut = arm.partition("@")
            if kind in ("near", "near+far"):
                engine.run_round(chat.prefix, context, [], n_probes=n, following=near, base_teacher=True)
            if kind == "near+far":
                engine.config.consolidation_steps = int(cut) if cut else None  # None: max_steps
                engine.consolidate(chat.prefix, context, following=window)
            if arm == "far":
                engine.run_round(chat.prefix, context, [], n_probes=n, following=window, base_teacher=True)
            seconds = time.perf_counter() - began
            scored = score(engine, conv, refs, chat.prefix, with_context=False, adapter=True, max_new_tokens=24)
            value = kl(scored)
            row[arm] = {
                "kl": value,
                "gap_closed": 1 - value / trunc,
                "seconds": seconds,
                "hits": fact_hits(refs, scored["answers"]),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"window": args.window, "sync": args.sync, "recipe": args.recipe, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
