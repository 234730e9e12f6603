"""One-shot `absorb()` of the demo's clean chat of facts under the previous and the current defaults.

The agent path's defaults (recited user turns, logit KL 0.25) were chosen on streamed agent sessions;
this checks that a one-shot absorption of a short, clean chat (the README's first example) keeps its
fidelity under them. Each setting starts from a fresh adapter; the KL gap closed is measured on the
demo's held-out questions with the chat gone.

    python benchmarks/oneshot_settings.py --threads 1
    python benchmarks/oneshot_settings.py --threads 2 --settings "current default" "4 probes"
"""

from __future__ import annotations

import argparse
import json
import time

from absorber_memory import AbsorberConfig, ParametricMemory, fidelity
from absorber_memory.config import PLAIN_RECIPE
from absorber_memory.demo import HELD_OUT_QUERIES, PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.models import DEFAULT_MODEL, load_model

SETTINGS = {
    "previous default": PLAIN_RECIPE,
    "current default": {},
    "4 probes": {"probe_count": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=["previous default", "current default"],
        help="which settings to absorb with, in this order",
    )
    args = parser.parse_args()
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", num_threads=args.threads)
    memory = ParametricMemory(model, tokenizer=tokenizer, config=AbsorberConfig(num_threads=args.threads))
    context = [{"role": "system", "content": SYSTEM_PROMPT}, *PERSONA_CHAT]
    for name in args.settings:
        extra = SETTINGS[name]
        memory.engine.reconfigure(**{**AbsorberConfig(num_threads=args.threads).model_dump(), **extra})  # fresh adapter
        started = time.perf_counter()
        memory.absorb(context)
        seconds = time.perf_counter() - started
        result = fidelity(memory, HELD_OUT_QUERIES, context=PERSONA_CHAT, window=[]).to_dict()
        shown = {k: v for k, v in result.items() if not isinstance(v, list)}
        print(json.dumps({"setting": name, "seconds": round(seconds, 1), **shown}), flush=True)


if __name__ == "__main__":
    main()
