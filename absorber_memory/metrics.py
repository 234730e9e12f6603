"""Fidelity: how close the contextless adapted model comes to the full-context one.

For each held-out query the frozen model reads `[prefix; C; window; query]`
and answers greedily (the reference answer). Then, token by token along that
answer, we compare its next-token distributions with two contextless models
reading `[prefix; window; query]`: the adapted model (C absorbed) and the
frozen model (C simply dropped). The mean per-token KL(full || other),
pooled over all answer tokens (EOS included: stopping is behaviour too),
gives `kl_absorbed` and `kl_dropped`, and

    gap_closed = 1 - kl_absorbed / kl_dropped

1.0 means the adapter fully replaces the dropped context; 0.0 means it is no
better than forgetting; negative means worse. Queries must be held out: never
probes, never sync text the adapter was trained on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .chat import Message, validate_messages
from .generation import generate_ids


@dataclass
class FidelityReport:
    """Result of `fidelity`; `to_dict()` is JSON-ready."""

    kl_absorbed: float
    kl_dropped: float
    gap_closed: float
    tokens: int
    per_query: list[dict[str, Any]] = field(default_factory=list)
    #: Why `gap_closed` is nan, when it is (nothing absorbed, or dropping changed nothing); else "".
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_query(query: str | list[dict[str, Any]], i: int) -> list[Message]:
    if isinstance(query, str):
        query = [{"role": "user", "content": query}]
    return validate_messages(query, name=f"queries[{i}]")


def answer_logprobs(model: Any, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """`[len(answer), V]` log-probs the model gives each answer token after `prompt`."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer[:-1]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 :]
    return F.log_softmax(logits.float(), dim=-1)


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> float:
    """Summed per-token KL(teacher || student) along an answer (`[T, V]` log-probs each)."""
    return float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())


def reference_answer(
    model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[int], torch.Tensor]:
    """The model's greedy answer after `prompt`: `(answer ids, answer + EOS, log-probs along answer + EOS)`."""
    answer = generate_ids(model, tokenizer, prompt, max_new_tokens)
    target = answer + [tokenizer.eos_token_id]
    return answer, target, answer_logprobs(model, prompt, target)


def fidelity(
    memory: Any,
    queries: Sequence[str | list[dict[str, Any]]],
    *,
    context: list[dict[str, Any]] | None = None,
    window: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 32,
    answers: bool = False,
) -> FidelityReport:
    """Measure how much of the dropped context's effect the adapter restores.

    Args:
        memory: a `ParametricMemory` (its prefix, model and adapter are used).
        queries: held-out questions (strings or message lists).
        context: what was absorbed (default: `memory.absorbed_messages`).
        window: what stays in the prompt for all three models (default: `memory.window`).
        max_new_tokens: length of the reference answers.
        answers: also generate the absorbed and dropped models' own answers.
    """
    if not queries:
        raise ValueError("`queries` is empty; pass held-out questions")
    context = memory.absorbed_messages if context is None else validate_messages(context, name="context")
    window = memory.window if window is None else validate_messages(window, name="window", allow_empty=True)
    prefix, fmt, model, tok = memory.prefix, memory.fmt, memory.model, memory.tokenizer
    totals = {"absorbed": 0.0, "dropped": 0.0}
    tokens = 0
    rows = []
    for i, raw in enumerate(queries):
        query = _as_query(raw, i)
        full_prompt = fmt.encode(prefix, context + window + query, add_generation_prompt=True)
        short_prompt = fmt.encode(prefix, window + query, add_generation_prompt=True)
        with memory.adapter_disabled():
            reference, target, teacher = reference_answer(model, tok, full_prompt, max_new_tokens)
            dropped = answer_logprobs(model, short_prompt, target)
            answer_dropped = generate_ids(model, tok, short_prompt, max_new_tokens) if answers else None
        absorbed = answer_logprobs(model, short_prompt, target)
        answer_absorbed = generate_ids(model, tok, short_prompt, max_new_tokens) if answers else None
        kl_a, kl_d = kl_sum(teacher, absorbed), kl_sum(teacher, dropped)
        totals["absorbed"] += kl_a
        totals["dropped"] += kl_d
        tokens += len(target)
        row = {
            "query": query[-1]["content"],
            "answer_full": tok.decode(reference, skip_special_tokens=True).strip(),
            "kl_absorbed": kl_a / len(target),
            "kl_dropped": kl_d / len(target),
        }
        if answers:
            row["answer_absorbed"] = tok.decode(answer_absorbed, skip_special_tokens=True).strip()
            row["answer_dropped"] = tok.decode(answer_dropped, skip_special_tokens=True).strip()
        rows.append(row)
    kl_absorbed, kl_dropped = totals["absorbed"] / tokens, totals["dropped"] / tokens
    gap, note = (1.0 - kl_absorbed / kl_dropped, "") if kl_dropped > 0 else (math.nan, _no_gap(context))
    if note:
        warnings.warn(f"gap_closed is nan: {note}", RuntimeWarning, stacklevel=2)
    return FidelityReport(kl_absorbed, kl_dropped, gap, tokens, rows, note)


def _no_gap(context: list[Message]) -> str:
    if not context:
        return (
            "nothing has been absorbed yet, so the full-context and dropped models read the same prompt and "
            "there is no gap to close (add more turns than the window holds, or `flush`, then measure)"
        )
    return "dropping the absorbed messages did not change the reference answers' token distributions"


class SessionView:
    """What `fidelity` reads from a `ParametricMemory`, for one `AbsorberMemory` session."""

    def __init__(self, memory: Any, session_id: str, model: Any) -> None:
        rows = [m for m in memory.transcript(session_id) if m.role != "system"]
        self.prefix, self.fmt, self.model, self.tokenizer = (
            memory.prefix(session_id),
            memory.fmt,
            model,
            memory.tokenizer,
        )
        self.absorbed_messages = [m.as_chat() for m in rows if m.absorbed]
        self.window = [m.as_chat() for m in rows if not m.absorbed]

    def adapter_disabled(self) -> Any:
        return self.model.disable_adapter()


def session_fidelity(
    memory: Any, session_id: str, queries: Sequence[str | list[dict[str, Any]]], **kwargs: Any
) -> FidelityReport:
    """`fidelity` for one session of an `AbsorberMemory`: its committed adapter vs. its absorbed turns.

    The window is the session's unabsorbed messages; call `flush` first so
    that none is pending. Keyword arguments are those of `fidelity`.
    """
    with memory.adapted_model(session_id) as model:
        return fidelity(SessionView(memory, session_id, model), queries, **kwargs)
