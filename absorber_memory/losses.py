"""Pure helper functions for the absorption losses: tensors in, tensor out.

No model, no I/O. Hidden states arrive already gathered at the positions of
the sync text S, as one `[tokens, hidden]` tensor per layer.

Normalisation (the paper leaves it open; our choice): each layer's distance
is divided by the teacher's own mean magnitude at that layer (mean |h| for
L1, mean h^2 for MSE) before averaging over layers. Residual-stream norms
grow with depth, so a plain sum would let the last layers dominate; relative
per-layer distances weigh every layer alike and make a loss threshold mean
the same thing for every model (0.05 = "5% off on average").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_EPS = 1e-6


def layer_scales(teacher: Sequence[torch.Tensor], kind: str = "l1") -> list[torch.Tensor]:
    """Per layer, the teacher's mean magnitude that `hidden_sync_loss` divides by (mean |h|, or mean h^2)."""
    if kind not in ("l1", "mse"):
        raise ValueError(f"`kind` must be 'l1' or 'mse', got {kind!r}")
    return [(t.detach().abs().mean() if kind == "l1" else t.detach().pow(2).mean()) + _EPS for t in teacher]


def hidden_sync_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    kind: str = "l1",
    *,
    scales: Sequence[torch.Tensor] | None = None,
    total_tokens: int | None = None,
) -> torch.Tensor:
    """Mean over layers of the relative L1 (or MSE) distance of hidden states.

    Args:
        student: per layer, `[T, H]` student states at the positions of S.
        teacher: per layer, `[T, H]` teacher states at the same tokens.
        kind: "l1" (the paper's choice) or "mse".
        scales, total_tokens: for one part of a larger set of tokens (a micro-batch of a step): the
            whole set's `layer_scales` and token count. The parts' results then add up to the loss
            of the whole set, so a step can run as several forwards and backwards.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of layers, got {len(student)} and {len(teacher)}")
    scales = layer_scales(teacher, kind) if scales is None else scales
    if len(scales) != len(teacher):
        raise ValueError(f"need one scale per layer, got {len(scales)} for {len(teacher)} layers")
    per_layer = []
    for s, t, scale in zip(student, teacher, scales, strict=True):
        t = t.detach().to(s.dtype)
        diff = (s - t).abs() if kind == "l1" else (s - t).pow(2)
        count = diff.numel() if total_tokens is None else total_tokens * diff.shape[-1]
        per_layer.append(diff.sum() / count / scale)
    return torch.stack(per_layer).mean()


def logit_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, total_tokens: int | None = None
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of next-token distributions, `[T, V]` each.

    With `total_tokens`, the sum over these tokens divided by it (this part's share of a larger set).
    Training reads the teacher through `next_token_targets` instead (normalised once per round).
    """
    teacher_logp = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    total = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return total / (student_logits.shape[0] if total_tokens is None else total_tokens)


@dataclass(frozen=True)
class NextTokenTargets:
    """The teacher's next-token distributions at T tokens, as a training step reads them.

    `probs` `[T, V]` (fp32) and `neg_entropy` `[T]` (sum over the vocabulary of p log p) are computed
    once per round, so a step's KL(teacher || student) = neg_entropy - p . log q needs no pass over
    the teacher's vocabulary-wide rows beyond one product.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor

    def select(self, take: Callable[[torch.Tensor], torch.Tensor]) -> NextTokenTargets:
        """The same rows of both fields (`take` picks rows of a `[T, ...]` tensor)."""
        return NextTokenTargets(take(self.probs), take(self.neg_entropy))

    def __len__(self) -> int:
        return self.probs.shape[0]


def next_token_targets(logits: torch.Tensor) -> NextTokenTargets:
    """The teacher side of the KL terms, from its next-token logits `[T, V]`."""
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    probs = logp.exp()
    return NextTokenTargets(probs, (probs * logp).sum(-1))


def kl_to_targets(
    student_logits: torch.Tensor, targets: NextTokenTargets, *, total_tokens: int | None = None
) -> torch.Tensor:
    """`logit_kl_loss` against teacher distributions prepared by `next_token_targets`."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    total = targets.neg_entropy.sum() - (targets.probs * student_logp).sum()
    return total / (student_logits.shape[0] if total_tokens is None else total_tokens)


