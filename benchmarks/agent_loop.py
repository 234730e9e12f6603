"""Agent-loop benchmark: N sessions take turns while absorption runs in the background.

Each turn of a session adds a user message, generates the answer with that
session's adapter, and stores the answer; sessions take turns round-robin
like agents serving several users. The same loop runs twice on fresh data
directories: with background absorption (`auto_absorb=True`) and without
(`auto_absorb=False`: windows just grow). Reports turn latency p50/p95 for
both, the absorption backlog (queued + running jobs) over time, the time to
drain the backlog afterwards, and the adapter switch cost (warm: already
loaded; cold: loaded from disk after LRU eviction).

    python benchmarks/agent_loop.py --sessions 4 --turns 8 --json bench-out/agent_loop.json
    python benchmarks/agent_loop.py --tiny   # seconds, on the in-process test model
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from absorber_memory import AbsorberConfig, AbsorberMemory, load_model
from absorber_memory.bench.cli import parse_overrides
from absorber_memory.layout import session_key
from absorber_memory.testing import tiny_model_and_tokenizer

NAMES = ["Ana", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana"]
CITIES = ["Lisbon", "Oslo", "Lima", "Tokyo", "Accra", "Quito", "Riga", "Perth"]
TOPICS = ["my job as a nurse", "my cat Miso", "my sister's wedding", "learning the violin",
          "a trip to the mountains", "cooking pasta", "my new flat", "a book about whales"]


def user_turn(session: int, turn: int) -> str:
    name, city = NAMES[session % len(NAMES)], CITIES[session % len(CITIES)]
    topic = TOPICS[(session + turn) % len(TOPICS)]
    return f"I'm {name} from {city}. Today I want to talk about {topic}; it matters to me ({turn})."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prompt_tokens(memory: AbsorberMemory, session_id: str) -> int:
    """Tokens of the window messages a prompt holds now (what fits `context_tokens`; the prefix not counted)."""
    _, rows = memory.context_rows(session_id)
    return sum(memory.fmt.count(m.as_chat()) for m in rows)


def run_loop(make, sessions: int, turns: int, background: bool) -> dict:
    memory = make(background)
    latencies, backlog = [], []
    start = time.perf_counter()
    for t in range(turns):
        for s in range(sessions):
            sid = f"user-{s}"
            began = time.perf_counter()
            memory.add_message("user", user_turn(s, t), session_id=sid)
            answer = memory.generate(session_id=sid) or "..."
            memory.add_message("assistant", answer, session_id=sid)
            latencies.append(time.perf_counter() - began)
            pending = [j for j in memory.jobs() if j.pending]
            backlog.append({"t": round(time.perf_counter() - start, 2), "pending_jobs": len(pending),
                            "running": sum(j.status == "running" for j in pending),
                            "window_tokens": memory.window_tokens(sid),
                            "prompt_tokens": prompt_tokens(memory, sid)})
    loop_seconds = time.perf_counter() - start
    drained = time.perf_counter()
    memory.flush()
    drain_seconds = time.perf_counter() - drained
    jobs = [j for j in memory.jobs() if j.status == "done"]
    rounds = [j for j in jobs if j.kind == "round"]
    absorbed = sum(j.metrics.get("context_tokens", 0) for j in rounds)
    result = {
        "background_absorption": background,
        "turns": len(latencies),
        "turn_p50_s": percentile(latencies, 0.5),
        "turn_p95_s": percentile(latencies, 0.95),
        "turn_mean_s": statistics.fmean(latencies),
        "loop_seconds": loop_seconds,
        "drain_seconds_after_loop": drain_seconds,
        "jobs_done": len(jobs),
        "mean_job_seconds": statistics.fmean([j.metrics["seconds"] for j in jobs]) if jobs else 0.0,
        "rounds_done": len(rounds),
        "consolidations_done": len(jobs) - len(rounds),
        "absorption_seconds": sum(j.metrics["seconds"] for j in jobs),
        "absorbed_tokens": absorbed,
        # Absorbed tokens per second of wall time from the first turn until the backlog is drained.
        "sustained_tokens_per_s": absorbed / (loop_seconds + drain_seconds) if background else 0.0,
        "max_backlog": max(b["pending_jobs"] for b in backlog),
        "max_window_tokens": max(b["window_tokens"] for b in backlog),  # the unabsorbed window, at most
        # The window the next prompt holds: less than the window while `context_tokens` leaves messages out.
        "max_prompt_tokens": max(b["prompt_tokens"] for b in backlog),
        "backlog": backlog,
        "final_window_tokens": {f"user-{s}": memory.window_tokens(f"user-{s}") for s in range(sessions)},
    }
    if background:
        result["switch"] = measure_switch(memory, sessions)
    memory.close()
    return result


def measure_switch(memory: AbsorberMemory, sessions: int, repeats: int = 20) -> dict:
    """Milliseconds to make a session's adapter active: warm (loaded) and cold (LRU miss, read from disk)."""
    cache = memory.adapters
    ids = [f"user-{s}" for s in range(sessions) if memory.adapter_path(f"user-{s}") is not None]
    if len(ids) < 2:
        return {}

    def switch(sid: str) -> float:
        began = time.perf_counter()
        with memory.adapted_model(sid):
            pass
        return time.perf_counter() - began

    switch(ids[0]), switch(ids[1])
    warm = [switch(ids[i % 2]) for i in range(repeats)]  # both loaded: alternating set_adapter
    cold = []
    for i in range(repeats):  # cycling through more sessions than slots: every switch reloads from disk
        sid = ids[i % len(ids)]
        if len(ids) <= cache.capacity:
            cache.evict(session_key(sid))
        cold.append(switch(sid))
    return {"warm_median_ms": 1000 * statistics.median(warm), "cold_median_ms": 1000 * statistics.median(cold),
            "adapter_sessions": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8, help="turns per session (user + answer)")
    parser.add_argument("--tiny", action="store_true", help="use the in-process test model (seconds)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override AbsorberConfig fields")
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()
    settings = dict(window_tokens=160, absorb_tokens=96, sync_tokens=64, max_steps=10, probe_count=4,
                    probe_max_new_tokens=16, max_new_tokens=24, max_loaded_adapters=2)
    settings.update(parse_overrides(args.set))
    if args.tiny:
        settings.update(window_tokens=60, absorb_tokens=30, sync_tokens=30)

    def make(background: bool) -> AbsorberMemory:
        config = AbsorberConfig(**settings, auto_absorb=background)
        if args.tiny:
            model, tokenizer = tiny_model_and_tokenizer()
        else:
            model, tokenizer = load_model(device=config.device, dtype=config.dtype, num_threads=config.num_threads)
        return AbsorberMemory(model, tokenizer=tokenizer, config=config, data_dir=tempfile.mkdtemp(prefix="agent-loop-"))

    runs = [run_loop(make, args.sessions, args.turns, bg) for bg in (False, True)]
    print(f"| {args.sessions} sessions x {args.turns} turns | turn p50 s | turn p95 s | loop s | max backlog "
          "| max window tokens | max prompt tokens | drain s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        label = "background absorption" if r["background_absorption"] else "no absorption (window grows)"
        print(f"| {label} | {r['turn_p50_s']:.2f} | {r['turn_p95_s']:.2f} | {r['loop_seconds']:.0f} | "
              f"{r['max_backlog']} | {r['max_window_tokens']} | {r['max_prompt_tokens']} | "
              f"{r['drain_seconds_after_loop']:.0f} |")
    bg = runs[1]
    print(f"background: {bg['rounds_done']} rounds + {bg['consolidations_done']} consolidations, "
          f"{bg['absorption_seconds']:.0f} s of absorption, {bg['absorbed_tokens']} tokens absorbed, "
          f"sustained {bg['sustained_tokens_per_s']:.2f} absorbed tokens / s over loop + drain")
    sw = runs[1].get("switch", {})
    if sw:
        print(f"adapter switch: warm {sw['warm_median_ms']:.2f} ms, cold (from disk) {sw['cold_median_ms']:.1f} ms")
    print("final window tokens:", {k: v for r in runs for k, v in [(str(r["background_absorption"]), r["final_window_tokens"])]})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "settings": settings, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
