"""Absorption on Ray: several agents' sessions absorbed by Ray workers, adapters exported for vLLM.

    pip install 'absorber-memory[ray]'
    python examples/ray_cluster.py                      # a local Ray cluster, the embedded model
    python examples/ray_cluster.py --model tiny         # the in-process test model: seconds, not minutes
    python examples/ray_cluster.py --address auto       # join the cluster started with `ray start --head`

Each Ray worker loads the base model once (by name or path, so it must be
loadable where the worker runs) and keeps it between jobs. Adapters travel
through Ray's object store; this process writes and commits them. At the end
each session's adapter is exported as a PEFT folder a vLLM server can load
(see docs/serving.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from absorber_memory import AbsorberMemory, RayExecutor
from absorber_memory.models import DEFAULT_MODEL

PEOPLE = [
    ("ana", "Ana", "Lisbon", "restores old bicycles"),
    ("ben", "Ben", "Leeds", "teaches chemistry"),
    ("chloe", "Chloe", "Quebec", "builds violins"),
]


def model_path(name: str, folder: Path) -> str:
    """`name`, or for "tiny" the in-process test model saved to `folder` (Ray workers load it by path)."""
    if name != "tiny":
        return name
    from absorber_memory.testing import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="None: a local cluster; 'auto'; 'host:port'; 'ray://...'")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, HF id, path, or 'tiny'")
    parser.add_argument("--out", default=None, help="where to keep data and exports (default: a temp folder)")
    args = parser.parse_args(argv)

    root = Path(args.out or tempfile.mkdtemp(prefix="absorber-ray-"))
    model = model_path(args.model, root / "tiny-model")
    tiny = args.model == "tiny"
    config = {"window_tokens": 60, "absorb_tokens": 30, "sync_tokens": 30, "max_steps": 8} if tiny else {
        "window_tokens": 160, "absorb_tokens": 96, "sync_tokens": 64, "max_steps": 20
    }  # fmt: skip
    executor = RayExecutor(args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    print(f"Ray workers: {executor.worker_names}")
    started = time.monotonic()
    with AbsorberMemory(model, config=config, data_dir=root / "data", executor=executor) as memory:
        for session, name, city, work in PEOPLE:
            memory.add_messages(
                [
                    {"role": "user", "content": f"Hi, I'm {name}. I live in {city} and I {work}."},
                    {"role": "assistant", "content": f"Nice to meet you, {name}!"},
                    {"role": "user", "content": "Any tips for a long train ride?"},
                    {"role": "assistant", "content": "Bring a good book, snacks and a charged phone."},
                    {"role": "user", "content": "Thanks. What should I cook tonight?"},
                ],
                session_id=session,
            )
        for job in memory.flush():
            print(
                f"job {job.id} [{job.session_id}] {job.status}: {len(job.message_ids)} messages, "
                f"{job.metrics.get('steps')} steps on {job.metrics.get('worker')}, "
                f"{job.metrics.get('seconds', 0):.1f} s, attempts {job.metrics.get('attempts')}"
            )
        for session, *_ in PEOPLE:
            folder = memory.export_adapter(session, root / "exports" / session)
            print(f"{session}: adapter exported to {folder} (a PEFT folder with its manifest)")
    print(f"done in {time.monotonic() - started:.0f} s; data and exports under {root}")


if __name__ == "__main__":
    main()
