"""Greedy (or sampled) generation from token ids, streaming, and right-padded batching.

Small shared helpers: probes, `ParametricMemory.generate` and the fidelity
metric all generate from ids that `ChatFormat` produced; chat integrations
stream text with stop strings through `TextStream`; absorption runs several
sync segments through the model as one right-padded batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from .attention import absorber_attention, sliding
from .errors import ConfigError

T = TypeVar("T")


def _generate_settings(tokenizer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`model.generate` settings: greedy with the tokenizer's pad/EOS unless `kwargs` say otherwise.

    Raises `ConfigError` for a `max_new_tokens` that is not a positive integer (before transformers sees it).
    """
    most = kwargs.get("max_new_tokens")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ConfigError(f"`max_new_tokens` must be a positive integer, got {most!r}")
    settings: dict[str, Any] = {
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **kwargs,
    }
    if not settings.get("do_sample"):
        settings.update(temperature=None, top_p=None, top_k=None)  # silence sampling-only settings
    return settings


def sampling_settings(temperature: float | None, top_p: float | None = None) -> dict[str, Any]:
    """Sampling settings from chat-API knobs: greedy at temperature 0 (or unset), sampling above."""
    if not temperature:
        return {"do_sample": False}
    settings: dict[str, Any] = {"do_sample": True, "temperature": temperature}
    if top_p is not None:
        settings["top_p"] = top_p
    return settings


