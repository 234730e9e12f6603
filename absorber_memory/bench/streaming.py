"""The streaming benchmark: the agent path every integration uses, against the memories it replaces.

Each session is an agent conversation: the user states facts in the first
turns, then real small talk from `chitchat-dataset` follows; held-out
questions about the facts come after the window (never probes). Messages go
one by one through `AbsorberMemory` (window of `window_tokens`, rounds of
`absorb_tokens`/`sync_tokens`, absorption in the background), then the
queue is flushed. Side by side, on the same transcript, window and questions:

- `full`: the whole conversation in the prompt (the upper bound);
- `truncation`: the window alone (a buffer memory);
- `summary`: a running summary (each absorbed chunk folded into it by the
  same frozen model, as LangChain's `SummarizationMiddleware` does) in the
  system prompt, plus the window;
- `one-shot`: everything that left the window absorbed in one round, taught
  by the frozen model (the target the streaming path should reach);
- `stream-<teacher>`: the session's adapter after streaming, for each
  `streaming_teacher` compared (`history` is the default, `chained` the
  previous behaviour).

Scores: per-token KL to the full-context model along its greedy answers,
gap closed vs truncation, keyword recall, and recall relative to the
teacher (of the questions the full-context model answers correctly, how
many the method answers correctly); costs: absorption seconds, seconds per
absorbed token, and the same model's prefill seconds per token (on the
transcript and at 4k tokens), so the cost of absorbing reads as a multiple
of prefilling.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat import Message
from .data import Conversation, chitchat_conversations, persona_conversation
from .experiments import capped
from .methods import fact_hits, references, score

SUMMARY_UPDATE = (
    "Update the summary of our conversation with the messages above. Keep every name, place, job, number and "
    "date the user mentioned. Answer with the summary only, in at most three sentences."
)


@dataclass
class AgentChat:
    """One session: system prefix, the messages in order (facts first), held-out questions, keywords and cues."""

    name: str
    prefix: list[Message]
    messages: list[Message]
    queries: list[str]
    keywords: list[list[str]]
    cues: list[str]


def agent_chats(
    seeds: list[int], chat_messages: int, chitchat_seed: int, queries: int, chats: int = 1
) -> list[AgentChat]:
    """Persona facts (seeded) followed by real chat: `chats` chats of `chat_messages` messages, one after another."""
    real = chitchat_conversations(len(seeds) * chats, seed=chitchat_seed, min_messages=chat_messages)
    out = []
    for k, seed in enumerate(seeds):
        persona = persona_conversation(seed, cued=True)
        picked = real[k * chats : (k + 1) * chats]
        talk = [m for chat in picked for m in (chat.context + chat.window)[:chat_messages]]
        out.append(
            AgentChat(
                f"agent-{seed}-{picked[0].name}" + (f"-x{chats}" if chats > 1 else ""),
                persona.prefix,
                persona.context + talk,
                persona.queries[:queries],
                persona.keywords[:queries],
                persona.cues[:queries],
            )
        )
    return out


def stream_session(
    make_memory: Callable[..., Any], chat: AgentChat, data_dir: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Feed `chat` message by message through a fresh `AbsorberMemory`, wait for absorption, and describe it."""
    memory = make_memory(data_dir, overrides)
    try:
        memory.set_prefix("s", chat.prefix)
        started = time.perf_counter()
        for message in chat.messages:
            memory.add_messages([message], session_id="s")
        memory.flush()
        wall = time.perf_counter() - started
        jobs = memory.jobs("s")
        bad = [f"job {j.id}: {j.status} {j.error}" for j in jobs if j.status != "done"]
        if bad:
            raise RuntimeError(f"streaming absorption did not finish: {bad}")
        rows = {m.id: m for m in memory.transcript("s")}
        adapter = memory.adapter_path("s")
        kept = data_dir / "adapter"
        if adapter is not None:
            shutil.copytree(adapter, kept)
        return {
            "absorbed": [m.as_chat() for m in rows.values() if m.absorbed and m.role != "system"],
            "window": [m.as_chat() for m in memory.window("s")],
            "chunks": [[rows[i].as_chat() for i in j.message_ids] for j in jobs if j.message_ids],
            "adapter": kept if adapter is not None else None,
            "jobs": [{"kind": j.kind, **{k: j.metrics.get(k) for k in _JOB_FIELDS}} for j in jobs],
            "wall_seconds": wall,
        }
    finally:
        memory.close()


