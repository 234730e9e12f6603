"""What one absorption round costs, before and after the round-cost changes, side by side in one process.

Rounds over real session text (persona facts, then real chat from a long dev
session): C of about 128, 1,024 and 3,072 tokens with the following turns in
the window (a streaming round: recitation, chained probes), at the default
settings with `--steps` training steps. Each case runs twice, alternating:

- `before`: every sync segment's teacher row reads `[prefix; C]` again, so do
  the probe answers; rows of any width share a micro-batch (padded to the
  longest); logits are computed at every position and the student's KL reads them;
- `after` (the library now): `[prefix; C]` is read once into a KV cache when
  it is 256 tokens or longer (teacher rows and probe answers); a row joins a
  micro-batch only if padding adds at most a quarter; logits start at S.

With `--before reuse`, the `before` arm differs from the library in one
change only: the teacher's targets read `[prefix; C]` again rather than
continuing from the KV cache the probe answers left (`Absorber.train(read=)`).
With `--before fused`, the `before` arm computes the student's logits and their KL
as tensors `[tokens, vocabulary]` (the model's LM head, then `kl_to_targets`)
instead of through `losses.linear_kl_loss`.
With `--before lora`, the `before` arm runs PEFT's own LoRA forward
(`base(x) + lora_B(lora_A(x)) * scaling`) instead of the two-GEMM one
(`absorber_memory.fused`).
With `--before settings`, the `before` arm is a second engine whose settings
are the `after` arm's overridden by `--before-set` (e.g. `lora_layers=null`
against `--set 'lora_layers=[-15, ...]'`: every layer adapted against the upper half).
`--set KEY=VALUE` overrides the settings (values as JSON, e.g. `probe_count=4`).

Prints teacher seconds, seconds per training step, the round at 30 steps
(teacher + 30 steps, extrapolated from the measured step) and the initial loss
of both (equal up to float rounding: same sync text and targets).

    python benchmarks/round_cost.py --threads 2 --json bench-out/round_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from absorber_memory import absorber, generation
from absorber_memory.bench.cli import LONG_STREAMING, STREAMING, parse_overrides
from absorber_memory.bench.streaming import agent_chats
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.fused import fuse_lora_forwards, unfuse_lora_forwards


@contextlib.contextmanager
def unfused_head(engine: AbsorptionEngine) -> Iterator[None]:
    """The student's logit-KL term reads the model's logits rather than `losses.linear_kl_loss`."""
    engine.absorber.fused_head = False
    try:
        yield
    finally:
        engine.absorber.fused_head = True


@contextlib.contextmanager
def peft_lora(engine: AbsorptionEngine) -> Iterator[None]:
    """PEFT's own LoRA forward rather than the two-GEMM one (`fused.fuse_lora_forwards`)."""
    unfuse_lora_forwards(engine.model)
    try:
        yield
    finally:
        fuse_lora_forwards(engine.model)


@contextlib.contextmanager
def before_changes(engine: AbsorptionEngine) -> Iterator[None]:
    """The former behaviour: no shared-prefix cache, any row joins a micro-batch, logits at every position.

    The student's logit-KL term also reads the model's logits (`unfused_head`), as it did then.
    """
    saved = absorber.SHARED_PREFIX_TOKENS, generation.SHARED_PREFIX_TOKENS, absorber._MOST_PADDING
    forward = engine.absorber._forward
    absorber.SHARED_PREFIX_TOKENS = generation.SHARED_PREFIX_TOKENS = 10**9
    absorber._MOST_PADDING = 1.0
    engine.absorber._forward = lambda seqs, logits=True, logits_from=0: forward(seqs, logits)  # type: ignore[method-assign]
    try:
        with unfused_head(engine):
            yield
    finally:
        absorber.SHARED_PREFIX_TOKENS, generation.SHARED_PREFIX_TOKENS, absorber._MOST_PADDING = saved
        engine.absorber._forward = forward  # type: ignore[method-assign]


