"""Algorithm 1: absorb one context segment C into a LoRA adapter.

Teacher: the model as it is before this absorption (the frozen base for the
first one; base + the memory so far when streaming) reads `[prefix; C; S]`
once, without gradients; its hidden states at every layer, at the positions
of S, are cached. Student: the adapter being trained reads `[prefix; S]`.
AdamW on the adapter's LoRA weights minimises the distance between the two
(see `losses.py`) until it falls under `loss_threshold`, `max_steps` is
reached, or (with `early_stopping_patience`) the same distance on held-out
sync tokens has stopped falling.

Early stopping: the caller may hold out the last messages of sync segments
(the engine holds out a share of the probes). Their tokens are never
trained on; causal attention means the trained tokens before them cannot
see them either. Their loss is read off the same student forward as the
step's (no extra cost) or, for a segment held out whole, from a forward
without gradients. Training stops once that loss has not improved for
`early_stopping_patience` steps, and the adapter goes back to its state at
the best held-out loss.

Steps between (`window_grad_every` = k > 1): in a streaming round S starts
with the window (the turns still in the prompt), then the probes. Every
k-th step reads and trains all of S and keeps the window's keys and values
from that forward; the steps between read only what follows the window,
after those keys and values (detached, at most k - 1 updates old), so the
probes still attend to the window while a step costs only their tokens.
On a CPU their attention computes no gradients for those stored keys and
values, constants of the step (`attention.py`).

Positions (left open by the paper): the student reads S at its natural
positions right after the prefix, exactly where the window sits at inference
once C has left the prompt; the teacher reads S after C. The adapter thus
learns to act as if C were present without needing any position offset at
inference.

If the loss or the gradient norm turns non-finite (exploding gradients), or
anything raises mid-training (a cancelled job, say), the adapter is restored
to its state before this call, so a memory never holds a half-trained or
broken update.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from . import losses
from .attention import absorber_attention, splits_window
from .chat import ChatFormat, Message
from .config import AbsorberConfig
from .errors import AbsorptionError
from .generation import SHARED_PREFIX_TOKENS, PromptCache, cache_kwargs, common_prefix, crop_cache, right_padded


@dataclass
class AbsorptionReport:
    """What one absorption did; `to_dict()` is JSON-ready."""

    steps: int
    initial_loss: float
    final_loss: float
    stopped_by: str  # "threshold", "max_steps" or "early_stopping"
    context_tokens: int
    sync_tokens: int
    sync_segments: int
    probes: int
    seconds: float
    teacher_seconds: float
    loss_curve: list[float] = field(default_factory=list)
    #: Who taught: "frozen" (first round), "history" (frozen model reading every absorbed message), "chained".
    teacher: str = "frozen"
    #: Tokens the teacher read before S (C, plus earlier absorbed messages with a history teacher).
    teacher_context_tokens: int = 0
    #: Sync tokens held out of training (not in `sync_tokens`); with early stopping, their loss at each step
    #: and the step whose adapter was kept.
    heldout_tokens: int = 0
    heldout_curve: list[float] = field(default_factory=list)
    best_step: int | None = None
    #: "round" (absorbs C) or "consolidation" (re-teaches everything absorbed so far; absorbs nothing new).
    kind: str = "round"
    #: Sync tokens (trained and held out) the student's forwards read over all optimizer steps: `steps` x
    #: their sum, less the window on steps that read it through stored keys and values (`window_grad_every`;
    #: the gradient-free forwards that refresh them with `train_window=False` are counted apart: they train
    #: nothing). With `step_attention_pairs`, the query-key pairs those tokens' attention computed (each
    #: token attends to every position up to its own: the prefix, the window, S so far), the steps' work.
    step_tokens: int = 0
    step_attention_pairs: int = 0
    #: Of those, the pairs of steps' queries with stored window keys where those take no gradients
    #: (`attention.absorber_attention`'s split: a forward and the queries' gradient, no keys' or values').
    step_window_pairs: int = 0
    #: Window tokens re-read without gradients to refresh the stored keys and values, and their query-key pairs.
    refresh_tokens: int = 0
    refresh_attention_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    """Token ids of one absorption and where S sits in teacher and student inputs."""

    teacher: list[list[int]]
    student: list[list[int]]
    teacher_starts: list[int]
    student_starts: list[int]
    lengths: list[int]  # trained tokens of S per row
    lm_input: list[int]
    lm_start: int
    held: list[int]  # held-out tokens after them per row (early stopping)
    leads: list[int] = field(default_factory=list)  # tokens of each row's S that are the window (`window_grad_every`)


@dataclass
class _Targets:
    """The teacher's states (and next-token distributions, with `logit_kl`) at the trained and held-out tokens of S."""

    states: list[torch.Tensor]
    logits: losses.NextTokenTargets | None
    held_states: list[torch.Tensor]
    held_logits: losses.NextTokenTargets | None