_JOB_FIELDS = (
    "teacher",
    "context_tokens",
    "teacher_context_tokens",
    "sync_tokens",
    "steps",
    "seconds",
    "teacher_seconds",
    "final_loss",
    "stopped_by",
    "heldout_tokens",
    "step_tokens",
    "step_attention_pairs",
    "step_window_pairs",
    "refresh_tokens",
    "refresh_attention_pairs",
)


def running_summary(engine: Any, prefix: list[Message], chunks: list[list[Message]], max_new_tokens: int) -> str:
    """Fold each absorbed chunk into a summary with the frozen model, oldest first."""
    summary = ""
    for chunk in chunks:
        so_far = [{"role": "user", "content": f"Summary so far: {summary}"}] if summary else []
        ask = [{"role": "user", "content": SUMMARY_UPDATE}]
        summary = engine.generate(prefix, so_far + chunk + ask, max_new_tokens, base=True).strip()
    return summary


def with_summary(prefix: list[Message], summary: str) -> list[Message]:
    text = (prefix[0]["content"] + "\n\n" if prefix else "") + f"Summary of the earlier conversation: {summary}"
    return [{"role": "system", "content": text}] + prefix[1:]


def prefill_seconds_per_token(engine: Any, ids: list[int], tokens: int) -> float:
    """Seconds per token of one no-grad forward over `tokens` tokens (the transcript's ids, repeated): best of 2."""
    seq = (ids * (tokens // max(1, len(ids)) + 1))[:tokens]
    device = next(engine.model.parameters()).device
    best = float("inf")
    with torch.no_grad(), engine.adapter_disabled():
        for _ in range(2):
            start = time.perf_counter()
            engine.model(input_ids=torch.tensor([seq], device=device), use_cache=False, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best / tokens


def evaluate_chat(
    engine: Any,
    chat: AgentChat,
    streams: dict[str, dict[str, Any]],
    max_new_tokens: int,
    tick: Callable[[str], None],
    stream_engines: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every method on one chat; returns method -> raw result.

    `stream_engines` names, per stream row, an engine of the same base model whose adapter has that row's
    shape (a row adapting other layers than `engine` does); the other rows are scored with `engine`.
    """
    first = next(iter(streams.values()))
    conv = Conversation(
        chat.name, "agent", first["absorbed"], first["window"], chat.queries, chat.keywords, chat.prefix, chat.cues
    )
    refs = references(engine, conv, max_new_tokens)
    results: dict[str, dict[str, Any]] = {}

    def run(
        name: str, prefix: list[Message], *, with_context: bool, adapter: bool, scorer: Any = engine, **cost: Any
    ) -> None:
        tick(f"{name} on {chat.name}")
        results[name] = {
            **score(
                scorer, conv, refs, prefix, with_context=with_context, adapter=adapter, max_new_tokens=max_new_tokens
            ),
            **cost,
        }

    run("full", chat.prefix, with_context=True, adapter=False)
    run("truncation", chat.prefix, with_context=False, adapter=False)
    start = time.perf_counter()
    summary = running_summary(engine, chat.prefix, first["chunks"], 64)
    run(
        "summary",
        with_summary(chat.prefix, summary),
        with_context=False,
        adapter=False,
        seconds=time.perf_counter() - start,
        summary=summary,
    )
    tick(f"one-shot absorption on {chat.name}")
    engine.reset_adapter()
    report = engine.run_round(
        chat.prefix,
        conv.context,
        [],
        n_probes=engine.config.probe_count,
        following=capped(engine, conv.window, engine.config.sync_tokens),
        base_teacher=True,
    )
    run(
        "one-shot",
        chat.prefix,
        with_context=False,
        adapter=True,
        seconds=report.seconds,
        absorbed_tokens=report.context_tokens,
        jobs=[report.to_dict()],
    )
    for name, stream in streams.items():
        if stream["window"] != conv.window:
            raise RuntimeError(f"{name}: its window differs from the others' (planning should not depend on it)")
        scorer = (stream_engines or {}).get(name, engine)
        scorer.load_adapter(stream["adapter"])
        run(
            name,
            chat.prefix,
            with_context=False,
            adapter=True,
            scorer=scorer,
            seconds=sum(j["seconds"] for j in stream["jobs"]),
            absorbed_tokens=sum(j["context_tokens"] for j in stream["jobs"] if j["kind"] != "consolidation"),
            jobs=stream["jobs"],
            wall_seconds=stream["wall_seconds"],
        )
    for result in results.values():
        result["hit_list"] = fact_hits(refs, result["answers"])
    results["full"]["references"] = [r.answer for r in refs]
    return results


def decoder_linears(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    """The base model's linear layers but the LM head, by name (a PEFT model's base layers; LoRA's own excluded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def linear_params(model: Any) -> int:
    """Weights of the decoder's linear layers (the matmuls a training step runs; embeddings and head excluded)."""
    return sum(m.weight.numel() for _, m in decoder_linears(model))


def step_linear_flops(model: Any, lora_layers: list[int] | None = None) -> int:
    """Useful linear-layer FLOPs of a training step per sync token.

    The forward runs every decoder linear layer (2 x weights); the backward computes input gradients
    (2 x weights, base weights are frozen) only from the top down to the lowest adapted layer, which is
    every layer when `lora_layers` is None.
    """
    from ..config import decoder_layer_count, resolve_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lowest = 0 if lora_layers is None else min(resolve_layers(lora_layers, decoder_layer_count(base)))
    forward = backward = 0
    for name, module in decoder_linears(base):
        index = re.search(r"\.(\d+)\.", name + ".")
        forward += module.weight.numel()
        backward += module.weight.numel() if index is None or int(index.group(1)) >= lowest else 0
    return 2 * (forward + backward)


def attention_pair_flops(model: Any, lora_layers: list[int] | None = None) -> tuple[int, int, int]:
    """FLOPs of attention per query-key pair, over all decoder layers: `(a training step's, a forward's,
    a training step's with a stored window key)`.

    A forward multiplies each query with each key it sees and weighs each value (2 x 2 x heads x head
    size per pair and layer); the backward computes the gradients of queries, keys, values and scores,
    twice that, in the layers it reaches (from the top down to the lowest adapted, as `step_linear_flops`).
    A stored window key takes no gradient (`attention.absorber_attention`): its backward computes the
    scores' and queries' gradients only, as much as the forward.
    """
    from ..config import decoder_layer_count, resolve_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    layers = decoder_layer_count(base)
    lowest = 0 if lora_layers is None else min(resolve_layers(lora_layers, layers))
    forward = 4 * width * layers
    return forward + 8 * width * (layers - lowest), forward, forward + 4 * width * (layers - lowest)


def matmul_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this device (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_matmul_peak_flops(model: Any, tokens: int, repeats: int = 3) -> float:
    """Measured fp32 FLOP/s of a training step's linear matmuls alone, at this model's shapes and `tokens` rows.

    Per decoder linear layer (out x in), the forward `X W^T` and the input gradient `dY W` (base weights are
    frozen, so no weight gradient): the matmuls "useful work" counts, 4 x weights x tokens, timed back to
    back with nothing else (best of `repeats`). Small layers run below the square-matmul peak; this is
    the ceiling a step at these shapes could reach.
    """
    shapes = [tuple(m.weight.shape) for _, m in decoder_linears(model)]
    weights = {shape: torch.randn(*shape) for shape in set(shapes)}
    inputs = {shape: (torch.randn(tokens, shape[1]), torch.randn(tokens, shape[0])) for shape in set(shapes)}
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            for shape in shapes:
                x, dy = inputs[shape]
                torch.mm(x, weights[shape].t())
                torch.mm(dy, weights[shape])
            best = min(best, time.perf_counter() - start)
    return 4 * sum(o * i for o, i in shapes) * tokens / best


def pooled_rows(
    raw: dict[str, list[dict[str, Any]]],
    prefill_4k: float,
    params: int,
    step_flops: dict[str, int] | None = None,
    pair_flops: dict[str, tuple[int, int, int]] | None = None,
) -> list[dict[str, Any]]:
    """One row per method, pooled over chats (KL over all answer tokens, recall over all questions).

    A method's training FLOP/s (`train_gflops`) counts `step_flops[method]` per sync token of a step
    (`step_linear_flops`), else 4 x `params`: every linear layer forward and back. `work_gflops` adds the
    rest of the matmuls' useful work: attention, `pair_flops[method]` per query-key pair of a step, of a
    window refresh and of a step with a stored window key (`attention_pair_flops`), and the refreshes'
    linear layers (2 x `params` a token); it needs every job to report its pairs.
    """

    def kl(rs: list[dict[str, Any]]) -> float:
        return sum(r["kl_sum"] for r in rs) / max(1, sum(r["tokens"] for r in rs))

    base = kl(raw["truncation"])
    # The same KL on only the questions the full-context model answers correctly: where it is a reference worth
    # matching (elsewhere a method that states the fact the reference misses is counted as far from it).
    right = [r["hit_list"] for r in raw["full"]]

    def kl_right(rs: list[dict[str, Any]]) -> float | None:
        pairs = [
            (k, n)
            for r, hits in zip(rs, right, strict=True)
            for k, n, hit in zip(r.get("kl_list", []), r.get("token_list", []), hits, strict=False)
            if hit
        ]
        return sum(k for k, _ in pairs) / max(1, sum(n for _, n in pairs)) if pairs else None

    base_right = kl_right(raw["truncation"])
    per_chat_base = {r["chat"]: kl([r]) for r in raw["truncation"]}
    teacher_right = [h for r in raw["full"] for h in r["hit_list"]]
    rows = []
    for name, rs in raw.items():
        hits = [h for r in rs for h in r["hit_list"]]
        both = sum(h and t for h, t in zip(hits, teacher_right, strict=True))
        absorbed = sum(r.get("absorbed_tokens", 0) for r in rs)
        seconds = sum(r.get("seconds", 0.0) for r in rs)
        jobs = [j for r in rs for j in r.get("jobs", [])]
        train = sum(j["seconds"] - j["teacher_seconds"] for j in jobs)
        # Held-out sync tokens ride in the same forwards (and backwards), so they count as work done; a
        # report's `step_tokens` leaves out the window that steps read through stored keys and values.
        step_tokens = sum(
            j.get("step_tokens") or j["steps"] * (j["sync_tokens"] + (j.get("heldout_tokens") or 0)) for j in jobs
        )
        linear = (step_flops or {}).get(name, 4 * params)
        train_pair, forward_pair, window_pair = (pair_flops or {}).get(name, (0, 0, 0))
        counted = bool(jobs) and train_pair > 0 and all(j.get("step_attention_pairs") is not None for j in jobs)
        work = linear * step_tokens + sum(
            train_pair * ((j.get("step_attention_pairs") or 0) - (j.get("step_window_pairs") or 0))
            + window_pair * (j.get("step_window_pairs") or 0)
            + 2 * params * (j.get("refresh_tokens") or 0)
            + forward_pair * (j.get("refresh_attention_pairs") or 0)
            for j in jobs
        )
        per_chat = [1.0 - kl([r]) / per_chat_base[r["chat"]] if per_chat_base.get(r["chat"]) else None for r in rs]
        right_kl = kl_right(rs)
        rows.append(
            {
                "method": name,
                "kl": kl(rs),
                "gap_closed": 1.0 - kl(rs) / base if base > 0 else None,
                "gap_where_full_right": 1.0 - right_kl / base_right if base_right and right_kl is not None else None,
                "recall": sum(hits) / max(1, len(hits)),
                "relative_recall": both / sum(teacher_right) if sum(teacher_right) else None,
                "seconds": seconds,
                "absorbed_tokens": absorbed or None,
                "s_per_absorbed_token": seconds / absorbed if absorbed else None,
                "x_prefill_4k": seconds / absorbed / prefill_4k if absorbed else None,
                "train_gflops": linear * step_tokens / train / 1e9 if train > 0 else None,
                "work_gflops": work / train / 1e9 if train > 0 and counted else None,
                "teachers": ",".join(sorted({str(j.get("teacher")) for j in jobs})) or None,
                "gap_per_session": " / ".join("-" if g is None else f"{g:.2f}" for g in per_chat),
                "steps_per_round": sum(j["steps"] for j in jobs) / len(jobs) if jobs else None,
            }
        )
    return rows


#: Settings that make an adapter another shape or scale: a row changing one is scored by an engine made with it.
ADAPTER_SHAPE = ("lora_rank", "lora_alpha", "lora_targets", "lora_layers")


def adapter_shape(config: Any) -> tuple[Any, ...]:
    """`config`'s values of `ADAPTER_SHAPE`, in that order."""
    return tuple(getattr(config, key) for key in ADAPTER_SHAPE)


def streaming_experiment(
    load_engine: Callable[..., Any],
    make_memory: Callable[..., Any],
    chats: list[AgentChat],
    *,
    streams: dict[str, dict[str, Any]],
    max_new_tokens: int,
    tick: Callable[[str], None],
) -> dict[str, Any]:
    """Stream each chat once per entry of `streams` (row name -> config overrides), evaluate every method, pool.

    `load_engine(extra)` builds an engine with `extra` config overrides; a row whose adapter settings
    (`ADAPTER_SHAPE`: rank, alpha, targets, layers) differ from the first engine's is scored with an engine
    of its own, built with those settings (its adapter has another shape or scale).
    """
    engine = load_engine({})
    stream_engines: dict[str, Any] = {}
    for row, extra in streams.items():
        shape = adapter_shape(engine.config.model_copy(update=extra))
        if shape != adapter_shape(engine.config):
            same = next((e for e in stream_engines.values() if adapter_shape(e.config) == shape), None)
            stream_engines[row] = same or load_engine(dict(zip(ADAPTER_SHAPE, shape, strict=True)))
    raw: dict[str, list[dict[str, Any]]] = {}
    prefill: list[dict[str, float]] = []
    work = Path(tempfile.mkdtemp(prefix="absorber-streaming-"))
    try:
        for chat in chats:
            streamed = {}
            for k, (row, extra) in enumerate(streams.items()):
                tick(f"{row} on {chat.name}")
                streamed[row] = stream_session(make_memory, chat, work / f"{chat.name}-{k}", extra)
            for name, result in evaluate_chat(engine, chat, streamed, max_new_tokens, tick, stream_engines).items():
                raw.setdefault(name, []).append({"chat": chat.name, **result})
            ids = engine.fmt.encode(chat.prefix, chat.messages)
            prefill.append(
                {
                    "transcript_tokens": len(ids),
                    "transcript": prefill_seconds_per_token(engine, ids, len(ids)),
                    "at_4k": prefill_seconds_per_token(engine, ids, 4096),
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prefill_4k = min(p["at_4k"] for p in prefill)
    params = linear_params(engine.model)
    # Rows adapting some layers only run part of the backward pass: count the work each row's steps did.
    step_flops = {
        name: step_linear_flops(engine.model, engine.config.model_copy(update=extra).lora_layers)
        for name, extra in [("one-shot", {}), *streams.items()]
    }
    jobs = [j for name, rs in raw.items() if name.startswith("stream-") for r in rs for j in r.get("jobs", [])]
    step_tokens = round(sum(j["sync_tokens"] for j in jobs) / len(jobs)) if jobs else 256
    pair_flops = {
        name: attention_pair_flops(engine.model, engine.config.model_copy(update=extra).lora_layers)
        for name, extra in [("one-shot", {}), *streams.items()]
    }
    return {
        "rows": pooled_rows(raw, prefill_4k, params, step_flops, pair_flops),
        "prefill": prefill,
        "prefill_s_per_token_4k": prefill_4k,
        "matmul_peak_gflops": matmul_peak_flops() / 1e9,
        "model_matmul_tokens": step_tokens,
        "model_matmul_peak_gflops": model_matmul_peak_flops(engine.model, max(1, step_tokens)) / 1e9,
        "linear_params": params,
        "chats": [c.name for c in chats],
        "raw": raw,
    }


def plot_streaming(result: dict[str, Any], path: Path) -> None:
    from .report import _pyplot

    plt = _pyplot()
    rows = [r for r in result["rows"] if r["method"] != "full"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].barh(names, [r["gap_closed"] or 0.0 for r in rows], color="tab:blue")
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set_xlabel("KL gap closed vs truncation")
    axes[1].barh(names, [r["relative_recall"] or 0.0 for r in rows], color="tab:green")
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("recall relative to the full-context model")
    costly = [r for r in rows if r["x_prefill_4k"]]
    axes[2].scatter([r["x_prefill_4k"] for r in costly], [r["gap_closed"] or 0.0 for r in costly])
    for r in costly:
        axes[2].annotate(r["method"], (r["x_prefill_4k"], r["gap_closed"] or 0.0), fontsize=8)
    axes[2].set_xlabel("absorption cost per token, x prefill at 4k")
    axes[2].set_ylabel("gap closed")
    split = result.get("settings", {}).get("split", "test")
    fig.suptitle(f"Streaming agent path: {len(result['chats'])} {split} sessions (questions never used as probes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
