"""Attention for absorption's window-reuse steps and for batched decoding, on a CPU.

Two places where transformers' `sdpa` attention does work the absorber does not need:

1. **A row read after stored keys and values** (`window_grad_every`). The steps between every k-th
   read a sync row's probes after the window's keys and values, kept from an earlier forward and
   detached: they are constants of the step. Because the queries are fewer than the keys,
   transformers builds a mask, repeats the grouped keys and values once per query head, and the
   fused CPU kernel's backward computes gradients for every key and value, the window's included,
   which autograd then drops. Here the step's attention runs as two blocks merged by their
   log-sum-exps (the online-softmax identity): the window block, with the grouped heads' queries
   folded together so nothing is repeated and no mask is read, and the row's own causal block. In
   the backward the row's block takes the fused kernel's backward, with the merged output and
   log-sum-exp (which makes a block's gradients exact), and the window block computes only the
   queries' gradient: three matrix products in query tiles instead of the kernel's five. On
   SmolLM2-135M, an absorber step on 367 tokens after 1,105 stored keys takes 3-4% less time (the
   products run at about 107 GFLOP/s, short of the fused kernel's efficiency).
2. **Decoding with a mask, without gradients** (`branch_generate_ids`). transformers passes
   `enable_gqa` to PyTorch only when there is no mask, and otherwise repeats the keys and values of
   the whole cache once per query head at every step. A decoding step of eight branches over a
   3.6k-token cache takes about a third less time with `enable_gqa`. (With gradients the repeated
   form is the faster one on this CPU, so training keeps it.)

Both are the same attention up to float rounding (tests compare outputs and gradients with `sdpa`).
They run only inside `absorber_attention`, only on a CPU, only for a model whose attention is
`sdpa`, and only for plain causal attention (no sliding window, soft-capping or position bias);
anything else, on any device, is transformers' `sdpa` unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch

#: The name under which this attention is registered with transformers.
NAME = "absorber_sdpa"
#: Queries per tile of the window block's backward: its scores then stay in the CPU's caches.
QUERY_TILE = 128

#: Keys at the start of every attention call that are the stored window (0: none), set by `absorber_attention`;
#: None outside every block, where the attention is exactly `sdpa` (another thread may have switched the model).
_WINDOW: contextvars.ContextVar[int | None] = contextvars.ContextVar("absorber_window", default=None)
#: Open blocks per switched model (keyed by its config's id): the first switches it, the last switches it back.
_OPEN: dict[int, int] = {}
_SWITCHING = threading.Lock()
_registered = False


def _flash_ops() -> tuple[Any, Any] | None:
    """PyTorch's fused CPU attention forward and backward (they return and take the log-sum-exp)."""
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (forward, backward) if forward is not None and backward is not None else None


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, kv_heads, T, D]` -> `[B, kv_heads * groups, T, D]`, each key/value head once per query head."""
    b, heads, t, d = x.shape
    return x[:, :, None].expand(b, heads, groups, t, d).reshape(b, heads * groups, t, d)


class _WindowThenRow(torch.autograd.Function):
    """Attention of a row's queries to `[window keys (constants); the row's own keys (causal)]`.

    Inputs: `query [1, H, n, D]`, the row's `keys, values [1, KV, n, D]` and the window's `[1, KV, w, D]`
    (no gradients). Output `[1, H, n, D]`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        window_keys: torch.Tensor,
        window_values: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        flash, _ = _flash_ops()  # type: ignore[misc]  # `absorber_attention` switches only where they exist
        b, heads, n, d = query.shape
        groups = heads // keys.shape[1]
        query = query.contiguous()
        # The window block: every query sees every window key, so a key/value head's query heads fold
        # into one longer query block and the grouped keys are read as they are.
        folded = query.view(b, keys.shape[1], groups * n, d)
        out_w, lse_w = flash(folded, window_keys, window_values, 0.0, False, scale=scale)
        row_keys, row_values = _repeat_heads(keys, groups), _repeat_heads(values, groups)
        out_r, lse_r = flash(query, row_keys, row_values, 0.0, True, scale=scale)
        lse_w = lse_w.reshape(b, heads, n)  # the kernel's log-sum-exp is laid out [B, T, H]
        lse = torch.logaddexp(lse_w, lse_r)
        out = (
            torch.exp(lse_w - lse)[..., None] * out_w.reshape(b, heads, n, d)
            + torch.exp(lse_r - lse)[..., None] * out_r
        )
        ctx.save_for_backward(query, row_keys, row_values, window_keys, window_values, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, row_keys, row_values, window_keys, window_values, out, lse = ctx.saved_tensors
        _, flash_backward = _flash_ops()  # type: ignore[misc]
        b, heads, n, d = query.shape
        kv_heads = window_keys.shape[1]
        groups = heads // kv_heads
        grad_out = grad_out.contiguous()
        # The row's block: the fused backward with the merged output and log-sum-exp gives this block's exact
        # share of the query gradient and its keys' and values' gradients.
        grad_q, grad_k, grad_v = flash_backward(
            grad_out, query, row_keys, row_values, out, lse, 0.0, True, scale=ctx.scale
        )
        grad_q = grad_q + _window_query_grad(
            query.view(b, kv_heads, groups * n, d),
            grad_out.view(b, kv_heads, groups * n, d),
            out.view(b, kv_heads, groups * n, d),
            lse.view(b, kv_heads, groups * n),
            window_keys,
            window_values,
            ctx.scale,
        ).view(b, heads, n, d)
        grad_k = grad_k.view(b, kv_heads, groups, n, d).sum(2)
        grad_v = grad_v.view(b, kv_heads, groups, n, d).sum(2)
        return grad_q, grad_k, grad_v, None, None, None


def _window_query_grad(
    query: torch.Tensor,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The queries' gradient from the window block alone (its keys and values are constants).

    With the merged `out` and `lse`: `P = exp(scale q k^T - lse)`, `dS = P (dO v^T - rowsum(dO out))`,
    `dq = scale dS k`, a tile of queries at a time.
    """
    grad_q = torch.empty_like(query)
    delta = (grad_out * out).sum(-1, keepdim=True)
    keys_t, values_t = keys.transpose(-1, -2), values.transpose(-1, -2)
    for start in range(0, query.shape[2], QUERY_TILE):
        tile = slice(start, start + QUERY_TILE)
        probs = torch.matmul(query[:, :, tile], keys_t).mul_(scale).sub_(lse[:, :, tile, None]).exp_()
        grad_s = torch.matmul(grad_out[:, :, tile], values_t).sub_(delta[:, :, tile]).mul_(probs)
        torch.matmul(grad_s, keys, out=grad_q[:, :, tile])
    return grad_q.mul_(scale)


#: Attention arguments of models this module leaves to `sdpa` (it computes plain causal attention only).
_UNSUPPORTED = ("sliding_window", "softcap", "position_bias", "s_aux")


def _window_applies(query: torch.Tensor, key: torch.Tensor, window: int, dropout: float) -> bool:
    """Whether a call is one the window split computes: one row, the stored window then the row's own keys.

    The device and the fused kernel need no check here: `absorber_attention` switches only CPU models,
    and only when the kernel exists.
    """
    return (
        dropout == 0.0
        and query.shape[0] == 1
        and key.shape[2] == window + query.shape[2]
        and query.shape[1] % key.shape[1] == 0
    )


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; `sdpa` except in the two cases of the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = _WINDOW.get()
    if window is None or any(kwargs.get(k) is not None for k in _UNSUPPORTED):  # outside a block: `sdpa` itself
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if window and _window_applies(query, key, window, dropout):
        out = _WindowThenRow.apply(
            query,
            key[:, :, window:],
            value[:, :, window:],
            key[:, :, :window].detach(),
            value[:, :, :window].detach(),
            scale,
        )
        return out.transpose(1, 2).contiguous(), None
    grouped = query.shape[1] != key.shape[1]
    if grouped and attention_mask is not None and not torch.is_grad_enabled():
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as `sdpa`
    _registered = True


def sliding(model: Any) -> bool:
    """Whether any layer of `model` attends through a sliding window (a custom mask would override it)."""
    config = getattr(model, "config", None)
    kinds = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) is not None or any("sliding" in str(k) for k in kinds)


def splits_window(model: Any) -> bool:
    """Whether `absorber_attention` switches `model` (a CPU `sdpa` model without sliding windows)."""
    config = getattr(model, "config", None)
    return (
        # transformers names a model's attention only so; NAME: inside another `absorber_attention` block
        getattr(config, "_attn_implementation", None) in ("sdpa", NAME)
        and next(model.parameters()).device.type == "cpu"
        and not sliding(model)
        and _flash_ops() is not None
    )


@contextlib.contextmanager
def absorber_attention(model: Any, window: int = 0) -> Iterator[bool]:
    """Within this block, `model`'s `sdpa` attention is `_attention`; yields whether it is.

    Args:
        model: a transformers model (or a PEFT model around one).
        window: for a forward of one unpadded row after stored keys and values, how many keys they
            are (the split of the module docstring); 0 for any other forward.

    Only a CPU model whose attention is `sdpa` and whose layers attend causally to everything (no
    sliding window) is switched (`set_attn_implementation`, and back to `sdpa` after). Blocks nest
    and may be open in several threads at once (absorption workers sharing a model): the first open
    block switches the model, the last to close switches it back, and each block sets its own
    `window`. A thread outside every block gets transformers' `sdpa` itself even while the model is
    switched, so what one thread computes never depends on what another is doing.
    """
    if not splits_window(model):
        yield False
        return
    _register()
    config = model.config
    token = _WINDOW.set(window)
    with _SWITCHING:
        _OPEN[id(config)] = _OPEN.get(id(config), 0) + 1
        if _OPEN[id(config)] == 1:
            model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        with _SWITCHING:
            _OPEN[id(config)] -= 1
            if not _OPEN[id(config)]:
                del _OPEN[id(config)]
                model.set_attn_implementation("sdpa")
        _WINDOW.reset(token)
