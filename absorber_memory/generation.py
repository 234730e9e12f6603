"""Greedy (or sampled) generation from token ids, and right-padded batching.

Small shared helpers: probes, `ParametricMemory.generate` and the fidelity
metric all generate from ids that `ChatFormat` produced, and absorption runs
several sync segments through the model as one right-padded batch.
"""

from __future__ import annotations

from typing import Any

import torch


def generate_ids(model: Any, tokenizer: Any, input_ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """New token ids the model generates after `input_ids` (greedy unless `do_sample=True`).

    Stops at the tokenizer's EOS; the EOS itself is not returned.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    settings.update(kwargs)
    if not settings.get("do_sample"):
        settings.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    new = out[0, len(input_ids):].tolist()
    eos = tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


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