def generate_ids(model: Any, tokenizer: Any, input_ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """New token ids the model generates after `input_ids` (greedy unless `do_sample=True`).

    Stops at the tokenizer's EOS; the EOS itself is not returned.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    settings = _generate_settings(tokenizer, {"max_new_tokens": max_new_tokens, **kwargs})
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    return _until_eos(out[0, len(input_ids) :].tolist(), tokenizer.eos_token_id)


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


#: Prompts that share at least this many leading tokens read them once from a KV cache (see `PromptCache`).
#: Below it, one left-padded batch costs less: batch-1 decoding is slow next to re-reading a short prefix.
SHARED_PREFIX_TOKENS = 256


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_CACHE_KEYWORDS: dict[type, str] = {}  # per model class: the keyword its forward takes a KV cache by


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for passing a KV cache to `model`'s forward or `generate`.

    Transformers 5.24 renamed `past_key_values` to `cache` (the old name warns and goes in 5.40 for
    forward, 6.0 for generate); the keyword is the one the base model's forward declares, so both
    older and newer versions run without warnings. A PEFT model is looked through to its base model.
    """
    kind = type(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if kind not in _CACHE_KEYWORDS:
        declared = inspect.signature(kind.forward).parameters
        _CACHE_KEYWORDS[kind] = "cache" if "cache" in declared else "past_key_values"
    return {_CACHE_KEYWORDS[kind]: cache}


def crop_cache(cache: Any, length: int) -> None:
    """Shorten a KV cache to its first `length` tokens (a negative `crop` works in transformers 4.x and 5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class PromptCache:
    """The KV cache of the last generation, reused by a next prompt that starts with the same tokens.

    Answering probes one after another over a long shared context (each probe
    of a chain after the absorbed history, or several probes after the same
    history) then reads that context once rather than once per probe; with
    3k tokens of history, eight chained probes and the teacher's own forward
    read the same way, a round's teacher time halves. The teacher's targets
    then continue from the same cache (`Absorber.train(read=...)`). Answers
    equal those of fresh prompts up to float rounding (the prompt is read in
    two pieces). A prompt that shares fewer than
    `SHARED_PREFIX_TOKENS` with the cached one is read from scratch. One cache
    serves one model state: build a new one when the adapter (or its being on
    or off) changes. Not thread-safe.

    With `record` > 0, `branch_generate_ids` also keeps every layer's hidden
    states (and with `record_logits` the logits) of the last `record` tokens
    of the shared start it reads: the teacher's targets at those positions
    (the window, in a streaming round) are then read off them rather than
    computed again (`Absorber.train(read=...)`).
    """

    def __init__(self, record: int = 0, record_logits: bool = False) -> None:
        self.ids: list[int] = []
        self.cache: Any = None
        self.record = record
        self.record_logits = record_logits
        #: Per layer `[1, T, hidden]` (then the logits `[1, T, vocab]` with `record_logits`) of `ids[states_from:]`.
        self.states: tuple[torch.Tensor, ...] | None = None
        self.states_from = 0

    def generate_ids(
        self, model: Any, tokenizer: Any, input_ids: list[int], max_new_tokens: int, **kwargs: Any
    ) -> list[int]:
        """`generate_ids`, reading from the cache whatever of `input_ids` it already holds."""
        from transformers import DynamicCache

        self.states = None  # recorded by `branch_generate_ids` only

        keep = min(common_prefix(self.ids, input_ids), len(input_ids) - 1)  # at least one token is read anew
        if self.cache is None or keep < max(1, SHARED_PREFIX_TOKENS):  # a short shared start: read it all anew
            self.cache = DynamicCache()
        else:
            crop_cache(self.cache, keep)
        device = next(model.parameters()).device
        ids = torch.tensor([input_ids], device=device)
        settings = _generate_settings(tokenizer, {"max_new_tokens": max_new_tokens, **kwargs})
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, self.cache), **settings
            )
        tokens = out[0].tolist()
        self.ids = tokens[: self.cache.get_seq_length()]  # the last generated token was never read
        return _until_eos(tokens[len(input_ids) :], tokenizer.eos_token_id)


def branch_generate_ids(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, cache: PromptCache | None = None
) -> list[list[int]]:
    """Greedy answers to prompts that share a start, decoded together in one sequence; results in prompt order.

    The shared start is read once (through `cache` when it already holds some of it); each prompt's own
    tail and then one new token per unfinished prompt a step join that single sequence, and a custom
    attention mask lets each token see the shared start and its own prompt's tokens only, with its own
    positions. So a step decodes every prompt for the cost of one sequence's step (the weights and the
    shared keys and values are read once, not once per prompt), and the answers are those of
    `generate_ids` on each prompt alone, up to float rounding. Afterwards `cache` holds the shared start.
    """
    from transformers import DynamicCache

    _generate_settings(tokenizer, {"max_new_tokens": max_new_tokens})  # generate_ids' check on max_new_tokens
    if not prompts:
        return []
    shared = min(min(common_prefix(prompts[0], p) for p in prompts), min(map(len, prompts)) - 1)
    reader = cache if cache is not None else PromptCache()
    keep = min(common_prefix(reader.ids, prompts[0]), shared)
    if reader.cache is None or keep < max(1, SHARED_PREFIX_TOKENS):
        reader.cache, keep = DynamicCache(), 0
    else:
        crop_cache(reader.cache, keep)
    device = next(model.parameters()).device
    with_cache = cache_kwargs(model, reader.cache)
    with torch.no_grad(), absorber_attention(model):  # masked steps: grouped heads read the cache unrepeated
        tail = min(reader.record, shared - keep)
        if shared - tail > keep:
            head = torch.tensor([prompts[0][keep : shared - tail]], device=device)
            model(input_ids=head, **with_cache, use_cache=True, logits_to_keep=1)
        reader.states = None
        if tail:  # read apart, so the states kept are the tail's only
            head = torch.tensor([prompts[0][shared - tail : shared]], device=device)
            with absorber_attention(model, window=reader.cache.get_seq_length()):  # one row after the cache
                out = model(
                    input_ids=head,
                    **with_cache,
                    use_cache=True,
                    output_hidden_states=True,
                    logits_to_keep=tail if reader.record_logits else 1,
                )
            reader.states = (*out.hidden_states[1:], out.logits) if reader.record_logits else out.hidden_states[1:]
            reader.states_from = shared - tail
        reader.ids = prompts[0][:shared]
        answers: list[list[int]] = [[] for _ in prompts]
        tokens = [p[shared:] for p in prompts]  # what each prompt reads next
        first = [shared] * len(prompts)  # the position of the first of them
        owner: list[int] = []  # which prompt each cached token after the shared start belongs to
        where: list[int] = []  # and its position
        live = list(range(len(prompts)))
        eos = tokenizer.eos_token_id
        dtype = next(model.parameters()).dtype
        while live:
            q_owner = [b for b in live for _ in tokens[b]]
            q_pos = [first[b] + i for b in live for i in range(len(tokens[b]))]
            k_owner = torch.tensor(owner + q_owner, device=device)
            k_pos = torch.tensor(where + q_pos, device=device)
            qo = torch.tensor(q_owner, device=device)[:, None]
            qp = torch.tensor(q_pos, device=device)[:, None]
            own = (k_owner[None, :] == qo) & (k_pos[None, :] <= qp)
            allowed = torch.cat([torch.ones(len(q_owner), shared, dtype=torch.bool, device=device), own], dim=1)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            ends, at = [], 0
            for b in live:
                at += len(tokens[b])
                ends.append(at - 1)
            out = model(
                input_ids=torch.tensor([[t for b in live for t in tokens[b]]], device=device),
                position_ids=torch.tensor([q_pos], device=device),
                attention_mask=mask[None, None],
                **with_cache,
                use_cache=True,
                logits_to_keep=torch.tensor(ends, device=device),
            )
            picks = out.logits[0].argmax(-1).tolist()
            owner += q_owner
            where += q_pos
            still = []
            for b, token in zip(live, picks, strict=True):
                first[b] += len(tokens[b])
                tokens[b] = [token]
                if token == eos:
                    continue
                answers[b].append(token)
                if len(answers[b]) < max_new_tokens:
                    still.append(b)
            live = still
        crop_cache(reader.cache, shared)
    return answers


def generate_batch_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    max_batch_tokens: int = 8192,
    cache: PromptCache | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """`generate_ids` for several prompts, run as left-padded batches; results in prompt order.

    Decoding one token for a batch costs little more than for one sequence on
    a CPU or GPU, so answering 14 probes this way took 8.5 s instead of ~30 s
    on SmolLM2-135M (2 CPU threads), with identical greedy answers.
    Prompts are grouped so a batch holds at most `max_batch_tokens` padded
    prompt tokens (a single longer prompt runs alone), which bounds the
    KV-cache memory when the context is long. Prompts that all start with the
    same `SHARED_PREFIX_TOKENS` or more read that shared start once (from
    `cache`, or a new `PromptCache`) and are decoded together by
    `branch_generate_ids` (greedy, no other `kwargs`, no sliding-window
    layers), else one by one from that cache.
    """
    if not prompts:
        return []
    shared = min(common_prefix(prompts[0], p) for p in prompts)
    if len(prompts) > 1 and shared >= SHARED_PREFIX_TOKENS:
        if not kwargs and not sliding(model):
            return branch_generate_ids(model, tokenizer, prompts, max_new_tokens, cache=cache)
        reader = cache if cache is not None else PromptCache()
        return [reader.generate_ids(model, tokenizer, p, max_new_tokens, **kwargs) for p in prompts]
    device = next(model.parameters()).device
    settings = _generate_settings(tokenizer, {"max_new_tokens": max_new_tokens, **kwargs})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[list[int]] = []
    start = 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and (end + 1 - start) * max(map(len, prompts[start : end + 1])) <= max_batch_tokens:
            end += 1
        group = prompts[start:end]
        width = max(map(len, group))
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, p in enumerate(group):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **settings)
        results += [_until_eos(row, tokenizer.eos_token_id) for row in out[:, width:].tolist()]
        start = end
    return results


def generate_text(model: Any, tokenizer: Any, input_ids: list[int], max_new_tokens: int, **kwargs: Any) -> str:
    """The answer `generate_ids` produces, decoded without special tokens and stripped."""
    new = generate_ids(model, tokenizer, input_ids, max_new_tokens, **kwargs)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def right_padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` for sequences padded on the right.

    Right padding keeps every real token at its natural position, so causal
    attention makes the padding invisible to the tokens we read out.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class _CountingStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that also counts generated tokens and notes whether EOS ended them."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.eos_token_id = tokenizer.eos_token_id
        self.generated = 0
        self.saw_eos = False

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            flat = value.reshape(-1).tolist()
            self.generated += len(flat)
            self.saw_eos = self.saw_eos or self.eos_token_id in flat
        super().put(value)


class _Cancelled:
    """A stopping criterion that ends generation once the reader has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Text of one generation, piece by piece, as a background thread produces it.

    The thread holds the model (via `model_scope`, e.g. the adapter lock)
    for the whole generation, so the reader may iterate from any thread
    (LangChain's async default resumes an iterator on executor threads).
    Text is held back while it could still be the start of a stop string;
    the stop string itself is never returned. Closing the iterator early
    stops the generation at the next token. After iteration, `input_tokens`,
    `output_tokens` and `finish_reason` ("stop" or "length") are set.

    Args:
        model_scope: a context-manager factory yielding the model to use.
        tokenizer: decodes the new tokens.
        input_ids: the prompt.
        max_new_tokens: most tokens to generate.
        stop: strings that end the answer (not included in it).
        kwargs: passed to `model.generate` (`do_sample`, `temperature`, ...).
    """

    def __init__(
        self,
        model_scope: Callable[[], contextlib.AbstractContextManager[Any]],
        tokenizer: Any,
        input_ids: list[int],
        max_new_tokens: int,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        _generate_settings(tokenizer, {"max_new_tokens": max_new_tokens})  # bad values fail here, not in the thread
        self.stop = [s for s in (stop or []) if s]
        self.input_tokens = len(input_ids)
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self._max_new = max_new_tokens
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._streamer = _CountingStreamer(tokenizer)
        self._thread = threading.Thread(
            target=self._run, args=(model_scope, tokenizer, input_ids, kwargs), name="absorber-generate", daemon=True
        )
        self._thread.start()

    def _run(
        self, model_scope: Callable[[], Any], tokenizer: Any, input_ids: list[int], kwargs: dict[str, Any]
    ) -> None:
        try:
            settings = _generate_settings(tokenizer, kwargs)
            if self.stop:
                settings.update(stop_strings=self.stop, tokenizer=tokenizer)
            with model_scope() as model:
                ids = torch.tensor([input_ids], device=next(model.parameters()).device)
                with torch.no_grad():
                    model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=self._max_new,
                        streamer=self._streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]),
                        **settings,
                    )
        except BaseException as exc:  # handed to the reader; the streamer must still end
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        text, sent = "", 0
        hold = max((len(s) for s in self.stop), default=1) - 1
        try:
            for piece in self._streamer:
                text += piece
                cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    self.finish_reason = "stop"
                    return
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold]
                    sent = len(text) - hold
            if self._error is not None:
                raise self._error
            if len(text) > sent:
                yield text[sent:]
        finally:
            self._cancel.set()
            self._thread.join()
            self.output_tokens = self._streamer.generated
            if self.finish_reason is None:
                self.finish_reason = (
                    "stop" if self._streamer.saw_eos or self.output_tokens < self._max_new else "length"
                )

    def text(self) -> str:
        """The whole answer (consumes the stream)."""
        return "".join(self)


_DONE = object()


async def aiterate(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator (e.g. over a `TextStream`) from async code, one item per worker-thread call.

    Leaving early closes the iterator, which stops the generation behind it.
    """
    try:
        while (item := await asyncio.to_thread(next, iterator, _DONE)) is not _DONE:
            yield item  # type: ignore[misc]
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
