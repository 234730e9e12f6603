"""Teacher time of one absorption round over a long history: read once (KV cache) vs once per probe and segment.

Takes the first 1k and 3k tokens of a long dev session (persona facts, then
real chat), and runs one round's teacher work on them with the default
settings (8 probes, recitation, logit KL) and one training step, twice per
case in the same process: with the shared context read once
(`SHARED_PREFIX_TOKENS` = 256, the default) and with it read once per probe
and per sync segment (the threshold set out of reach, the former behaviour).
Two cases: a streaming round (probes chained after the following turns) and
probes answered in one batch over the same history (no following turns, as
one-shot `absorb()` does). The initial loss must agree, since the sync text
and the targets are the same up to float rounding.

    python benchmarks/shared_prefix.py --threads 2 --json bench-out/shared_prefix.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from absorber_memory import absorber, generation
from absorber_memory.bench.cli import LONG_STREAMING, STREAMING
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine


def split_at(engine: AbsorptionEngine, messages: list[dict[str, str]], tokens: int) -> int:
    """How many leading messages hold about `tokens` tokens."""
    total = 0
    for k, m in enumerate(messages):
        total += engine.fmt.count(m)
        if total >= tokens:
            return k + 1
    return len(messages)


def one_round(engine: AbsorptionEngine, chat, count: int, chained: bool, shared: int) -> dict:
    absorber.SHARED_PREFIX_TOKENS = generation.SHARED_PREFIX_TOKENS = shared
    engine.reset_adapter()
    context = chat.messages[:count]
    following = chat.messages[count : count + 6] if chained else None
    start = time.perf_counter()
    report = engine.run_round(chat.prefix, context, [], n_probes=engine.config.probe_count, following=following,
                              base_teacher=True)
    return {"seconds": time.perf_counter() - start, "teacher_seconds": report.teacher_seconds,
            "initial_loss": report.initial_loss, "sync_tokens": report.sync_tokens,
            "context_tokens": report.context_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1024, 3072])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = AbsorptionEngine(config=dict(num_threads=args.threads, max_steps=1))
    st = STREAMING["full"]
    chat = agent_chats(st["dev"], st["chat_messages"], chitchat_seed=1, queries=st["queries"],
                       chats=LONG_STREAMING["full"]["chats"])[0]
    default = generation.SHARED_PREFIX_TOKENS
    rows = []
    print("| history tokens | probes | read per probe / segment: teacher s | read once: teacher s | speed-up | "
          "initial loss (per / once) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        count = split_at(engine, chat.messages, tokens)
        for chained in (True, False):
            old = one_round(engine, chat, count, chained, 10**9)
            new = one_round(engine, chat, count, chained, default)
            rows.append({"tokens": tokens, "chained": chained, "per_segment": old, "once": new})
            print(f"| {old['context_tokens']} | {'chained' if chained else 'batched'} | "
                  f"{old['teacher_seconds']:.1f} | {new['teacher_seconds']:.1f} | "
                  f"{old['teacher_seconds'] / new['teacher_seconds']:.1f}x | "
                  f"{old['initial_loss']:.4f} / {new['initial_loss']:.4f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/shared_prefix.py", "threads": args.threads,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