#: Early stopping counts a held-out loss as improved only when it falls by more than this share.
_MIN_IMPROVEMENT = 1e-3


def _gather(states: tuple[torch.Tensor, ...], starts: list[int], lengths: list[int]) -> list[torch.Tensor]:
    """Per layer, the `[T, H]` states at each row's span `[start, start + length)`, rows concatenated."""
    return [
        torch.cat([layer[row, s : s + n] for row, (s, n) in enumerate(zip(starts, lengths, strict=True))])
        for layer in states
    ]


def _gather_rows(rows: list[tuple[torch.Tensor, ...]], starts: list[int], lengths: list[int]) -> list[torch.Tensor]:
    """`_gather` over rows that ran as separate forwards: `rows[i]` holds row i's layers, each `[1, T_i, H]`."""
    return [
        torch.cat([row[layer][0, s : s + n] for row, s, n in zip(rows, starts, lengths, strict=True)])
        for layer in range(len(rows[0]))
    ]


def _rows(tensor: torch.Tensor, lengths: list[int], rows: list[int]) -> torch.Tensor:
    """From a tensor of rows' spans concatenated in order (lengths `lengths`), the spans of `rows`, concatenated.

    All rows in order (every step without `sync_batch_segments`) is the tensor itself, not a copy.
    """
    if rows == list(range(len(lengths))):
        return tensor
    starts = [0, *itertools.accumulate(lengths)]
    return torch.cat([tensor[starts[r] : starts[r] + lengths[r]] for r in rows])


def _target_rows(
    targets: losses.NextTokenTargets | None, lengths: list[int], rows: list[int]
) -> losses.NextTokenTargets | None:
    """`_rows` of both fields of teacher distributions (None stays None)."""
    return None if targets is None else targets.select(lambda t: _rows(t, lengths, rows))


def _spans(tensor: torch.Tensor, lengths: list[int], rows: list[int], skip: dict[int, int]) -> torch.Tensor:
    """`_rows`, less the first `skip[r]` tokens of each row r's span (rows not in `skip` keep all)."""
    if not any(skip.get(r, 0) for r in rows):
        return _rows(tensor, lengths, rows)
    starts = [0, *itertools.accumulate(lengths)]
    return torch.cat([tensor[starts[r] + skip.get(r, 0) : starts[r] + lengths[r]] for r in rows])


def _target_spans(
    targets: losses.NextTokenTargets | None, lengths: list[int], rows: list[int], skip: dict[int, int]
) -> losses.NextTokenTargets | None:
    """`_spans` of both fields of teacher distributions (None stays None)."""
    return None if targets is None else targets.select(lambda t: _spans(t, lengths, rows, skip))


def _cache_of(out: Any) -> Any:
    """The KV cache a forward with `use_cache=True` returned (`cache` in transformers 5.24+)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _layer_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's `(keys, values)`, `[B, heads, T, D]`, of a `DynamicCache` (4.56+ and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _recorded(read: PromptCache, rows: list[list[int]], shared: int, want_logits: bool) -> list[torch.Tensor]:
    """The teacher states (then logits, if wanted) `read` recorded of the tokens after `shared` all `rows` start with.

    `read.states` hold the states of `read.ids[read.states_from:]` (`PromptCache.record`), with the
    logits if and only if they are wanted; each row keeps at least one token to read anew. Empty: none.
    """
    if not read.states or read.states_from > shared or read.record_logits != want_logits:
        return []
    end = read.states_from + read.states[0].shape[1]
    known = min(min(common_prefix(row[shared:end], read.ids[shared:end]), len(row) - shared - 1) for row in rows)
    return [t[:, shared - read.states_from :][:, :known] for t in read.states] if known > 0 else []


class _WindowKV:
    """For `window_grad_every`: per sync row, the detached keys and values of `[prefix; window]`.

    A full step stores them from each row's own training forward (no extra pass); the steps between
    read the window through them and run only the rest of the row. They lag the adapter by at most
    `every - 1` optimizer steps.
    """

    def __init__(self, every: int, leads: list[int]) -> None:
        self.every = every
        self.leads = leads
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def reuse(self, step: int, last: int) -> bool:
        """Whether `step` reads the stored windows (not a multiple of `every`, nor the final evaluation)."""
        return step % self.every != 0 and step != last

    def skip(self, rows: list[int]) -> dict[int, int]:
        """Of `rows`, those with stored keys and values, each with the tokens of S it reads through them."""
        return {r: self.leads[r] for r in rows if r in self.kv}

    def store(self, out: Any, batch: _Batch, group: list[int]) -> None:
        """Keep the window's keys and values of each row of `group` (the rows of forward `out`) that has one."""
        layers = _layer_kv(_cache_of(out))
        for i, r in enumerate(group):
            width = batch.student_starts[r] + batch.leads[r]
            if batch.leads[r] == 0 or batch.leads[r] >= batch.lengths[r]:
                continue  # no window, or nothing trained after it
            if any(k.shape[2] < width for k, _ in layers):
                continue  # a sliding-window layer kept less than the window: this row always runs whole
            self.kv[r] = [
                (k[i : i + 1, :, :width].detach().clone(), v[i : i + 1, :, :width].detach().clone()) for k, v in layers
            ]


