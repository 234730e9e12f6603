"""Algorithm 2's window policy: which turns to absorb, and which follow as S.

Pure bookkeeping on token counts and roles, no model: the prompt keeps a
window of recent turns under `window_tokens`; when it overflows, the oldest
whole turns (about `absorb_tokens`, at least one) are absorbed, with the turns
right after them (whole messages, up to `sync_tokens`) as sync text S. The
caller then drops the absorbed turns from the window and asks again until
the window fits.

Choices where the paper is silent:
- A turn is a message plus any `tool` messages answering it; it is absorbed
  whole, so a tool call never loses its result.
- The newest turn is never absorbed: the model should read the message it is
  answering. A window that still overflows with only that turn left stays
  over budget (the caller may warn). Callers that have already taken turns
  out of the prompt (LlamaIndex's `Memory` flushing to a block) pass
  `keep_newest=False` and `window_tokens=0` to absorb everything.
- A following message larger than what is left of `sync_tokens` ends S there;
  S is never cut mid-message (probes still supply sync text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .chat import Message


@dataclass(frozen=True)
class AbsorbPlan:
    """Absorb the oldest `absorb` window messages, syncing on the `sync` after them."""

    absorb: int
    sync: int
    absorb_tokens: int
    sync_tokens: int


def turn_spans(roles: list[str]) -> list[tuple[int, int]]:
    """`[start, end)` spans of turns: a message and the `tool` messages that follow it."""
    spans: list[tuple[int, int]] = []
    for i, role in enumerate(roles):
        if role == "tool" and spans:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def plan_absorption(
    counts: list[int],
    roles: list[str],
    *,
    window_tokens: int,
    absorb_tokens: int,
    sync_tokens: int,
    keep_newest: bool = True,
) -> AbsorbPlan | None:
    """Decide the next absorption round for a window, or None if it fits (or cannot shrink).

    Args:
        counts: tokens of each window message, oldest first.
        roles: role of each window message.
        window_tokens: budget of the window.
        absorb_tokens: about how many tokens one round absorbs (n).
        sync_tokens: most tokens of following messages used as S (m).
        keep_newest: never absorb the newest turn (it is what the model answers).
    """
    if len(counts) != len(roles):
        raise ValueError(f"counts and roles differ in length: {len(counts)} != {len(roles)}")
    if sum(counts) <= window_tokens:
        return None
    spans = turn_spans(roles)
    if keep_newest:
        spans = spans[:-1]  # the newest turn stays in the prompt
    end, absorbed = 0, 0
    for start, stop in spans:
        if absorbed >= absorb_tokens:
            break
        absorbed += sum(counts[start:stop])
        end = stop
    if end == 0:
        return None
    n_sync, synced = 0, 0
    for c in counts[end:]:
        if synced + c > sync_tokens:
            break
        synced += c
        n_sync += 1
    return AbsorbPlan(absorb=end, sync=n_sync, absorb_tokens=absorbed, sync_tokens=synced)


def replayed_overflow(counts: list[int], roles: list[str], *, window_tokens: int, absorb_tokens: int) -> int:
    """How many of the oldest messages the rounds would have absorbed, had the messages come one at a time.

    Replays `plan_absorption` after each message (what `absorb_when="overflow"` does as they are added),
    so a single deferred round (`absorb_when="idle"`) takes exactly the turns those rounds would have
    taken, and leaves the same window behind.
    """
    start = 0
    for end in range(1, len(counts) + 1):
        while plan := plan_absorption(
            counts[start:end],
            roles[start:end],
            window_tokens=window_tokens,
            absorb_tokens=absorb_tokens,
            sync_tokens=0,
        ):
            start += plan.absorb
    return start


def fit_window(counts: list[int], roles: list[str], budget: int) -> int:
    """Where the prompt's window starts: the oldest turn boundary whose tail fits `budget` tokens.

    The newest turn stays even if it alone is too long; turns are never split.
    """
    spans = turn_spans(roles)
    fallback = spans[-1][0] if spans else 0
    return next((begin for begin, _ in spans if sum(counts[begin:]) <= budget), fallback)


#: Tokens allowed for one probe's question when checking whether a teacher prompt fits the context.
PROBE_QUESTION_TOKENS = 32


def teacher_tokens(prefix_tokens: int, message_tokens: int, probes: int, answer_tokens: int, extra: int = 0) -> int:
    """Tokens a teacher prompt `[prefix; messages; probes and their answers]` needs (`extra`: e.g. recited turns)."""
    return prefix_tokens + message_tokens + probes * (PROBE_QUESTION_TOKENS + answer_tokens) + extra


def consolidation_following(
    window: list[Message], count: Callable[[Message], int], mode: str, sync_tokens: int
) -> list[Message]:
    """The window's oldest messages a consolidation's sync text starts with (`consolidation_sync`).

    `window`: all of them, so the probes sit where the next question will, after the whole window;
    `head`: those that fit `sync_tokens` together, as a round's following turns do (`count` tokens a message).
    """
    if mode == "window":
        return list(window)
    if mode == "head":
        return window[: leading_fit([count(m) for m in window], sync_tokens)]
    raise ValueError(f"`consolidation_sync` must be 'window' or 'head', got {mode!r}")


def idle_round(
    messages: list[Message],
    count: Callable[[Message], int],
    *,
    window_tokens: int,
    absorb_tokens: int,
    sync_mode: str,
    sync_tokens: int,
) -> tuple[int, int]:
    """`absorb_when="idle"`: `(absorb, sync)` for the one round over a waiting window of `messages`.

    The first `absorb` messages are C: what the rounds would have taken had the messages come one at a
    time (`replayed_overflow`), so the same window is left; the next `sync` start S, as a consolidation's
    do (`consolidation_following` with `sync_mode`). `absorb == 0`: nothing to absorb.
    """
    absorb = replayed_overflow(
        [count(m) for m in messages],
        [m["role"] for m in messages],
        window_tokens=window_tokens,
        absorb_tokens=absorb_tokens,
    )
    return absorb, len(consolidation_following(messages[absorb:], count, sync_mode, sync_tokens))


def leading_fit(counts: list[int], budget: int) -> int:
    """How many of the first messages fit in `budget` tokens together (whole messages, stopping at the first misfit)."""
    used = 0
    for k, count in enumerate(counts):
        if used + count > budget:
            return k
        used += count
    return len(counts)
