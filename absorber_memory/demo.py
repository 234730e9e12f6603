"""The demo: a chat streamed through `AbsorberMemory`, its early turns absorbed in the background, then tested.

A user states personal facts, then chats about other things; the window is
small, so the fact turns leave the prompt and background jobs absorb them
(the agent path every integration uses) at the library's defaults: the
user's turns recited in the sync text, a logit-KL term of weight 0.25, and
one consolidation round once the rounds are done (see BENCHMARKS.md). Then
held-out questions (never used in training) go to three models: the frozen
model with the whole chat in its prompt (full context), the adapter with
only the window (absorbed), and the frozen model with only the window
(dropped). The headline is relative recall: of the facts the full-context
model states, how many the absorbed and the dropped models state; beside
it the share of the KL gap the adapter closes; then every answer, whole.
"""

from __future__ import annotations

import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from .config import PLAIN_RECIPE

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

# Settings for this chat (its ~230 fact tokens absorbed in two rounds), used by the real-model integration tests.
# They check the wiring and fidelity on the paper's plain recipe (L1, probe answers as sync text, no
# consolidation), a third of the defaults' time; the defaults themselves are measured by the benchmarks.
DEMO_SETTINGS: dict[str, Any] = dict(
    window_tokens=160,
    absorb_tokens=128,
    sync_tokens=64,
    show_progress=True,
    **PLAIN_RECIPE,
)

SMALL_TALK: list[dict[str, str]] = [
    {"role": "user", "content": "Ursula Le Guin, mostly. Do you like short stories?"},
    {"role": "assistant", "content": "I do, they are a good fit for a train ride."},
]

#: (question, words that count as stating the fact, the start of the answer the model continues). Phrased so
#: the 135M model, given the whole chat, states most of them ("What is my name?" gets "Elena"; "What did I
#: say my name was?" gets "Marta Okafor"); the cat's name it misses either way, and the demo shows that miss.
QUESTIONS: list[tuple[str, list[str], str]] = [
    ("What did I say my name was?", ["Marta", "Okafor"], "You said your name is"),
    ("Which city do I live in?", ["Valencia"], "You live in"),
    ("Where do I work?", ["aquarium"], "You work at the"),
    ("What is my cat called?", ["Pixel"], "Your cat's name is"),
    ("When is my sister's wedding?", ["June"], "The wedding is on the"),
    ("What food am I allergic to?", ["peanut"], "You are allergic to"),
]

#: The agent demo: a window of about two exchanges and a step budget that keeps it near 5 min; the rest defaults.
AGENT_DEMO_SETTINGS: dict[str, Any] = dict(
    window_tokens=96,
    absorb_tokens=96,
    sync_tokens=64,
    probe_count=4,
    max_steps=16,
)

ANSWER_TOKENS = 20


def _progress(memory: Any, session: str, total_steps: int) -> None:
    """One line of our own, rewritten in place, until no job of the session is pending."""
    shown = ""
    while True:
        jobs = memory.jobs(session)
        pending = [j for j in jobs if j.pending]
        done = sum(j.status == "done" for j in jobs)
        running = next((j for j in pending if j.status == "running"), None)
        step = f"step {running.step or 0}/{total_steps}, loss {running.loss or 0:.3f}" if running else "waiting"
        line = f"  absorbing: {done}/{len(jobs)} jobs done, {step}"
        if line != shown:
            print(f"\r{line:<60}", end="", flush=True)
            shown = line
        if not pending:
            print()
            return
        time.sleep(0.5)


def _evaluate(memory: Any, session: str) -> list[dict[str, Any]]:
    """Per question: the three answers, whether each states the fact, and KL to the full-context answer."""
    from .bench.data import Conversation
    from .bench.methods import recall_hit, references, score_each
    from .metrics import SessionView

    with memory.adapted_model(session) as model:
        view = SessionView(memory, session, model)
        conv = Conversation(
            "demo",
            "scripted",
            view.absorbed_messages,
            view.window,
            [q for q, _, _ in QUESTIONS],
            [k for _, k, _ in QUESTIONS],
            prefix=view.prefix,
            cues=[c for _, _, c in QUESTIONS],
        )
        refs = references(view, conv, ANSWER_TOKENS)
        out: list[dict[str, Any]] = [
            {"question": r.query, "full": (QUESTIONS[i][2] + " " + r.answer).strip()} for i, r in enumerate(refs)
        ]
        for name, adapter in (("absorbed", True), ("dropped", False)):
            scored = score_each(
                view, conv, refs, conv.prefix, with_context=False, adapter=adapter, max_new_tokens=ANSWER_TOKENS
            )
            for i, (row, got) in enumerate(zip(out, scored, strict=True)):
                row[name] = (QUESTIONS[i][2] + " " + got["answer"]).strip()
                row[f"kl_{name}"] = got["kl_sum"] / max(1, got["tokens"])
    for i, row in enumerate(out):
        for name in ("full", "absorbed", "dropped"):
            row[f"{name}_correct"] = recall_hit(row[name][len(QUESTIONS[i][2]) :], QUESTIONS[i][1])
    return out


