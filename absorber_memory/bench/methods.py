"""The memory methods the benchmark compares, and how each is scored against full context.

Scoring follows `absorber_memory.metrics.fidelity`: for each held-out query
the frozen model with the whole chat in its prompt (`[prefix; C; window;
query]`) answers greedily, and every method is scored by the mean per-token
KL(full || method) along that answer (pooled over tokens), plus keyword
recall of its own greedy answer. Methods:

- `full`: C in the prompt (the upper bound; KL 0 by construction).
- `truncation`: C dropped, the window kept (a buffer memory).
- `summary`: the same frozen model summarizes C; the summary goes into the
  system prompt, the window stays.
- absorbing methods: C trained into a fresh LoRA adapter with one loss
  (`lm` = TTT-style next-token loss on C; `logit_kl`; hidden-state `l1`;
  `mse`), sync text S = the window, `+probes` adds self-generated probes.
  Every absorbing method runs exactly the same number of optimizer steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from ..generation import generate_text
from ..metrics import answer_logprobs, kl_sum, reference_answer
from .data import Conversation

SUMMARY_REQUEST = (
    "Summarize the conversation so far in two sentences. Keep every name, place, job, "
    "number and date the user mentioned."
)


@dataclass(frozen=True)
class Method:
    """A memory method: `kind` is "prompt", "summary" or "absorb"."""

    name: str
    kind: str
    loss: str | None = None
    probes: bool = False


METHODS = [
    Method("full", "prompt"),
    Method("truncation", "prompt"),
    Method("summary", "summary"),
    Method("ttt-lm", "absorb", "lm"),
    Method("logit-kl", "absorb", "logit_kl"),
    Method("logit-kl+probes", "absorb", "logit_kl", True),
    Method("sync-mse", "absorb", "mse"),
    Method("sync-mse+probes", "absorb", "mse", True),
    Method("sync-l1", "absorb", "l1"),
    Method("sync-l1+probes", "absorb", "l1", True),
]


@dataclass
class Reference:
    """The full-context model's answer to one query, and its log-probs along that answer."""

    query: str
    keywords: list[str]
    target: list[int]
    logprobs: Any
    answer: str


def query_prompt(pm: Any, conv: Conversation, prefix: list[dict[str, str]], messages: list[Any], i: int) -> list[int]:
    """Token ids that ask query `i` after `messages`, ending with the query's answer cue (if any)."""
    ids = pm.fmt.encode(prefix, messages + [{"role": "user", "content": conv.queries[i]}], add_generation_prompt=True)
    cue = conv.cues[i] if conv.cues else ""
    return ids + pm.tokenizer.encode(cue, add_special_tokens=False) if cue else ids


def references(pm: Any, conv: Conversation, max_new_tokens: int) -> list[Reference]:
    """The frozen model's full-context answers to `conv`'s queries (computed once per conversation)."""
    refs = []
    with pm.adapter_disabled():
        for i, query in enumerate(conv.queries):
            prompt = query_prompt(pm, conv, conv.prefix, conv.context + conv.window, i)
            answer, target, logprobs = reference_answer(pm.model, pm.tokenizer, prompt, max_new_tokens)
            refs.append(
                Reference(
                    query,
                    conv.keywords[i] if conv.keywords else [],
                    target,
                    logprobs,
                    pm.tokenizer.decode(answer, skip_special_tokens=True),
                )
            )
    return refs


def recall_hit(answer: str, keywords: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in keywords)


def fact_hits(refs: list[Reference], answers: list[str]) -> list[bool]:
    """Per question, whether the answer states its fact (a question without keywords never counts)."""
    return [bool(ref.keywords) and recall_hit(a, ref.keywords) for ref, a in zip(refs, answers, strict=True)]


def score_each(
    pm: Any,
    conv: Conversation,
    refs: list[Reference],
    prefix: list[dict[str, str]],
    *,
    with_context: bool,
    adapter: bool,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Per query: KL(full || this setting) summed over its answer tokens, the token count, the answer, the hit.

    `hit` is None for a query without keywords.
    """
    rows = []
    extra = conv.context if with_context else []
    with contextlib.nullcontext() if adapter else pm.adapter_disabled():
        for i, ref in enumerate(refs):
            prompt = query_prompt(pm, conv, prefix, extra + conv.window, i)
            answer = generate_text(pm.model, pm.tokenizer, prompt, max_new_tokens)
            rows.append(
                {
                    "kl_sum": kl_sum(ref.logprobs, answer_logprobs(pm.model, prompt, ref.target)),
                    "tokens": len(ref.target),
                    "answer": answer,
                    "hit": recall_hit(answer, ref.keywords) if ref.keywords else None,
                }
            )
    return rows


def score(
    pm: Any,
    conv: Conversation,
    refs: list[Reference],
    prefix: list[dict[str, str]],
    *,
    with_context: bool,
    adapter: bool,
    max_new_tokens: int,
) -> dict[str, Any]:
    """KL(full || this setting) pooled over answer tokens, keyword recall, and the answers."""
    rows = score_each(pm, conv, refs, prefix, with_context=with_context, adapter=adapter, max_new_tokens=max_new_tokens)
    hits = [r["hit"] for r in rows if r["hit"] is not None]
    return {
        "kl_sum": sum(r["kl_sum"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "hits": sum(hits),
        "scored": len(hits),
        "answers": [r["answer"] for r in rows],
        "kl_list": [r["kl_sum"] for r in rows],
        "token_list": [r["tokens"] for r in rows],
    }


def run_method(
    pm: Any,
    method: Method,
    conv: Conversation,
    refs: list[Reference],
    *,
    steps: int,
    lr: float,
    probes: int,
    max_new_tokens: int,
    overrides: dict[str, Any] | None = None,
    sync: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Apply one method to one conversation and score it; `seconds` is its cost (training or summarizing).

    `overrides` are further config fields for absorbing methods; `sync` replaces S (default: the window).
    """
    start, prefix = time.perf_counter(), conv.prefix
    if method.kind == "prompt":
        result = score(
            pm, conv, refs, prefix, with_context=method.name == "full", adapter=False, max_new_tokens=max_new_tokens
        )
        return {**result, "seconds": 0.0}
    if method.kind == "summary":
        with pm.adapter_disabled():
            ids = pm.fmt.encode(
                prefix, conv.context + [{"role": "user", "content": SUMMARY_REQUEST}], add_generation_prompt=True
            )
            summary = generate_text(pm.model, pm.tokenizer, ids, 64)
        seconds = time.perf_counter() - start
        system = prefix[0]["content"] + "\n\nSummary of the earlier conversation: " + summary
        result = score(
            pm,
            conv,
            refs,
            [{"role": "system", "content": system}],
            with_context=False,
            adapter=False,
            max_new_tokens=max_new_tokens,
        )
        return {**result, "seconds": seconds, "summary": summary}
    settings = dict(
        losses={method.loss: 1.0},
        lr=lr,
        max_steps=steps,
        loss_threshold=0.0,
        probe_count=probes if method.probes else 0,
    )
    pm.reconfigure(**{**settings, **(overrides or {})})
    s_text = conv.window if sync is None else sync
    segments = [s_text] if method.loss != "lm" and s_text else []
    report = pm.run_round(prefix, conv.context, segments, n_probes=probes if method.probes else 0, base_teacher=True)
    extra = {"final_loss": report.final_loss, "initial_loss": report.initial_loss, "steps": report.steps}
    seconds = time.perf_counter() - start
    result = score(pm, conv, refs, prefix, with_context=False, adapter=True, max_new_tokens=max_new_tokens)
    return {**result, "seconds": seconds, **extra}
