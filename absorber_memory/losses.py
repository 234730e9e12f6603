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

from collections.abc import Sequence

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
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    total_tokens: int | None = None,
    teacher_normalized: bool = False,
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of next-token distributions, `[T, V]` each.

    With `total_tokens`, the sum over these tokens divided by it (this part's share of a larger set).
    With `teacher_normalized`, `teacher_logits` are already fp32 log-probabilities (`log_probs`), so a
    caller that reuses them every step does not normalise them again.
    """
    teacher_logp = teacher_logits.detach() if teacher_normalized else log_probs(teacher_logits)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    total = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return total / (student_logits.shape[0] if total_tokens is None else total_tokens)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of next-token logits `[T, V]` (the teacher side of `logit_kl_loss`)."""
    return F.log_softmax(logits.detach().float(), dim=-1)


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