def causal_pairs(start: int, count: int) -> int:
    """Query-key pairs of causal attention for `count` tokens at positions `start, start + 1, ...`.

    The token at position i attends to positions 0..i: `count * start + count * (count + 1) / 2` in all.
    """
    return count * start + count * (count + 1) // 2


def _check_per_segment(name: str, counts: list[int], segments: list[list[Message]]) -> None:
    """Raise unless `counts` holds one message count per segment, each within its segment."""
    if len(counts) != len(segments) or any(not 0 <= k <= len(seg) for k, seg in zip(counts, segments, strict=False)):
        raise ValueError(f"`{name}` needs one count per segment, each within it; got {counts}")


def _output_head(model: Any) -> Any:
    """The model's LM head module, or None for a model without `get_output_embeddings`."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if get_head is not None else None


def plain_output_weight(model: Any) -> torch.Tensor | None:
    """The LM head's weight when the logits are exactly `last hidden state @ weight.T`, else None.

    Checked on the model itself: a frozen, bias-free `nn.Linear` head whose product with the last
    entry of `hidden_states` gives the model's own logits on a short input. Heads that scale or cap
    the logits, carry a bias or are adapted fail the check, and their losses read the model's logits.
    """
    head = _output_head(model)
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    ids = torch.arange(1, 9, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        mine, theirs = head(out.hidden_states[-1]).float(), out.logits.float()
    if mine.shape != theirs.shape:
        return None
    tol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    return head.weight if torch.allclose(mine, theirs, rtol=tol, atol=tol * float(theirs.abs().max()) + 1e-6) else None


def segment_schedule(count: int, per_step: int | None, seed: int) -> Callable[[], list[int]]:
    """Which sync segments each optimizer step trains on.

    With `per_step` None (or >= `count`), every step uses all segments.
    Otherwise each step takes the next `per_step` of a seeded shuffled
    cycle through the segments, so all of them get the same number of
    steps, give or take one, and the step cost no longer grows with the
    number of probes. A step's loss (the one `loss_threshold` is compared
    with) is then that of its subset.
    """
    if per_step is None or per_step >= count:
        return lambda: list(range(count))
    rng = random.Random(seed)
    order: list[int] = []

    def next_rows() -> list[int]:
        nonlocal order
        if len(order) < per_step:
            cycle = list(range(count))
            rng.shuffle(cycle)
            order += cycle
        rows, order = order[:per_step], order[per_step:]
        return rows

    return next_rows


#: A row joins a micro-batch only if padding it to the batch's longest row adds at most this share of that width.
_MOST_PADDING = 0.25


def micro_batches(widths: list[int], rows: list[int], config: AbsorberConfig) -> list[list[int]]:
    """`rows` grouped for one student forward each: longest first, at most `micro_batch_tokens` padded tokens.

    `widths[r]` is row r's full student length (prefix + S). Rows go longest first; a row joins the
    current group while the group stays within the budget and the row is at most `_MOST_PADDING`
    shorter than the group's longest (one long recitation segment and eight short probes run as two
    forwards, not as one that pads a probe to the long segment's width); a row longer than the budget
    runs alone. A forward more costs far less than the padding: its fixed cost is a few milliseconds.
    """
    budget = config.micro_batch_tokens
    groups: list[list[int]] = []
    for row in sorted(rows, key=lambda r: -widths[r]):
        width = widths[groups[-1][0]] if groups else 0
        if groups and width * (len(groups[-1]) + 1) <= budget and widths[row] >= (1 - _MOST_PADDING) * width:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _lora_layers(model: Any, adapter: str) -> list[Any]:
    """The modules that `adapter` adapts, found by PEFT's own layer type."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def trainable_lora_parameters(model: Any, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of `adapter`; they alone get gradients, everything else is frozen."""
    mine = {
        id(p)
        for layer in _lora_layers(model, adapter)
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters())
    }
    params = []
    for param in model.parameters():
        param.requires_grad_(id(param) in mine)
        if id(param) in mine:
            params.append(param)
    if not params:
        raise AbsorptionError(f"adapter {adapter!r} has no LoRA weights on this model")
    return params


