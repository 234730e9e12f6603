"""One idle round of a long session in a fresh process: its seconds and the page faults it takes.

The same round as `attention_ab.py`'s `new` arm (a `bench streaming --long` session at the cheap
long-session settings). Prints one JSON line: the round's seconds (as the job reports them), the
seconds and minor page faults of `Absorber.train` (teacher targets and steps), and the final loss.
Run it under different environments to compare process-wide settings side by side, e.g. glibc's
allocator thresholds:

    for i in 1 2; do python benchmarks/round_once.py --split test --persona 0; \
        MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/round_once.py --split test --persona 0; done
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from attention_ab import run

from absorber_memory import absorber


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--persona", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    train, seen = absorber.Absorber.train, {}

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        report = train(self, *a, **k)
        seen["train_s"] = time.perf_counter() - start
        seen["train_minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return report

    absorber.Absorber.train = counted  # type: ignore[method-assign]
    try:
        row = run(args.model, args.split, args.persona, "new", args.threads)
    finally:
        absorber.Absorber.train = train  # type: ignore[method-assign]
    shown = {"round_s": row["round_s"], "teacher_s": row["teacher_s"], **seen, "final_loss": row["final_loss"]}
    print(json.dumps(shown))


if __name__ == "__main__":
    main()
