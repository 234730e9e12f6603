"""The demo: a scripted chat whose early turns get absorbed, then measured.

A user states personal facts over several turns; the window is small, so the
oldest turns overflow and are absorbed into the adapter (progress bars show
the steps). At the end a table compares the transcript with what is still in
the prompt, reports absorption time and the held-out fidelity (how much of
the KL gap between "full context" and "context dropped" the adapter closes),
and shows the answers of the full-context, absorbed and dropped models.

The held-out questions are never used as probes or sync text.
"""

from __future__ import annotations

import time
from typing import Any

SYSTEM_PROMPT = "You are a friendly assistant who remembers what the user tells you."

PERSONA_CHAT: list[dict[str, str]] = [
    {"role": "user", "content": "Hi! My name is Marta Okafor and I just moved to Valencia for a new job."},
    {"role": "assistant", "content": "Welcome to Valencia, Marta! What is the new job?"},
    {"role": "user", "content": "I'm a marine biologist at the city aquarium. I study octopuses, mostly."},
    {"role": "assistant", "content": "That sounds fascinating. Octopuses are remarkably clever animals."},
    {"role": "user", "content": "They are! At home I have a grey cat called Pixel who is fourteen years old."},
    {"role": "assistant", "content": "Pixel sounds like a wise old cat. How is Pixel handling the move?"},
    {
        "role": "user",
        "content": "Not bad. My sister Lena is getting married on the 3rd of June in Porto, and I'm giving a speech.",
    },
    {"role": "assistant", "content": "Congratulations to Lena! A wedding speech in Porto, how exciting."},
    {"role": "user", "content": "I'm allergic to peanuts, so I need to check the wedding menu carefully."},
    {"role": "assistant", "content": "Good idea. I'll keep your peanut allergy in mind."},
]

FOLLOW_UP: list[dict[str, str]] = [
    {"role": "user", "content": "Anyway, I've been reading a lot of science fiction lately."},
    {"role": "assistant", "content": "Nice! Any favourite authors?"},
]

HELD_OUT_QUERIES: list[str] = [
    "What is my name?",
    "Where do I live now?",
    "What do I do for work?",
    "What is my cat called?",
    "When is my sister's wedding?",
    "What food am I allergic to?",
]

# Sized so the ~230 fact tokens overflow the window and are absorbed in two rounds.
DEMO_SETTINGS: dict[str, Any] = dict(window_tokens=160, absorb_tokens=128, sync_tokens=64, show_progress=True)


def _row(cells: list[str], widths: list[int]) -> str:
    return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_demo(model: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the demo, print its tables, and return the figures."""
    from . import AbsorberConfig, ParametricMemory, fidelity
    from .models import DEFAULT_MODEL

    config = AbsorberConfig(**{**DEMO_SETTINGS, **overrides})
    print(f"Loading {model or DEFAULT_MODEL} (first run converts the GGUF once, ~20 s) ...", flush=True)
    pm = ParametricMemory(model or DEFAULT_MODEL, config=config)
    pm.add_messages([{"role": "system", "content": SYSTEM_PROMPT}])
    started = time.perf_counter()
    for message in PERSONA_CHAT + FOLLOW_UP:
        print(f"  {message['role']:>9}: {message['content']}", flush=True)
        for r in pm.add_messages([message]):
            print(
                f"  [absorbed {r.context_tokens} tokens in {r.steps} steps, {r.seconds:.1f} s, "
                f"loss {r.initial_loss:.3f} -> {r.final_loss:.3f}]",
                flush=True,
            )
    absorb_seconds = time.perf_counter() - started
    print("Measuring fidelity on held-out questions ...", flush=True)
    fid = fidelity(pm, HELD_OUT_QUERIES, answers=True)

    transcript_tokens = sum(pm.fmt.count(m) for m in pm.transcript)
    prompt_tokens = len(pm.fmt.prefix_ids(pm.prefix)) + pm.window_tokens()
    summary = {
        "transcript tokens": transcript_tokens,
        "tokens in the prompt (prefix + window)": prompt_tokens,
        "absorbed messages": len(pm.absorbed_messages),
        "absorption rounds": len(pm.absorption_log),
        "absorption time (s)": round(absorb_seconds, 1),
        "KL full vs absorbed": round(fid.kl_absorbed, 4),
        "KL full vs dropped": round(fid.kl_dropped, 4),
        "fidelity gap closed": f"{fid.gap_closed:.1%}",
    }
    print("\n" + _row(["figure", "value"], [40, 12]))
    print("-" * 55)
    for key, value in summary.items():
        print(_row([key, str(value)], [40, 12]))
    widths = [28, 34, 34, 34]
    print("\n" + _row(["question", "full context", "absorbed (no context)", "dropped (no context)"], widths))
    print("-" * 136)
    for row in fid.per_query:
        print(
            _row(
                [
                    _clip(row["query"], 28),
                    _clip(row["answer_full"], 34),
                    _clip(row["answer_absorbed"], 34),
                    _clip(row["answer_dropped"], 34),
                ],
                widths,
            )
        )
    print(
        "\nAnswers come from a 135M model, so they are often wrong even with full context;"
        "\nfidelity measures how closely the absorbed model tracks the full-context one."
    )
    return {"summary": summary, "fidelity": fid.to_dict()}
