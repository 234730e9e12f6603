"""Held-out probe loss at every step of the streaming rounds of the dev sessions (tuning data, not reported).

Streams each dev session through `ParametricMemory` with the benchmark's window (256 / 128 / 128) and
early stopping that never fires (patience above `max_steps`), so every round records the loss of its
held-out probes at each step: the curve early stopping would read.

    python benchmarks/dev_heldout_curves.py --sessions 2 --max-steps 40 --json bench-out/heldout_curves.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from absorber_memory import AbsorberConfig, ParametricMemory
from absorber_memory.bench.streaming import agent_chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2, help="how many dev sessions (seeds 100, 101)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chats = agent_chats([100, 101][: args.sessions], 14, chitchat_seed=1, queries=6)
    rows = []
    for chat in chats:
        config = AbsorberConfig(
            window_tokens=256,
            absorb_tokens=128,
            sync_tokens=128,
            num_threads=args.threads,
            max_steps=args.max_steps,
            early_stopping_patience=args.max_steps + 1,
        )
        memory = ParametricMemory(config=config)
        memory.add_messages(chat.prefix)
        for message in chat.messages:
            for report in memory.add_messages([message]):
                row = {
                    "chat": chat.name,
                    "teacher": report.teacher,
                    "best_step": report.best_step,
                    "train": [round(x, 4) for x in report.loss_curve],
                    "heldout": [round(x, 4) for x in report.heldout_curve],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
