"""Where a long session's idle round spends its forwards: each decoder pass, by input shape and gradients.

Streams one `bench streaming --long` session at the cheap long-session settings of `attention_ab.py` and
times every call of the decoder stack (`LlamaModel.forward`, so without the LM head) during the round:
the teacher's phase (reading the history and window, decoding the probe answers) and the training phase
(the teacher's targets, every step's forward, the window refreshes, the final loss). What the forwards
leave of a phase is its backward passes, the LM head, the loss and the optimizer.

    python benchmarks/round_forwards.py --split dev --persona 100
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import torch
from attention_ab import round_parser, run_around_train
from transformers.models.llama import modeling_llama


def main() -> None:
    args = round_parser(__doc__.splitlines()[0]).parse_args()
    calls: list[tuple[tuple[int, ...], bool, float, float]] = []  # shape, gradients, seconds, end
    forward = modeling_llama.LlamaModel.forward

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        ids, start = k.get("input_ids"), time.perf_counter()
        out = forward(self, *a, **k)
        end = time.perf_counter()
        calls.append((tuple(ids.shape) if ids is not None else (), torch.is_grad_enabled(), end - start, end))
        return out

    marks: dict[str, float] = {}

    def marking(train: Any) -> Any:
        def marked(self: Any, *a: Any, **k: Any) -> Any:
            marks["start"] = time.perf_counter()
            report = train(self, *a, **k)
            marks["end"] = time.perf_counter()
            return report

        return marked

    modeling_llama.LlamaModel.forward = timed  # type: ignore[method-assign]
    try:
        row = run_around_train(marking, args.model, args.split, args.persona, args.threads)
    finally:
        modeling_llama.LlamaModel.forward = forward  # type: ignore[method-assign]
    phases = {
        "teacher": (marks["start"] - row["teacher_s"], marks["start"]),
        "training": (marks["start"], marks["end"]),
    }
    result: dict[str, Any] = {"round": row, "phases": {}}
    for name, (begin, end) in phases.items():
        seen = [c for c in calls if begin <= c[3] <= end]
        by: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for shape, grad, seconds, _ in seen:
            key = f"{list(shape)} {'with' if grad else 'without'} gradients"
            by[key][0] += 1
            by[key][1] += seconds
        forwards = sum(c[2] for c in seen)
        print(f"{name}: {end - begin:.1f} s, of which decoder forwards {forwards:.1f} s")
        for key, (count, seconds) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"  {seconds:6.2f} s  {int(count):3d} calls  {key}")
        result["phases"][name] = {"seconds": end - begin, "forwards_s": forwards, "by_shape": dict(by)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
