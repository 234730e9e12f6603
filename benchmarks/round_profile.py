"""Where a long session's idle round spends its time: torch profiler over one real round, by kind of work.

Streams one `bench streaming --long` session through `AbsorberMemory` at the cheap long-session
settings of `attention_ab.py` and profiles `Absorber.train` (the teacher's probe answers and targets,
then every step). Prints the round's seconds, the share of self CPU time of aten ops in each kind of
work (`step_profile.category`) and the ops that took the most time, by input shapes. The profiler
slows a round by 15-25%; read shares, not seconds.

    python benchmarks/round_profile.py --split test --persona 0 --json bench-out/round_profile.json
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import torch
from attention_ab import round_parser, run_around_train
from step_profile import category


def main() -> None:
    parser = round_parser(__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    captured: dict[str, Any] = {}

    def profiling(train: Any) -> Any:
        def profiled(self: Any, *a: Any, **k: Any) -> Any:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                start = time.perf_counter()
                report = train(self, *a, **k)
                captured["wall"] = time.perf_counter() - start
            captured["prof"] = prof
            return report

        return profiled

    row = run_around_train(profiling, args.model, args.split, args.persona, args.threads)
    vocab, rank = 49152, 16  # SmolLM2's vocabulary; the default LoRA rank
    kinds: collections.Counter[str] = collections.Counter()
    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for event in captured["prof"].key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::"):
            kinds[category(event.key, event.input_shapes, vocab, rank)] += event.self_cpu_time_total
            op = f"{event.key} {event.input_shapes}"
            ops[op] += event.self_cpu_time_total
            calls[op] += event.count
    total = sum(kinds.values())
    print(f"{row['chat']}: round {captured['wall']:.1f} s under the profiler (teacher {row['teacher_s']:.1f} s)")
    for kind, us in kinds.most_common():
        print(f"  {kind:<28} {100 * us / total:5.1f}%  {us / 1e6:6.1f} s")
    print("ops with the most self time:")
    for op, us in ops.most_common(args.top):
        print(f"  {us / 1e6:6.2f} s  {calls[op]:5d} calls  {op[:150]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "round": row,
                    "profiled_seconds": captured["wall"],
                    "share": {k: v / total for k, v in kinds.most_common()},
                    "top_ops": [
                        {"op": op, "seconds": us / 1e6, "calls": calls[op]} for op, us in ops.most_common(args.top)
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