def _print_answers(rows: list[dict[str, Any]], width: int = 30) -> None:
    heads = ["question", "full context", "absorbed (chat gone)", "dropped (chat gone)"]
    print("\n" + " | ".join(h.ljust(width) for h in heads))
    print("-" * (4 * width + 9))
    for row in rows:
        cells = [row["question"]] + [
            ("[ok] " if row[f"{k}_correct"] else "[--] ") + " ".join(row[k].split())
            for k in ("full", "absorbed", "dropped")
        ]
        wrapped = [textwrap.wrap(c, width) or [""] for c in cells]
        for line in range(max(map(len, wrapped))):
            print(" | ".join((w[line] if line < len(w) else "").ljust(width) for w in wrapped))
        print()


def _plot(path: Path, rows: list[dict[str, Any]], curves: list[list[float]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no figure; pip install 'absorber-memory[bench]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, curve in enumerate(curves):
        left.plot(range(len(curve)), curve, label=f"round {k + 1}")
    left.set(title="absorption loss per step", xlabel="step", ylabel="loss")
    left.legend()
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["kl_absorbed"] for r in rows], 0.4, label="absorbed")
    right.bar([i + 0.2 for i in x], [r["kl_dropped"] for r in rows], 0.4, label="dropped")
    right.set_xticks(list(x), [keywords[0] for _, keywords, _ in QUESTIONS[: len(rows)]])
    right.set(title="KL to the full-context answer, per question", ylabel="KL / token")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(model: str | None = None, figure: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the demo, print its tables, write the figure (if `figure`), and return the figures."""
    from . import AbsorberConfig, AbsorberMemory
    from .models import DEFAULT_MODEL

    config = AbsorberConfig(**{**AGENT_DEMO_SETTINGS, **overrides})
    session = "marta"
    print(f"Loading {model or DEFAULT_MODEL} (the first run converts the embedded GGUF once, ~20 s) ...", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="absorber-demo-") as data_dir:
        memory = AbsorberMemory(model or DEFAULT_MODEL, config=config, data_dir=data_dir)
        try:
            memory.set_prefix(session, SYSTEM_PROMPT)
            print("\nThe chat (window: about two exchanges; older turns are absorbed in the background):")
            for message in PERSONA_CHAT + FOLLOW_UP + SMALL_TALK:
                memory.add_messages([message], session_id=session)
                print(textwrap.fill(message["content"], 100, initial_indent=f"  {message['role']:>9}: ",
                                    subsequent_indent=" " * 13))  # fmt: skip
            _progress(memory, session, config.max_steps)
            memory.flush(session)
            absorb_seconds = time.perf_counter() - started
            print("Asking held-out questions (never used in training) ...", flush=True)
            rows = _evaluate(memory, session)
            transcript = memory.transcript(session)
            all_jobs = memory.jobs(session)
        finally:
            memory.close()
    full_ok = [r for r in rows if r["full_correct"]]
    kl_a = sum(r["kl_absorbed"] for r in rows) / len(rows)
    kl_d = sum(r["kl_dropped"] for r in rows) / len(rows)
    summary = {
        "questions": len(rows),
        "full context states": sum(r["full_correct"] for r in rows),
        "absorbed states (of those)": sum(r["absorbed_correct"] for r in full_ok),
        "dropped states (of those)": sum(r["dropped_correct"] for r in full_ok),
        "absorbed states (all)": sum(r["absorbed_correct"] for r in rows),
        "KL gap closed": round(1 - kl_a / kl_d, 3) if kl_d > 0 else None,
        "messages absorbed": sum(m.absorbed for m in transcript),
        "absorption jobs": len(all_jobs),
        "seconds until absorbed": round(absorb_seconds, 1),
    }
    n = summary["full context states"]
    print(
        f"\nWith the whole chat in its prompt the model states {n} of {len(rows)} facts asked."
        f"\nWith the chat gone, of those {n}: the absorbed model states {summary['absorbed states (of those)']},"
        f" the dropped model {summary['dropped states (of those)']}."
        f" KL gap closed: {summary['KL gap closed']:.0%}."
        if summary["KL gap closed"] is not None
        else ""
    )
    _print_answers(rows)
    print(
        "A 135M model answers: even with the whole chat in its prompt it misses some facts, and the\n"
        "absorbed model can state a fact the full-context model misses. [ok] = states the fact."
    )
    result = {"summary": summary, "answers": rows, "jobs": [j.metrics for j in all_jobs]}
    if figure is not None:
        curves = [j.metrics.get("loss_curve", []) for j in all_jobs if j.status == "done"]
        if _plot(Path(figure), rows, curves):
            print(f"figure: {figure}")
    return result
