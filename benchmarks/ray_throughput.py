"""Absorption jobs per hour: `LocalExecutor` against `RayExecutor` with 1 and 2 workers, side by side.

    python benchmarks/ray_throughput.py                       # the embedded model
    python benchmarks/ray_throughput.py --model tiny          # the in-process test model (a smoke run)

Every row absorbs the same work: `--sessions` sessions, each overflowing its
window `--rounds` times (so later jobs continue an adapter and ship it to the
worker). Per row it reports wall seconds from the first message to the last
commit, jobs per hour, the mean time a job spends outside training
(`finished - started - seconds`: preparing, shipping, writing, committing),
and what Ray adds on top of the local executor's; the bytes an adapter moves
each way; adapter size and sessions per GB. Prints a markdown table and
writes `ray-throughput.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absorber_memory import AbsorberMemory, RayExecutor
from absorber_memory.models import DEFAULT_MODEL
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.ray_executor import pack_folder

CHAT = [
    ("user", "Hi, I'm {name}. I live in {city} and I work as a {job}."),
    ("assistant", "Nice to meet you, {name}! How is life in {city}?"),
    ("user", "Busy. My sister {sister} visits next week and we plan a trip to the coast."),
    ("assistant", "That sounds lovely. Do you know where on the coast you will go?"),
]
PEOPLE = [
    ("Ana", "Lisbon", "nurse", "Rita"),
    ("Ben", "Leeds", "chemist", "Jo"),
    ("Chloe", "Quebec", "luthier", "Mia"),
    ("Dev", "Pune", "pilot", "Asha"),
]


def run_row(name: str, model: str, config: dict, sessions: int, rounds: int, root: Path, executor=None) -> dict:
    memory = AbsorberMemory(model, config=config, data_dir=root / name, executor=executor)
    started = time.monotonic()
    try:
        for r in range(rounds):
            for k in range(sessions):
                who, city, job, sister = PEOPLE[k % len(PEOPLE)]
                turns = [{"role": role, "content": t.format(name=who, city=city, job=job, sister=sister) + f" ({r})"}
                         for role, t in CHAT]  # fmt: skip
                memory.add_messages(turns, session_id=f"s{k}")
        jobs = memory.flush()
        wall = time.monotonic() - started
        failed = [j for j in jobs if j.status != "done"]
        if failed:
            raise SystemExit(f"{name}: {len(failed)} jobs did not finish: {failed[0].error}")
        outside = [j.finished - j.started - j.metrics["seconds"] for j in jobs]
        adapters = [memory.adapter_path(f"s{k}") for k in range(sessions)]
        sizes = [sum(len(b) for b in pack_folder(a).values()) for a in adapters]
        weights = [(a / ADAPTER_WEIGHTS).stat().st_size for a in adapters]
        return {
            "row": name,
            "jobs": len(jobs),
            "wall_s": wall,
            "jobs_per_hour": len(jobs) / wall * 3600,
            "train_s_mean": statistics.mean(j.metrics["seconds"] for j in jobs),
            "outside_training_s_mean": statistics.median(outside),  # median: a first job also loads the model
            "adapter_folder_bytes": statistics.mean(sizes),
            "adapter_weights_bytes": statistics.mean(weights),
            "workers": sorted({j.metrics.get("worker", "local") for j in jobs}),
        }
    finally:
        memory.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="name, path, or 'tiny'")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="absorber-ray-bench-"))
    model = args.model
    if model == "tiny":
        from absorber_memory.testing import tiny_model_and_tokenizer

        m, t = tiny_model_and_tokenizer()
        m.save_pretrained(root / "tiny")
        t.save_pretrained(root / "tiny")
        model = str(root / "tiny")
    # Windows small enough that each round of four turns overflows once.
    config = {"window_tokens": 64, "absorb_tokens": 48, "sync_tokens": 48, "max_steps": args.max_steps,
              "probe_count": 4, "num_threads": 2}  # fmt: skip
    rows = [run_row("local (2 threads)", model, config, args.sessions, args.rounds, root)]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        threads = 2 // workers
        started = time.monotonic()
        executor = RayExecutor(workers=workers, cpus_per_worker=threads, num_threads=threads)
        startup = time.monotonic() - started
        cfg = {**config, "num_threads": threads}
        row = run_row(f"ray, {workers} worker(s) x {threads} thread(s)", model, cfg, args.sessions, args.rounds, root,
                      executor)  # fmt: skip
        row["executor_start_s"] = startup
        rows.append(row)
    ray.shutdown()
    local = rows[0]["outside_training_s_mean"]
    for row in rows:
        row["ray_overhead_s"] = row["outside_training_s_mean"] - local
    print(f"model {args.model}; {args.sessions} sessions x {args.rounds} rounds; max_steps {args.max_steps}\n")
    print("| executor | jobs | wall s | jobs/hour | train s/job | outside training s/job (median) | overhead vs local s/job "
          "| adapter MB | sessions per GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mb = r["adapter_folder_bytes"] / 1e6
        print(f"| {r['row']} | {r['jobs']} | {r['wall_s']:.0f} | {r['jobs_per_hour']:.0f} | {r['train_s_mean']:.1f} "
              f"| {r['outside_training_s_mean']:.2f} | {r['ray_overhead_s']:+.2f} | {mb:.2f} | {1e3 / mb:.0f} |")
    print("\nbytes moved per job on Ray: the previous adapter to the worker and the new one back, "
          f"{rows[1]['adapter_folder_bytes'] / 1e6:.2f} MB each way (the first round ships none to the worker)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray-throughput.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
