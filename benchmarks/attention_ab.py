"""One idle absorption round on a long session, with and without `absorber_memory.attention`, in one process.

Streams a long `bench streaming` session (persona facts, then 12 real chats) through `AbsorberMemory`
at the cheap long-session settings (absorbed once idle; k = 3, 20 steps x 1.5e-3, probes answered
together, window trained at step 0 only), twice, alternating:

- `new`: the library as it is: a step read after the window's stored keys and values computes no
  gradients for them, masked decoding reads grouped heads unrepeated, and the teacher's targets
  take the window's states from the probe answers' read;
- `old`: transformers' `sdpa` everywhere (`attention._flash_ops` reports no fused CPU kernel, so
  `absorber_attention` switches nothing) and the targets read the window again.

Both compute the same round up to float rounding (the final losses agree); printed per arm: the
round's seconds, the teacher's (probe answers), the rest (targets and steps) and the final loss.
`--persona` picks the persona seeds; every session takes its chat from the first seed's draw (the
chat a one-session split draws), so the rounds have the same shape.

    python benchmarks/attention_ab.py --split test --persona 0 1 2 --json bench-out/attention_ab.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from absorber_memory import LONG_SESSION_RECIPE, absorber, attention
from absorber_memory.bench.cli import LONG_STREAMING, STREAMING
from absorber_memory.bench.streaming import agent_chats, stream_session
from absorber_memory.config import AbsorberConfig
from absorber_memory.sessions import AbsorberMemory

#: `LONG_SESSION_RECIPE` with the answer length these scripts' recorded figures were measured at (24, the default).
SETTINGS: dict[str, Any] = {**LONG_SESSION_RECIPE, "probe_max_new_tokens": 24}


def run(model: str, split: str, persona: int, arm: str, threads: int) -> dict[str, Any]:
    st = {**STREAMING["full"], **LONG_STREAMING["full"]}
    chat = agent_chats([persona], st["chat_messages"], 0 if split == "test" else 1, st["queries"], st["chats"])[0]
    config = AbsorberConfig(
        window_tokens=st["window"],
        absorb_tokens=st["absorb"],
        sync_tokens=st["sync"],
        num_threads=threads,
        show_progress=False,
        **SETTINGS,
    )
    flash, recorded = attention._flash_ops, absorber._recorded
    if arm == "old":
        attention._flash_ops, absorber._recorded = (lambda: None), (lambda *a: [])
    try:
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            streamed = stream_session(
                lambda data_dir, _extra: AbsorberMemory(model, config=config, data_dir=data_dir),
                chat,
                Path(work) / "memory",
                {},
            )
    finally:
        attention._flash_ops, absorber._recorded = flash, recorded
    (job,) = [j for j in streamed["jobs"] if j["kind"] == "round"]
    return {
        "arm": arm,
        "chat": chat.name,
        "round_s": job["seconds"],
        "teacher_s": job["teacher_seconds"],
        "rest_s": job["seconds"] - job["teacher_seconds"],
        "final_loss": job["final_loss"],
        "absorbed_tokens": job["context_tokens"],
        "sync_tokens": job["sync_tokens"],
        "step_window_pairs": job.get("step_window_pairs"),
        "stream_s": time.perf_counter() - started,
    }


def run_around_train(wrap: Any, model: str, split: str, persona: int, threads: int) -> dict[str, Any]:
    """`run`'s `new` arm with `Absorber.train` replaced by `wrap(train)` for the round (then restored)."""
    train = absorber.Absorber.train
    absorber.Absorber.train = wrap(train)  # type: ignore[method-assign]
    try:
        return run(model, split, persona, "new", threads)
    finally:
        absorber.Absorber.train = train  # type: ignore[method-assign]


def round_parser(description: str) -> argparse.ArgumentParser:
    """Arguments of the scripts that run one round: `--model`, `--split`, `--persona`, `--threads`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--persona", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--persona", type=int, nargs="+", default=[100])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for persona in args.persona:
        for arm in ("new", "old"):
            rows.append(run(args.model, args.split, persona, arm, args.threads))
            r = rows[-1]
            print(
                f"{arm} {r['chat']}: round {r['round_s']:.1f} s (teacher {r['teacher_s']:.1f}, rest {r['rest_s']:.1f}),"
                f" final loss {r['final_loss']:.6f}",
                flush=True,
            )
    for arm in ("new", "old"):
        mine = [r for r in rows if r["arm"] == arm]
        print(
            f"{arm}: rounds {sum(r['round_s'] for r in mine):.1f} s, teacher {sum(r['teacher_s'] for r in mine):.1f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
