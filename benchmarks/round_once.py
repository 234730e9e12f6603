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

import json
import resource
import time
from typing import Any

from attention_ab import round_parser, run_around_train


def main() -> None:
    args = round_parser(__doc__.splitlines()[0]).parse_args()
    seen: dict[str, Any] = {}

    def counting(train: Any) -> Any:
        def counted(self: Any, *a: Any, **k: Any) -> Any:
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            report = train(self, *a, **k)
            seen["train_s"] = time.perf_counter() - start
            seen["train_minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            return report

        return counted

    row = run_around_train(counting, args.model, args.split, args.persona, args.threads)
    shown = {"round_s": row["round_s"], "teacher_s": row["teacher_s"], **seen, "final_loss": row["final_loss"]}
    print(json.dumps(shown))


if __name__ == "__main__":
    main()