def lora_factors(model: Any, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """`(A, B, scale)` of every module `adapter` adapts (for the update penalty)."""
    return [
        (m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter]) for m in _lora_layers(model, adapter)
    ]


class Absorber:
    """Runs Algorithm 1 on a PEFT model's active adapter."""

    def __init__(self, model: Any, fmt: ChatFormat, config: AbsorberConfig) -> None:
        self.model = model
        self.fmt = fmt
        self.config = config
        #: Whether the logit-KL term may run through `losses.linear_kl_loss` (`plain_output_weight`).
        self.fused_head = True
        self._checked_head: tuple[int, torch.Tensor | None] | None = None

    def _output_weight(self) -> torch.Tensor | None:
        """The head's weight for `losses.linear_kl_loss`, or None to use the model's logits (checked once per head)."""
        if not self.fused_head:
            return None
        head = _output_head(self.model)
        if self._checked_head is None or self._checked_head[0] != id(head):
            self._checked_head = (id(head), plain_output_weight(self.model))
        return self._checked_head[1]

    def _student_logits(self, targets: _Targets | None) -> bool:
        """Whether a student forward must compute logits: the logit-KL term is on and the head is not fused."""
        return targets is not None and targets.logits is not None and self._output_weight() is None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _plan(
        self,
        prefix: list[Message],
        context: list[Message],
        segments: list[list[Message]],
        holdout: list[int],
        leads: list[int] | None = None,
    ) -> _Batch:
        p = self.fmt.prefix_ids(prefix)
        c = self.fmt.encode_segments(context)
        s = [self.fmt.encode_segments(seg) for seg in segments]
        held = [
            sum(self.fmt.count(m) for m in seg[len(seg) - k :]) if k else 0
            for seg, k in zip(segments, holdout, strict=True)
        ]
        return _Batch(
            teacher=[p + c + si for si in s],
            student=[p + si for si in s],
            teacher_starts=[len(p) + len(c)] * len(s),
            student_starts=[len(p)] * len(s),
            lengths=[len(si) - h for si, h in zip(s, held, strict=True)],
            lm_input=p + c,
            lm_start=len(p),
            held=held,
            leads=[
                sum(self.fmt.count(m) for m in seg[:k]) for seg, k in zip(segments, leads or [0] * len(s), strict=True)
            ],
        )

    def _forward(self, seqs: list[list[int]], logits: bool = True, logits_from: int = 0, cache: bool = False) -> Any:
        """Run a right-padded batch; without `logits` the LM head runs on one position only.

        Hidden-state losses never read logits, and skipping the vocabulary
        projection saves about a fifth of a small model's compute. With
        `logits_from`, logits cover positions `[logits_from, width)` only (the
        losses never read the prefix's or C's): `out.logits` is then that much
        narrower than the hidden states. With `cache`, the forward also returns its keys and values
        (`_cache_of`).
        """
        ids, mask = right_padded(seqs, self.fmt.tokenizer.pad_token_id or 0, self.device)
        keep = {"logits_to_keep": ids.shape[1] - logits_from} if logits and logits_from > 0 else {}
        keep = keep if logits else {"logits_to_keep": 1}
        return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=cache, **keep)

    def _refresh_window(self, batch: _Batch, window: _WindowKV, rows: list[int]) -> list[int]:
        """Store the current adapter's keys and values of each row's `[prefix; window]`, read without gradients.

        Returns the rows re-read (those with a window and something after it).
        """
        read = [r for r in rows if 0 < batch.leads[r] < batch.lengths[r]]
        with torch.no_grad():
            for r in read:
                width = batch.student_starts[r] + batch.leads[r]
                window.store(self._forward([batch.student[r][:width]], logits=False, cache=True), batch, [r])
        return read

    def _forward_after(self, kv: list[tuple[torch.Tensor, torch.Tensor]], ids: list[int], logits: bool) -> Any:
        """One row's tokens `ids` read after stored keys and values `kv` (positions continue after them)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys, values, layer)
        keep = {} if logits else {"logits_to_keep": 1}
        x = torch.tensor([ids], device=self.device)
        with absorber_attention(self.model, window=kv[0][0].shape[2]):  # the window's keys take no gradients
            return self.model(
                input_ids=x, **cache_kwargs(self.model, cache), use_cache=True, output_hidden_states=True, **keep
            )

    def _teacher_rows(
        self, batch: _Batch, want_logits: bool, read: PromptCache | None = None
    ) -> tuple[list[tuple[torch.Tensor, ...]], list[int]]:
        """Per teacher row, its layers' states (and last, its logits) as `[1, T, .]` tensors, and where S starts.

        Rows share `[prefix; C]`. When that is `SHARED_PREFIX_TOKENS` long or more, it is read once into a
        KV cache and each row's S runs after it on its own (a long history is then not read once per sync
        segment); otherwise the rows run in right-padded `micro_batches`. A `read` cache whose tokens start
        with `[prefix; C]` (the teacher's probe answers just read it, in the same model state) supplies
        that KV cache, so even a single row does not read C again; it is cropped to `[prefix; C]`.
        """
        shared = batch.teacher_starts[0]
        rows = batch.teacher
        long_shared = shared >= SHARED_PREFIX_TOKENS and all(len(r) > shared for r in rows)
        cache, recorded = None, []
        if long_shared and read is not None and common_prefix(read.ids, rows[0][:shared]) == shared:
            recorded = _recorded(read, rows, shared, want_logits)
            read.states = None  # taken (or of no use here): not held through training
            known = recorded[0].shape[1] if recorded else 0
            cache, read.ids = read.cache, read.ids[: shared + known]
            crop_cache(cache, shared + known)
        elif long_shared and len(rows) > 1:
            from transformers import DynamicCache

            cache = DynamicCache()
            head = torch.tensor([rows[0][:shared]], device=self.device)
            self.model(input_ids=head, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)
        if cache is not None:
            out_rows = []
            keep = {} if want_logits else {"logits_to_keep": 1}
            with_cache = cache_kwargs(self.model, cache)
            first = cache.get_seq_length()  # [prefix; C], and the tokens after it whose states `read` recorded
            for row in rows:
                ids = torch.tensor([row[first:]], device=self.device)
                with absorber_attention(self.model, window=first):  # each row after the cached keys and values
                    out = self.model(input_ids=ids, **with_cache, use_cache=True, output_hidden_states=True, **keep)
                hidden, logits = out.hidden_states[1:], out.logits
                if recorded:
                    hidden = tuple(torch.cat([r, h], 1) for r, h in zip(recorded, hidden, strict=False))
                    logits = torch.cat([recorded[-1], logits], 1) if want_logits else logits
                out_rows.append((*hidden, logits))
                crop_cache(cache, first)
            return out_rows, [0] * len(rows)
        found: dict[int, tuple[torch.Tensor, ...]] = {}
        for group in micro_batches([len(r) for r in rows], list(range(len(rows))), self.config):
            first = min(batch.teacher_starts[r] for r in group)
            out = self._forward([rows[r] for r in group], want_logits, logits_from=first)
            layers = (*out.hidden_states[1:], out.logits)
            found.update({r: tuple(t[i : i + 1] for t in layers) for i, r in enumerate(group)})
        return [found[r] for r in range(len(rows))], batch.teacher_starts

    def _teacher_targets(self, batch: _Batch, base_teacher: bool, read: PromptCache | None = None) -> _Targets:
        """Teacher states (and logits, if `logit_kl` is used) at S, computed once; `read`: see `_teacher_rows`."""
        want_logits = self.config.losses.get("logit_kl", 0) > 0
        adapter_off = self.model.disable_adapter() if base_teacher else contextlib.nullcontext()
        with torch.no_grad(), adapter_off:
            rows, starts = self._teacher_rows(batch, want_logits, read)
        held_starts = [s + n for s, n in zip(starts, batch.lengths, strict=True)]
        states = _gather_rows([r[:-1] for r in rows], starts, batch.lengths)
        held_states = _gather_rows([r[:-1] for r in rows], held_starts, batch.held)
        logits = [r[-1:] for r in rows]
        shifts = [r[0].shape[1] - r[-1].shape[1] for r in rows]  # logits may start after the states
        logit_starts = [s - k for s, k in zip(starts, shifts, strict=True)]
        logit_held = [s - k for s, k in zip(held_starts, shifts, strict=True)]
        return _Targets(  # distributions normalised once here rather than at every step
            states=states,
            logits=losses.next_token_targets(_gather_rows(logits, logit_starts, batch.lengths)[0])
            if want_logits
            else None,
            held_states=held_states,
            held_logits=losses.next_token_targets(_gather_rows(logits, logit_held, batch.held)[0])
            if want_logits
            else None,
        )

    def _sync_loss(
        self,
        out: Any,
        starts: list[int],
        lengths: list[int],
        states: list[torch.Tensor],
        logits: losses.NextTokenTargets | None,
        scales: dict[str, list[torch.Tensor]],
        total: int,
    ) -> torch.Tensor:
        """The weighted sync loss of one student forward's spans `[start, start + length)` against `states`.

        `scales` and `total` are those of the whole set the spans belong to, so parts add up (see `losses`).
        With a plain LM head (`plain_output_weight`), the logit-KL term reads the last hidden states
        through `losses.linear_kl_loss`, and the forward need not have computed logits.
        """
        student = _gather(out.hidden_states[1:], starts, lengths)
        terms = {
            kind: losses.hidden_sync_loss(student, states, kind, scales=sc, total_tokens=total)
            for kind, sc in scales.items()
        }
        weight = self._output_weight() if logits is not None else None
        if logits is not None and weight is not None:
            last = _gather(out.hidden_states[-1:], starts, lengths)[0]
            terms["logit_kl"] = losses.linear_kl_loss(last, weight, logits, total_tokens=total)
        elif logits is not None:
            shift = out.hidden_states[0].shape[1] - out.logits.shape[1]  # see `_forward(logits_from=...)`
            own = _gather((out.logits,), [s - shift for s in starts], lengths)[0]
            terms["logit_kl"] = losses.kl_to_targets(own, logits, total_tokens=total)
        return losses.weighted_sum(terms, self.config.losses)

    def _held_loss_part(
        self,
        out: Any,
        batch: _Batch,
        group: list[int],
        targets: _Targets,
        scales: dict[str, list[torch.Tensor]],
        starts: list[int] | None = None,
    ) -> float:
        """This forward's share of the held-out loss (rows `group` as the forward's rows), without gradients.

        `starts`: where each row's held-out tokens sit in `out` (default: after its trained ones in the student).
        """
        held = [batch.held[r] for r in group]
        if not any(held):
            return 0.0
        with torch.no_grad():
            part = self._sync_loss(
                out,
                starts or [batch.student_starts[r] + batch.lengths[r] for r in group],
                held,
                [_rows(t, batch.held, group) for t in targets.held_states],
                _target_rows(targets.held_logits, batch.held, group),
                scales,
                sum(batch.held),
            )
        return float(part)

    def _hidden_scales(self, states: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per hidden-state loss in use (l1, mse), the `layer_scales` of this set of teacher states."""
        kinds = [k for k in ("l1", "mse") if self.config.losses.get(k, 0) > 0]
        return {k: losses.layer_scales(states, k) for k in kinds}

    def _held_loss_rest(
        self, batch: _Batch, rows: list[int], targets: _Targets, scales: dict[str, list[torch.Tensor]]
    ) -> float:
        """The held-out loss of `rows` that no training forward of this step read (forwards without gradients)."""
        value = 0.0
        widths = [len(seq) for seq in batch.student]
        with torch.no_grad():
            for group in micro_batches(widths, rows, self.config):
                out = self._forward(
                    [batch.student[r] for r in group],
                    self._student_logits(targets),
                    logits_from=min(batch.student_starts[r] for r in group),
                )
                value += self._held_loss_part(out, batch, group, targets, scales)
        return value

    def _step(
        self,
        batch: _Batch,
        targets: _Targets | None,
        adapter: str,
        rows: list[int],
        backward: bool,
        held_scales: dict[str, list[torch.Tensor]] | None = None,
        window: _WindowKV | None = None,
        reuse: bool = False,
    ) -> tuple[float, float, set[int]]:
        """The loss of one step on sync segments `rows`; with `backward`, its gradients are accumulated.

        The student reads the rows in length-sorted micro-batches of at most `micro_batch_tokens` padded
        tokens (see `micro_batches`), each followed by its own backward pass: the loss and gradients
        equal those of one padded batch (each part is scaled by its share of the step's tokens),
        without the padding of short segments to the longest or the memory of one large batch.

        With `held_scales` (early stopping), also returns the held-out loss read off these forwards
        and the rows it covers.

        With `window` (`window_grad_every`), forwards of rows with a window keep its keys and values; with
        `reuse` too, each row that has them stored reads only what follows its window, after them, and the
        step's loss is over those tokens.
        """
        weights = self.config.losses
        value, held_value, held_rows = 0.0, 0.0, set()

        def add(part: torch.Tensor) -> None:
            nonlocal value
            value += float(part.detach())
            if backward and part.requires_grad:
                part.backward()

        if targets is not None:
            skip = window.skip(rows) if reuse and window is not None else {}  # S a row reads through stored K/V
            total = sum(batch.lengths[r] - skip.get(r, 0) for r in rows)
            scales = self._hidden_scales([_spans(t, batch.lengths, rows, skip) for t in targets.states])
            whole = [r for r in rows if r not in skip]
            for group in micro_batches([len(batch.student[r]) for r in range(len(batch.student))], whole, self.config):
                keep = window is not None and any(batch.leads[r] for r in group)
                out = self._forward(
                    [batch.student[r] for r in group],
                    self._student_logits(targets),
                    logits_from=min(batch.student_starts[r] for r in group),
                    cache=keep,
                )
                if keep and window is not None:
                    window.store(out, batch, group)
                loss = self._sync_loss(
                    out,
                    [batch.student_starts[r] for r in group],
                    [batch.lengths[r] for r in group],
                    [_rows(t, batch.lengths, group) for t in targets.states],
                    _target_rows(targets.logits, batch.lengths, group),
                    scales,
                    total,
                )
                if held_scales is not None:
                    held_value += self._held_loss_part(out, batch, group, targets, held_scales)
                    held_rows.update(group)
                add(loss)
            for r in skip:
                assert window is not None
                trained = batch.lengths[r] - skip[r]
                out = self._forward_after(
                    window.kv[r], batch.student[r][batch.student_starts[r] + skip[r] :], self._student_logits(targets)
                )
                loss = self._sync_loss(
                    out,
                    [0],
                    [trained],
                    [_spans(t, batch.lengths, [r], skip) for t in targets.states],
                    _target_spans(targets.logits, batch.lengths, [r], skip),
                    scales,
                    total,
                )
                if held_scales is not None:
                    held_value += self._held_loss_part(out, batch, [r], targets, held_scales, starts=[trained])
                    held_rows.add(r)
                add(loss)
        if weights.get("lm", 0) > 0:
            out = self._forward([batch.lm_input])
            start = max(batch.lm_start, 1)  # with no prefix, nothing predicts the first token
            logits = out.logits[0, start - 1 : len(batch.lm_input) - 1]
            target = torch.tensor(batch.lm_input[start:], device=self.device)
            add(weights["lm"] * losses.lm_loss(logits, target))
        if self.config.update_penalty != "none":
            penalty = losses.lora_update_penalty(lora_factors(self.model, adapter), self.config.update_penalty)
            add(self.config.update_penalty_weight * penalty)
        return value, held_value, held_rows

    def train(
        self,
        prefix: list[Message],
        context: list[Message],
        segments: list[list[Message]],
        *,
        base_teacher: bool = False,
        probes: int = 0,
        teacher_seconds: float = 0.0,
        on_step: Callable[[int, float], None] | None = None,
        holdout: list[int] | None = None,
        read: PromptCache | None = None,
        max_steps: int | None = None,
        leads: list[int] | None = None,
    ) -> AbsorptionReport:
        """Train the active adapter so `[prefix; S]` behaves like `[prefix; C; S]`.

        Args:
            prefix: system message(s); read by both, never absorbed.
            context: C, the messages being absorbed.
            segments: the sync segments S (later turns and/or probe exchanges).
            base_teacher: run the teacher with the adapter disabled (first absorption).
            probes: how many of `segments` are probes (for the report).
            teacher_seconds: time already spent on the teacher (probe answers), for the report.
            on_step: called as `on_step(step, loss)` after each loss; may raise to cancel.
            holdout: per segment, how many of its last messages are held out of training to measure
                the held-out loss for `early_stopping_patience` (None: none).
            read: the cache through which the teacher (same model state: frozen with `base_teacher`, else
                the adapter as it stands) answered this round's probes; when its tokens start with
                `[prefix; C]`, the teacher's targets continue from it instead of reading C again.
            max_steps: most optimizer steps (None: `config.max_steps`).
            leads: per segment, how many of its first messages are the window (the turns still in the prompt);
                with `window_grad_every` > 1, only steps that are multiples of it train through them (None: none).
        """
        cfg = self.config
        steps = cfg.max_steps if max_steps is None else max_steps
        if steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {steps}")
        adapter = self.model.active_adapter
        params = trainable_lora_parameters(self.model, adapter)
        if not segments and cfg.sync_losses():
            raise AbsorptionError("no sync text S: pass sync segments or set `probe_count` > 0")
        holdout = list(holdout or [0] * len(segments))
        _check_per_segment("holdout", holdout, segments)
        if leads is not None:
            _check_per_segment("leads", leads, segments)
        earlier_seconds = teacher_seconds
        start = time.perf_counter()
        batch = self._plan(prefix, context, segments, holdout, leads)
        train_rows = [r for r, n in enumerate(batch.lengths) if n > 0]
        if segments and cfg.sync_losses() and not train_rows:
            raise AbsorptionError("every sync token is held out: nothing is left to train on")
        targets = None
        if segments and cfg.sync_losses():
            targets = self._teacher_targets(batch, base_teacher, read)
        teacher_seconds += time.perf_counter() - start

        held_rows = [r for r, n in enumerate(batch.held) if n > 0]
        held_scales = None  # set when early stopping is on: the held-out loss is measured at every step
        if cfg.early_stopping_patience > 0 and targets is not None and held_rows:
            held_scales = self._hidden_scales(targets.held_states)
        snapshot = [p.detach().clone() for p in params]
        best: tuple[float, int, list[torch.Tensor]] | None = None
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        curve: list[float] = []
        held_curve: list[float] = []
        stopped_by = "max_steps"
        schedule = segment_schedule(len(train_rows), cfg.sync_batch_segments, cfg.seed)
        window = (
            _WindowKV(cfg.window_grad_every, batch.leads) if cfg.window_grad_every > 1 and any(batch.leads) else None
        )
        step_tokens = step_pairs = window_pairs = refresh_tokens = refresh_pairs = 0
        split = splits_window(self.model)  # whether steps that read stored keys compute no gradients for them
        bar = tqdm(total=steps, desc="absorbing", disable=not cfg.show_progress, leave=False)
        try:
            for step in range(steps + 1):
                optimizer.zero_grad(set_to_none=True)
                rows = [train_rows[i] for i in schedule()]
                reuse = window is not None and window.reuse(step, steps)
                refreshed: list[int] = []
                if window is not None and not cfg.train_window and 0 < step < steps and not reuse:
                    refreshed = self._refresh_window(batch, window, rows)  # no gradient: train the rest
                    reuse = True
                if step < steps:  # the work of the optimizer steps (not of the final loss), for the report
                    skip = window.skip(rows) if reuse and window is not None else {}
                    for r in rows:  # each row reads its tokens after any window it holds in keys and values
                        skipped, n = skip.get(r, 0), batch.lengths[r] + batch.held[r]
                        step_tokens += n - skipped
                        step_pairs += causal_pairs(batch.student_starts[r] + skipped, n - skipped)
                        window_pairs += (batch.student_starts[r] + skipped) * (n - skipped) if skipped and split else 0
                    refresh_tokens += sum(batch.leads[r] for r in refreshed)
                    refresh_pairs += sum(causal_pairs(batch.student_starts[r], batch.leads[r]) for r in refreshed)
                with contextlib.nullcontext() if step < steps else torch.no_grad():  # the final loss trains nothing
                    value, held, covered = self._step(
                        batch, targets, adapter, rows, step < steps, held_scales, window=window, reuse=reuse
                    )
                if not math.isfinite(value):
                    raise AbsorptionError(f"loss became {value} at step {step}; adapter rolled back")
                curve.append(value)
                if on_step is not None:
                    on_step(step, value)
                if held_scales is not None and targets is not None:
                    rest = [r for r in held_rows if r not in covered]
                    held += self._held_loss_rest(batch, rest, targets, held_scales) if rest else 0.0
                    held_curve.append(held)
                    if best is None or held < best[0] - _MIN_IMPROVEMENT * abs(best[0]):
                        best = (held, step, [p.detach().clone() for p in params])
                    elif step - best[1] >= cfg.early_stopping_patience:
                        stopped_by = "early_stopping"
                        break
                if value < cfg.loss_threshold and not reuse:  # a step between reads part of S: not comparable
                    stopped_by = "threshold"
                    break
                if step == steps:
                    break
                # Clip (or with clipping off, only measure): a non-finite norm means exploding gradients.
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                if not torch.isfinite(norm):
                    raise AbsorptionError(
                        f"gradient norm became {float(norm)} at step {step} (exploding gradients); adapter rolled back"
                    )
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
        except BaseException:
            with torch.no_grad():
                for p, saved in zip(params, snapshot, strict=True):
                    p.copy_(saved)
            raise
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        kept = len(curve) - 1
        if best is not None and stopped_by != "threshold":
            kept = best[1]
            with torch.no_grad():
                for p, saved in zip(params, best[2], strict=True):
                    p.copy_(saved)
        return AbsorptionReport(
            steps=len(curve) - 1,
            initial_loss=curve[0],
            final_loss=curve[kept],
            stopped_by=stopped_by,
            context_tokens=len(batch.lm_input) - batch.lm_start,
            sync_tokens=sum(batch.lengths),
            sync_segments=len(segments),
            probes=probes,
            seconds=earlier_seconds + time.perf_counter() - start,
            teacher_seconds=teacher_seconds,
            loss_curve=curve,
            heldout_curve=held_curve,
            heldout_tokens=sum(batch.held),
            best_step=best[1] if best is not None else None,
            step_tokens=step_tokens,
            step_attention_pairs=step_pairs,
            step_window_pairs=window_pairs,
            refresh_tokens=refresh_tokens,
            refresh_attention_pairs=refresh_pairs,
        )