@contextlib.contextmanager
def without_reuse(engine: AbsorptionEngine) -> Iterator[None]:
    """The teacher's targets read `[prefix; C]` anew instead of continuing from the probe answers' cache."""
    train = engine.absorber.train
    engine.absorber.train = lambda *a, read=None, **k: train(*a, **k)  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.absorber.train = train  # type: ignore[method-assign]


def leading(engine: AbsorptionEngine, messages: list[dict[str, str]], tokens: int) -> int:
    """How many leading messages hold about `tokens` tokens."""
    total = 0
    for k, m in enumerate(messages):
        total += engine.fmt.count(m)
        if total >= tokens:
            return k + 1
    return len(messages)


def one_round(engine: AbsorptionEngine, chat: Any, count: int, steps: int) -> dict[str, Any]:
    engine.reset_adapter()
    following = chat.messages[count : count + leading(engine, chat.messages[count:], engine.config.sync_tokens)]
    start = time.perf_counter()
    report = engine.run_round(chat.prefix, chat.messages[:count], [], n_probes=engine.config.probe_count,
                              following=following, base_teacher=True)
    wall = time.perf_counter() - start
    step = (wall - report.teacher_seconds) / (steps + 1)  # `steps` backward passes and one last loss check
    return {"seconds": wall, "teacher_seconds": report.teacher_seconds, "step_seconds": step,
            "round_at_30_steps": report.teacher_seconds + 31 * step, "initial_loss": report.initial_loss,
            "sync_tokens": report.sync_tokens, "context_tokens": report.context_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="*", default=[128, 1024, 3072])
    parser.add_argument("--before", choices=["all", "reuse", "fused", "lora", "settings"], default="all",
                        help="what the `before` arm switches off: every round-cost change, the targets' reuse, "
                             "the fused LM head and KL, the two-GEMM LoRA forward, or the settings in --before-set")
    parser.add_argument("--before-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="with --before settings: the before arm's settings over the after arm's")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings, values as JSON")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = parse_overrides(args.set)
    engine = AbsorptionEngine(config=dict(num_threads=args.threads, max_steps=args.steps, **extra))
    if args.before == "settings":
        if not args.before_set:
            parser.error("--before settings needs --before-set KEY=VALUE")
        before_config = {**engine.config.model_dump(), **parse_overrides(args.before_set)}
        other = AbsorptionEngine(config=before_config)
        arm = lambda e: contextlib.nullcontext()  # noqa: E731
    else:
        other = engine
        arm = {"all": before_changes, "reuse": without_reuse, "fused": unfused_head, "lora": peft_lora}[args.before]
    st = STREAMING["full"]
    chat = agent_chats(st["dev"], st["chat_messages"], chitchat_seed=1, queries=st["queries"],
                       chats=LONG_STREAMING["full"]["chats"])[0]
    rows = []
    print("| C tokens | sync tokens | teacher s (before / after) | s per step (before / after) | "
          "round at 30 steps, s (before / after) | initial loss (before / after) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        count = leading(engine, chat.messages, tokens)
        with arm(other):
            old = one_round(other, chat, count, args.steps)
        new = one_round(engine, chat, count, args.steps)
        rows.append({"tokens": tokens, "before": old, "after": new})
        print(f"| {new['context_tokens']} | {new['sync_tokens']} | {old['teacher_seconds']:.1f} / "
              f"{new['teacher_seconds']:.1f} | {old['step_seconds']:.2f} / {new['step_seconds']:.2f} | "
              f"{old['round_at_30_steps']:.0f} / {new['round_at_30_steps']:.0f} | "
              f"{old['initial_loss']:.4f} / {new['initial_loss']:.4f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        options = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(args).items()}
        meta = {"command": "python benchmarks/round_cost.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()),
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "config": engine.config.model_dump(mode="json"),
                "before_config": other.config.model_dump(mode="json")}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
