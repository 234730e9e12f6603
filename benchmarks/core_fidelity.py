"""Core acceptance benchmark: absorb a ~230-token persona chat, measure held-out fidelity and time.

Absorbs the demo's persona conversation with self-generated probes only (no
later turns), then measures KL(full || absorbed) and KL(full || dropped) on
held-out questions that are never used as probes. Prints a markdown table
and writes JSON. Override any `AbsorberConfig` field with --set key=value.

    python benchmarks/core_fidelity.py --repeats 3 --json bench-out/core.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from absorber_memory import AbsorberConfig, ParametricMemory, fidelity, load_model
from absorber_memory.bench.cli import parse_overrides
from absorber_memory.demo import HELD_OUT_QUERIES, PERSONA_CHAT, SYSTEM_PROMPT


def run_once(model, tokenizer, config: AbsorberConfig) -> dict:
    pm = ParametricMemory(model, tokenizer=tokenizer, config=config)
    report = pm.absorb([{"role": "system", "content": SYSTEM_PROMPT}] + PERSONA_CHAT)
    fid = fidelity(pm, HELD_OUT_QUERIES, context=PERSONA_CHAT, window=[])
    train_seconds = report.seconds - report.teacher_seconds
    row = {
        "context_tokens": report.context_tokens,
        "sync_tokens": report.sync_tokens,
        "steps": report.steps,
        "initial_loss": report.initial_loss,
        "final_loss": report.final_loss,
        "absorb_seconds": report.seconds,
        "teacher_and_probe_seconds": report.teacher_seconds,
        "seconds_per_step": train_seconds / max(report.steps, 1),
        "seconds_per_1k_absorbed_tokens": 1000 * report.seconds / report.context_tokens,
        "kl_absorbed": fid.kl_absorbed,
        "kl_dropped": fid.kl_dropped,
        "gap_closed": fid.gap_closed,
    }
    # Unload the adapter so the next repeat starts from the same base model.
    pm.model.unload()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs with seeds 0..N-1")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. lr=3e-3 max_steps=60")
    parser.add_argument("--json", default=None, help="write raw results here")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    model, tokenizer = load_model(device=overrides.get("device", "auto"), num_threads=overrides.get("num_threads"))
    rows = []
    for seed in range(args.repeats):
        started = time.perf_counter()
        rows.append(run_once(model, tokenizer, AbsorberConfig(**{**overrides, "seed": seed})))
        rows[-1]["wall_seconds_with_eval"] = time.perf_counter() - started
        print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {next(model.parameters()).device}")
    print(f"config overrides: {overrides or 'none (defaults)'}; repeats: {args.repeats}\n")
    print("| figure | mean | min | max |\n| --- | --- | --- | --- |")
    for k in keys + ["context_tokens", "sync_tokens", "steps"]:
        vals = [r[k] for r in rows]
        print(f"| {k} | {statistics.mean(vals):.4g} | {min(vals):.4g} | {max(vals):.4g} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
