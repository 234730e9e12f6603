"""Self-generated probes: sync text S for when no later turns exist yet.

A probe is a generic, context-free question ("What do you remember about
me?"). The teacher, which reads the context being absorbed, answers it; the
probe plus that answer becomes a sync segment S. The prompts never mention
anything specific, and they must never be evaluation questions: fidelity is
measured on held-out queries the adapter was not trained on.

Defaults (measured, see BENCHMARKS.md): many short probes beat few long
ones. Diverse S is what carries over to unseen questions; 8 probes with
24-token answers closed more of the held-out gap in 30 steps than 3 probes
with 48-token answers did in 60. Answers are greedy: sampled or de-looped
answers read better but matched the full-context model *worse*. More
distinct prompts and longer answers keep helping when the steps grow with
them: 28 probes x 48 tokens, 90 steps of 14 probes each
(`sync_batch_segments`), closed 78% of the gap against 63% for the
defaults, at about 6x the cost.
"""

from __future__ import annotations

from collections.abc import Callable

from .chat import Message

DEFAULT_PROBES: tuple[str, ...] = (
    "What do you remember about me and our conversation so far?",
    "Summarize what we discussed.",
    "List the facts I have told you, one per line.",
    "What should you keep in mind when you answer my next question?",
    "Tell me about myself as if you were introducing me to a friend.",
    "What details from earlier would matter if we kept talking?",
    "Please continue our conversation naturally.",
    "Which names, places and numbers have come up so far?",
    # Aspect prompts: still context-free, they ask what a personal assistant
    # keeps about anyone; with the default count they join in later rounds.
    "What do you know about where I live and work?",
    "What do you know about my family, friends and pets?",
    "What do you know about my health, likes and dislikes?",
    "What plans or upcoming events have I mentioned?",
    "What have I asked you to remember?",
    "What do you know about me so far?",
    # More generic prompts: 28 probes with 48-token answers, 14
    # per step, closed more of the held-out gap than 14 probes (BENCHMARKS.md).
    "Write a short note to remind me of what I told you.",
    "What would you ask me next, given what you know about me?",
    "Give me one piece of advice based on what I have shared.",
    "How would you describe my situation right now?",
    "What is going on in my life at the moment?",
    "Repeat back the most important thing I said.",
    "What did I tell you first?",
    "What did I tell you most recently?",
    "Is there anything I mentioned that I should not forget?",
    "Write a two-sentence profile of me.",
    "What do you know about my daily life?",
    "Recap our chat in three bullet points.",
    "Hi again! Do you remember me?",
    "What were we talking about?",
)


def pick_probes(prompts: list[str], count: int, round_index: int) -> list[str]:
    """The `count` prompts for absorption round `round_index`, rotating through `prompts`.

    Rotation gives a streaming memory varied probes across rounds while each
    round stays deterministic.
    """
    if count <= 0 or not prompts:
        return []
    start = (round_index * count) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(min(count, len(prompts)))]


def probe_segments(answer_all: Callable[[list[list[Message]]], list[str]], prompts: list[str]) -> list[list[Message]]:
    """Build sync segments `[probe; teacher answer]`, one per prompt.

    Args:
        answer_all: the teacher: given each probe as a one-message list,
            returns their answers (in order) while it reads `[prefix; C]`
            (the caller closes over that); one call, so it can batch them.
        prompts: the probe questions.
    """
    questions = [[{"role": "user", "content": prompt}] for prompt in prompts]
    replies = answer_all(questions) if questions else []
    if len(replies) != len(questions):
        raise ValueError(f"the teacher returned {len(replies)} answers for {len(questions)} probes")
    return [q + [{"role": "assistant", "content": r.strip() or "..."}] for q, r in zip(questions, replies, strict=True)]


def chained_probe_segment(
    answer: Callable[[list[Message]], str], prompts: list[str], lead: list[Message]
) -> list[Message]:
    """One sync segment: the `lead` turns, then each probe and its teacher answer in turn.

    Used when streaming: the turns that follow the absorbed ones stay in the
    prompt, so probes asked *after* them train the adapter where inference
    puts the next question. (Probes placed straight after the prefix made the
    adapter overshoot once a window sat in between: see BENCHMARKS.md.)
    """
    messages = list(lead)
    for prompt in prompts:
        question = {"role": "user", "content": prompt}
        reply = answer(messages + [question]).strip() or "..."
        messages += [question, {"role": "assistant", "content": reply}]
    return messages


def independent_probe_segment(
    answer_all: Callable[[list[list[Message]]], list[str]], prompts: list[str], lead: list[Message]
) -> list[Message]:
    """`chained_probe_segment`'s one segment, each answer written straight after the `lead` turns.

    The teacher answers every probe as the next question after the lead (where inference asks it), not
    after the earlier probes and answers, so all of them can be decoded at once (`answer_all`, one call);
    the segment then chains them, as the student and the teacher's targets read it.
    """
    pairs = probe_segments(lambda questions: answer_all([list(lead) + q for q in questions]), prompts)
    return list(lead) + [message for pair in pairs for message in pair]


#: The question before each recited user turn (see `recitation_segments`).
RECITE_PROMPT = "Remind me what I told you."


def recitation_segments(context: list[Message], mode: str, lead: list[Message] | None = None) -> list[list[Message]]:
    """Sync text whose answers quote the absorbed user turns: where the teacher's predictions carry C's facts.

    Each user message of `context` becomes `[RECITE_PROMPT; 'You told me: "<message>"']`.
    The teacher reads C, so it predicts the quoted words with confidence; the
    student, without C, must learn them, which is what lets it state a fact
    later. Generic probe answers rarely mention the facts of a chatty C.

    Args:
        context: C, the messages being absorbed (only user turns are recited).
        mode: "off" (none), "each" (one segment per user turn, straight after
            the prefix) or "after" (one segment: `lead`, then every recitation
            in turn, where inference asks the next question).
        lead: the turns that follow C, for "after".
    """
    if mode == "off":
        return []
    pairs = [
        [{"role": "user", "content": RECITE_PROMPT}, {"role": "assistant", "content": f'You told me: "{m["content"]}"'}]
        for m in context
        if m["role"] == "user"
    ]
    if mode == "each" or not pairs:
        return pairs
    if mode == "after":
        return [list(lead or []) + [m for pair in pairs for m in pair]]
    raise ValueError(f"recitation mode must be 'off', 'each' or 'after', got {mode!r}")


def recitation_tokens(count: Callable[[Message], int], context: list[Message], mode: str) -> int:
    """Tokens the recitations of `context` add to a teacher prompt (0 when `mode` is "off")."""
    return 0 if mode == "off" else sum(count(m) for pair in recitation_segments(context, "each") for m in pair)