#: `linear_kl_loss` computes logits for at most this many bytes of fp32 rows at a time.
KL_CHUNK_BYTES = 256 * 2**20


class _LinearKL(torch.autograd.Function):
    """Summed KL(teacher || softmax(hidden @ weight.T)) over rows; the gradient is made in the forward.

    Per chunk of rows: logits z, turned in place into log-probabilities log q, the loss
    sum(p log p) - p . log q per row, and (when the hidden states need a gradient)
    d loss / d hidden = (q - p) @ weight, with q - p written over log q. The backward only scales
    that saved `[T, H]` gradient: no `[T, V]` tensor outlives a chunk.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor, neg_entropy: torch.Tensor
    ) -> torch.Tensor:
        rows = max(1, KL_CHUNK_BYTES // (4 * weight.shape[0]))
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        buffer = probs.new_empty(min(rows, hidden.shape[0]), probs.shape[1])
        for i in range(0, hidden.shape[0], rows):
            z = (hidden[i : i + rows] @ weight.T).float()
            p = probs[i : i + rows]
            logq = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # in place: log-probabilities
            # Per row with torch's pairwise sum: the KL is a small difference of two entropy-sized
            # terms, which one long float32 dot product (BLAS) does not resolve.
            cross = torch.mul(p, logq, out=buffer[: len(p)]).sum(-1)
            total = total + (neg_entropy[i : i + rows] - cross).sum()
            if grad is not None:
                grad[i : i + rows] = logq.exp_().sub_(p).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else upstream.to(grad.dtype) * grad), None, None, None


def linear_kl_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: NextTokenTargets, *, total_tokens: int | None = None
) -> torch.Tensor:
    """`kl_to_targets` of the logits `hidden @ weight.T` (an LM head without bias), never held whole.

    `hidden` `[T, H]` are the final (normalised) hidden states at the sync tokens; `weight` `[V, H]`
    is the frozen output projection. The loss and its gradient equal those of materialising the
    `[T, V]` logits and running `kl_to_targets` on them (up to float rounding), at a fraction of the
    memory traffic (on a small model, copying and normalising those tensors took about a sixth of a
    default training step under the profiler).
    """
    if weight.requires_grad:
        raise ValueError("linear_kl_loss needs a frozen output projection: it returns no gradient for it")
    if hidden.shape[0] != len(targets):
        raise ValueError(f"{hidden.shape[0]} hidden rows for {len(targets)} teacher distributions")
    total = _LinearKL.apply(hidden, weight, targets.probs, targets.neg_entropy)
    return total / (hidden.shape[0] if total_tokens is None else total_tokens)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: `logits[i]` `[T, V]` predicts `targets[i]` `[T]` (TTT baseline)."""
    return F.cross_entropy(logits.float(), targets)


def lora_update_penalty(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], kind: str = "l1") -> torch.Tensor:
    """Mean magnitude of the LoRA updates delta-W = scale * B @ A over modules.

    Penalising delta-W rather than A and B keeps the penalty at zero for a fresh
    adapter (B = 0) whatever A's random initialisation.

    Args:
        factors: `(A [r, in], B [out, r], scale)` per adapted module.
        kind: "l1" (mean |delta-W|) or "l2" (mean delta-W^2).
    """
    if not factors:
        raise ValueError("no LoRA factors to penalise")
    terms = []
    for a, b, scale in factors:
        delta = scale * (b @ a)
        if kind == "l1":
            terms.append(delta.abs().mean())
        elif kind == "l2":
            terms.append(delta.pow(2).mean())
        else:
            raise ValueError(f"`kind` must be 'l1' or 'l2', got {kind!r}")
    return torch.stack(terms).mean()


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of `weights[name] * terms[name]` over the names in `terms`."""
    if not terms:
        raise ValueError("no loss terms to combine")
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()
