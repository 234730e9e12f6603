"""Can a round tell, before training, whether the absorbed turns still matter? (tuning data, not reported)

On long dev sessions (persona facts, then 12 real chats, about 4k tokens), the turns that left the
window are C and the last turns that fit `--window` tokens stay in the prompt. Per session:

- `truncation_kl`: what dropping C costs on the held-out questions (per-token KL of the window-only
  model to the full-context model along its answers, as `bench streaming` scores it);
- `window_kl`: the per-token KL(with C || without C) of the frozen model over the window's own turns;
- `round_logit_kl` and `round_l1`: the step-0 loss of a one-shot round (the frozen model teaching, the
  window's first `--sync` tokens of turns and the probes as sync text) with logit KL alone and with L1
  alone, the numbers a round has in hand before its first update.

A signal worth gating absorption on ranks the sessions as `truncation_kl` does.

    python benchmarks/dev_relevance_signal.py --sessions 100 101 102 103 104 105 --json bench-out/relevance.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from absorber_memory.bench.data import Conversation
from absorber_memory.bench.experiments import capped
from absorber_memory.bench.methods import references, score
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.losses import logit_kl_loss
from absorber_memory.models import DEFAULT_MODEL


def split_window(engine: AbsorptionEngine, messages: list, tokens: int) -> tuple[list, list]:
    """(C, window): the window is the last whole messages that fit in `tokens`."""
    used, start = 0, len(messages)
    while start > 0 and used + engine.fmt.count(messages[start - 1]) <= tokens:
        start -= 1
        used += engine.fmt.count(messages[start])
    return messages[:start], messages[start:]


def window_kl(engine: AbsorptionEngine, prefix: list, context: list, window: list) -> float:
    """Mean KL(with C || without C) of the frozen model's next-token distributions over the window's tokens."""
    with_c = engine.fmt.encode(prefix, context + window)
    without = engine.fmt.encode(prefix, window)
    n = len(without) - len(engine.fmt.encode(prefix, []))
    device = next(engine.model.parameters()).device
    with torch.no_grad(), engine.adapter_disabled():
        a = engine.model(input_ids=torch.tensor([with_c], device=device)).logits[0, -n:-1]
        b = engine.model(input_ids=torch.tensor([without], device=device)).logits[0, -n:-1]
    return float(logit_kl_loss(b, a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[100, 101, 102, 103, 104, 105])
    parser.add_argument("--window", type=int, default=256, help="tokens of recent turns kept in the prompt")
    parser.add_argument("--sync", type=int, default=256, help="tokens of the window's first turns a round trains on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = AbsorptionEngine(
        DEFAULT_MODEL,
        config=dict(num_threads=args.threads, show_progress=False, max_steps=1, sync_recitation="off"),
    )
    rows = []
    for chat in agent_chats(args.sessions, 14, chitchat_seed=1, queries=6, chats=12):
        context, window = split_window(engine, chat.messages, args.window)
        conv = Conversation(chat.name, "agent", context, window, chat.queries, chat.keywords, chat.prefix, chat.cues)
        refs = references(engine, conv, 24)
        trunc = score(engine, conv, refs, chat.prefix, with_context=False, adapter=False, max_new_tokens=24)
        row = {
            "chat": chat.name,
            "context_tokens": len(engine.fmt.encode([], context)),
            "truncation_kl": trunc["kl_sum"] / trunc["tokens"],
            "window_kl": window_kl(engine, chat.prefix, context, window),
        }
        following = capped(engine, window, args.sync)
        for name, losses in (("round_logit_kl", {"logit_kl": 1.0}), ("round_l1", {"l1": 1.0})):
            engine.reconfigure(losses=losses)
            report = engine.run_round(
                chat.prefix, context, [], n_probes=engine.config.probe_count, following=following, base_teacher=True
            )
            row[name] = report.initial_loss
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"window": args.window, "sync": args.sync, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
