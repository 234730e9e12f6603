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


def hidden_sync_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], kind: str = "l1"
) -> torch.Tensor:
    """Mean over layers of the relative L1 (or MSE) distance of hidden states.

    Args:
        student: per layer, `[T, H]` student states at the positions of S.
        teacher: per layer, `[T, H]` teacher states at the same tokens.
        kind: "l1" (the paper's choice) or "mse".
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of layers, got {len(student)} and {len(teacher)}")
    per_layer = []
    for s, t in zip(student, teacher, strict=True):
        t = t.detach().to(s.dtype)
        if kind == "l1":
            per_layer.append((s - t).abs().mean() / (t.abs().mean() + _EPS))
        elif kind == "mse":
            per_layer.append((s - t).pow(2).mean() / (t.pow(2).mean() + _EPS))
        else:
            raise ValueError(f"`kind` must be 'l1' or 'mse', got {kind!r}")
    return torch.stack(per_layer).mean()


def logit_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of next-token distributions, `[T, V]` each."""
    teacher_logp = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")


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
