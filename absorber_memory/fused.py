"""A LoRA linear layer's forward as two GEMMs, without elementwise passes over its output.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(x)) * scaling`: the
scaling and the sum are two elementwise passes over the layer's whole output
(tokens x out features), forward and backward, and a training step runs
them on every adapted projection of every layer. Here the base projection's
output is the accumulator of one more GEMM: `y = x W^T`, then
`y += scaling * (x A^T) B^T` in place (`addmm_`, the sum inside the GEMM);
in the backward the scaling falls on the small `tokens x rank` factors
instead of the wide output. The result is the same sum up to float rounding
(tests compare outputs and gradients with PEFT's).

Only plain LoRA takes this path: one active adapter, no dropout, no DoRA or
other variant, not merged, an `nn.Linear` base, one dtype throughout (PEFT
keeps adapters in fp32 under a bf16 model, so those layers keep PEFT's
forward) and no autocast. Anything else (adapters disabled, mixed adapter
batches, dropout during training) runs PEFT's own forward, so the layer
behaves as PEFT's everywhere.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

#: Attribute that marks a layer whose forward was replaced (the value is PEFT's bound forward).
_PEFT_FORWARD = "_absorber_peft_forward"


def _fast_path(
    layer: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, float] | None:
    """`(base, A, B, scaling)` when the two-GEMM forward applies to this call, else None (PEFT's forward)."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled(x.device.type):
        return None  # under autocast F.linear's output changes dtype, and an in-place addmm_ is not cast
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    a, b = layer.lora_A[name], layer.lora_B[name]
    base = layer.base_layer
    plain = (
        type(base) is nn.Linear
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and b.bias is None
        and a.bias is None
        and x.dtype == a.weight.dtype == b.weight.dtype == base.weight.dtype
    )
    return (base, a.weight, b.weight, layer.scaling[name]) if plain else None


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    found = _fast_path(layer, x, args, kwargs)
    if found is None:
        return getattr(layer, _PEFT_FORWARD)(x, *args, **kwargs)
    base, a_weight, b_weight, scaling = found
    # 2-D throughout: an in-place op on a view of `y` would make autograd copy the gradient back (CopySlices)
    flat = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(flat, base.weight, base.bias)
    y.addmm_(torch.nn.functional.linear(flat, a_weight), b_weight.t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


def fuse_lora_forwards(model: nn.Module) -> int:
    """Give every PEFT `lora.Linear` in `model` the two-GEMM forward; returns how many layers now have it."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and not hasattr(module, _PEFT_FORWARD):
            setattr(module, _PEFT_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_forward, module)  # type: ignore[method-assign]
            count += 1
    return count


def unfuse_lora_forwards(model: nn.Module) -> int:
    """Undo `fuse_lora_forwards`: PEFT's own forward again; returns how many layers were restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, _PEFT_FORWARD):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _PEFT_FORWARD)
            count += 1
    return count
