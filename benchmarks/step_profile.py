"""Where an absorption step's time goes: torch profiler over a few training steps, by kind of work.

Builds one streaming-sized round on the default model (a ~250-token segment
of following turns, one recitation-sized segment, eight probe exchanges) and
profiles `Absorber.train` for a few steps under each loss mix given. Prints,
per mix, seconds per step and the share of self CPU time in: decoder matmuls
(the "useful work" the FLOP/s figures count), the LM head's matmuls, the
LoRA products, attention, the loss terms, the optimizer and the rest.

    python benchmarks/step_profile.py --threads 2
    python benchmarks/step_profile.py --tiny      # seconds, on the in-process test model
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch

from absorber_memory.demo import PERSONA_CHAT, QUESTIONS, SYSTEM_PROMPT
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.testing import tiny_model_and_tokenizer

MIXES: dict[str, dict[str, float]] = {"l1": {"l1": 1.0}, "l1+logit_kl": {"l1": 1.0, "logit_kl": 0.25}}


def round_inputs() -> tuple[list[dict[str, str]], list[dict[str, str]], list[list[dict[str, str]]]]:
    """Prefix, absorbed messages C and sync segments S shaped like a default streaming round."""
    prefix = [{"role": "system", "content": SYSTEM_PROMPT}]
    context = PERSONA_CHAT[:6]
    following = PERSONA_CHAT[6:] + PERSONA_CHAT
    recite = [{"role": "user", "content": "Remind me what I told you."},
              {"role": "assistant", "content": " ".join(m["content"] for m in context if m["role"] == "user")}]
    probes = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": f"{cue} something I read in our chat."}]
        for q, _, cue in QUESTIONS + QUESTIONS[:1]
    ]
    return prefix, context, [following + recite, *probes]


def category(name: str, shapes: Any, vocab: int, rank: int) -> str:
    """The kind of work an aten op with these input shapes is."""
    dims = {d for shape in (shapes or []) if isinstance(shape, list) for d in shape}
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
        if vocab in dims:
            return "lm head matmul"
        if rank in dims:
            return "lora matmul"
        return "decoder matmul"
    if "attention" in name or name.startswith("aten::_flash") or "sdpa" in name:
        return "attention"
    if any(k in name for k in ("softmax", "kl_div", "log_softmax", "exp", "logsumexp")):
        return "softmax / kl"
    if "foreach" in name or "adam" in name.lower() or "clip" in name:
        return "optimizer"
    if any(k in name for k in ("copy_", "cat", "index", "slice", "select", "view", "reshape", "contiguous",
                               "_to_copy", "clone", "empty", "zero", "fill", "stack", "transpose", "expand")):
        return "copies / indexing"
    return "elementwise / norms / other"


def profile(engine: AbsorptionEngine, losses: dict[str, float], steps: int) -> dict[str, Any]:
    engine.reconfigure(losses=losses, max_steps=steps, early_stopping_patience=0)
    prefix, context, segments = round_inputs()
    began = time.perf_counter()
    engine.absorber.train(prefix, context, segments, base_teacher=True)  # warm-up
    print(f"warm-up: {time.perf_counter() - began:.1f} s", flush=True)
    engine.reset_adapter()
    vocab = engine.model.get_base_model().config.vocab_size
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        report = engine.absorber.train(prefix, context, segments, base_teacher=True)
        wall = time.perf_counter() - start
    totals: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::"):
            totals[category(event.key, event.input_shapes, vocab, engine.config.lora_rank)] += event.self_cpu_time_total
    measured = sum(totals.values())
    return {
        "losses": losses,
        "steps": report.steps,
        "sync_tokens": report.sync_tokens,
        "seconds": wall,
        "teacher_seconds": report.teacher_seconds,
        "seconds_per_step": (wall - report.teacher_seconds) / max(1, report.steps),
        "share": {k: v / measured for k, v in totals.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="use the in-process test model (seconds)")
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        engine = AbsorptionEngine(model, tokenizer=tokenizer, config=dict(num_threads=args.threads))
    else:
        engine = AbsorptionEngine(config=dict(num_threads=args.threads))
    results = [profile(engine, mix, args.steps) for mix in MIXES.values()]
    for name, r in zip(MIXES, results, strict=True):
        print(f"\n{name}: {r['seconds_per_step']:.2f} s / step over {r['sync_tokens']} sync tokens "
              f"({r['steps']} steps, teacher {r['teacher_seconds']:.2f} s)")
        for kind, share in r["share"].items():
            print(f"  {kind:<28} {100 * share:5.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
