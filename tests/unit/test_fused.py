"""The two-GEMM LoRA forward (`absorber_memory.fused`) computes what PEFT's forward computes.

Outputs and gradients are compared with PEFT's own forward on the same
weights (non-zero B, so the adapter's product matters), and every case
where the fast path must not apply (adapters off, mixed-adapter batches,
another dtype, autocast, dropout) falls back to PEFT's forward.
"""

from __future__ import annotations

import pytest
import torch

from absorber_memory import AbsorberConfig
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.fused import fuse_lora_forwards, unfuse_lora_forwards
from absorber_memory.testing import tiny_model


def engine_with_random_b(tokenizer, **config) -> AbsorptionEngine:
    engine = AbsorptionEngine(tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=AbsorberConfig(**config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return engine


def forward_and_grads(engine: AbsorptionEngine, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {n: p for n, p in engine.model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    out = engine.model(input_ids=ids, output_hidden_states=True)
    loss = sum(h.abs().mean() for h in out.hidden_states[1:]) + out.logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return out.logits.detach(), grads


def test_engine_layers_take_the_fused_forward(tokenizer):
    engine = engine_with_random_b(tokenizer)
    from peft.tuners.lora.layer import Linear

    layers = [m for m in engine.model.modules() if type(m) is Linear]
    assert layers and all("forward" in vars(m) for m in layers)
    assert fuse_lora_forwards(engine.model) == 0  # already fused: nothing is wrapped twice


def test_fused_forward_matches_peft_in_outputs_and_gradients(tokenizer):
    engine = engine_with_random_b(tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 17), generator=torch.Generator().manual_seed(0))
    fused_logits, fused_grads = forward_and_grads(engine, ids)
    assert unfuse_lora_forwards(engine.model) > 0
    peft_logits, peft_grads = forward_and_grads(engine, ids)
    with engine.adapter_disabled():
        base_logits = engine.model(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter's product matters here
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys()
    assert any(g.abs().sum() > 0 for g in peft_grads.values())
    for name in peft_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_falls_back_to_peft_when_the_fast_path_does_not_apply(tokenizer):
    engine = engine_with_random_b(tokenizer)
    ids = torch.randint(3, len(tokenizer), (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with engine.adapter_disabled():
            fused_off = engine.model(input_ids=ids).logits
        unfuse_lora_forwards(engine.model)
        with engine.adapter_disabled():
            peft_off = engine.model(input_ids=ids).logits
    torch.testing.assert_close(fused_off, peft_off)

    from absorber_memory.fused import _fast_path

    layer = next(m for m in engine.model.modules() if hasattr(m, "lora_A") and m.lora_A)
    x = torch.zeros(1, 3, layer.in_features)
    assert _fast_path(layer, x, (), {}) is not None
    assert _fast_path(layer, x, (), {"adapter_names": ["a"]}) is None  # mixed-adapter batches
    assert _fast_path(layer, x.double(), (), {}) is None  # another dtype: PEFT casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fast_path(layer, x, (), {}) is None  # autocast would not cast the in-place product
    name = layer.active_adapters[0]
    saved = layer.lora_dropout[name]
    layer.lora_dropout[name] = torch.nn.Dropout(0.1)
    try:
        assert _fast_path(layer, x, (), {}) is None  # dropout is PEFT's to apply
    finally:
        layer.lora_dropout[name] = saved


def test_a_round_learns_the_same_with_either_forward(tokenizer):
    """One absorption round's loss curve is PEFT's, to float rounding, with the fused forward."""
    from ..conftest import turn

    curves = []
    for fused in (True, False):
        engine = AbsorptionEngine(tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=AbsorberConfig(max_steps=4))
        if not fused:
            unfuse_lora_forwards(engine.model)
        report = engine.run_round([], turn(0), n_probes=2, following=turn(1), base_teacher=True)
        curves.append(report.loss_curve)
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert curves[0][-1] < curves[0][0]  # it trained
