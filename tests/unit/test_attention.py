"""`absorber_attention`: the window split and grouped-head decoding equal transformers' `sdpa`.

The split (a row read after stored, detached keys and values) must give the same outputs and the
same gradients as `sdpa` while computing none for the stored keys; masked decoding without gradients
must give the same outputs. Both apply only inside the block, and the model is `sdpa` again after it.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from transformers import DynamicCache

from absorber_memory import AbsorberConfig, attention
from absorber_memory.attention import absorber_attention
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.generation import cache_kwargs
from absorber_memory.testing import tiny_model

from ..conftest import FAST, chat
from .test_window_grad import CONTEXT, WINDOW

WIDTH, ROW = 37, 23  # stored window keys, then the row's own tokens


@pytest.fixture
def grouped(tokenizer):
    """A tiny model with grouped-query attention (4 query heads, 2 key/value heads) and trainable weights."""
    model = tiny_model(tokenizer, seed=3)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_attention_heads != model.config.num_key_value_heads
    return model


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that took the window split and the grouped-head path."""
    calls = {"split": 0, "gqa": 0}
    split = attention._WindowThenRow.apply
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_split(*args):
        calls["split"] += 1
        return split(*args)

    def counted_sdpa(*args, **kwargs):
        calls["gqa"] += bool(kwargs.get("enable_gqa"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention._WindowThenRow, "apply", counted_split)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    return calls


def stored_window(model, ids):
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids[:, :WIDTH], **cache_kwargs(model, cache), use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def row_after(model, ids, kv, window: int):
    """States and parameter gradients of the row read after the stored keys and values."""
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    model.zero_grad()
    with absorber_attention(model, window=window):
        out = model(input_ids=ids[:, WIDTH:], **cache_kwargs(model, cache), use_cache=True, output_hidden_states=True)
    loss = sum((h * torch.linspace(-1, 1, h.shape[-1])).sum() for h in out.hidden_states[1:]) + out.logits.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(out.hidden_states[1:]).detach(), out.logits.detach(), grads


def test_the_window_split_gives_sdpa_s_states_and_gradients(grouped, spy):
    ids = torch.randint(3, 60, (1, WIDTH + ROW), generator=torch.Generator().manual_seed(0))
    kv = stored_window(grouped, ids)
    states, logits, grads = row_after(grouped, ids, kv, window=WIDTH)
    assert spy["split"] == grouped.config.num_hidden_layers  # every layer took the split
    ref_states, ref_logits, ref_grads = row_after(grouped, ids, kv, window=0)
    assert spy["split"] == grouped.config.num_hidden_layers  # the reference did not
    assert torch.allclose(states, ref_states, atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).norm() <= 1e-5 * ref_grads[name].norm(), name
    assert all(not k.requires_grad and k.grad is None for k, _ in kv)  # the stored window took no gradients


def test_the_window_split_computes_what_a_whole_causal_read_does(grouped):
    """Against a read of window and row together from scratch (not only against `sdpa` after a cache)."""
    ids = torch.randint(3, 60, (1, WIDTH + ROW), generator=torch.Generator().manual_seed(1))
    kv = stored_window(grouped, ids)
    states, _, _ = row_after(grouped, ids, kv, window=WIDTH)
    with torch.no_grad():
        whole = grouped(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(states[:, 0], torch.stack(whole.hidden_states[1:])[:, 0, WIDTH:], atol=1e-5)


def test_a_wrong_window_width_or_a_batch_falls_back_to_sdpa(grouped, spy):
    ids = torch.randint(3, 60, (1, WIDTH + ROW), generator=torch.Generator().manual_seed(2))
    kv = stored_window(grouped, ids)
    states, _, _ = row_after(grouped, ids, kv, window=WIDTH - 1)  # keys are not window + row: not the split
    ref, _, _ = row_after(grouped, ids, kv, window=0)
    assert spy["split"] == 0
    assert torch.allclose(states, ref, atol=1e-6)
    with torch.no_grad(), absorber_attention(grouped, window=WIDTH):
        two = grouped(input_ids=ids.repeat(2, 1), output_hidden_states=True)  # two rows, no stored keys
    assert spy["split"] == 0
    with torch.no_grad():
        plain = grouped(input_ids=ids.repeat(2, 1), output_hidden_states=True)
    assert torch.allclose(two.logits, plain.logits, atol=1e-6)


def masked_decode(model, ids, kv, block: bool):
    """One decoding step of three branches that each see the window and themselves, inside a block or not."""
    mask = torch.zeros(1, 1, 3, WIDTH + 3)
    mask[..., WIDTH:] = torch.finfo(torch.float32).min
    for branch in range(3):
        mask[0, 0, branch, WIDTH + branch] = 0
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    with torch.no_grad(), absorber_attention(model) if block else contextlib.nullcontext():
        return model(
            input_ids=ids[:, WIDTH:],
            position_ids=torch.tensor([[WIDTH] * 3]),
            attention_mask=mask,
            **cache_kwargs(model, cache),
            use_cache=True,
        ).logits


def test_masked_decoding_without_gradients_reads_grouped_heads_unrepeated(grouped, spy):
    ids = torch.randint(3, 60, (1, WIDTH + 3), generator=torch.Generator().manual_seed(3))
    kv = stored_window(grouped, ids)
    spy["gqa"] = 0  # transformers' own sdpa passes `enable_gqa` when there is no mask, as in that read
    fast = masked_decode(grouped, ids, kv, block=True)
    assert spy["gqa"] == grouped.config.num_hidden_layers
    assert torch.allclose(fast, masked_decode(grouped, ids, kv, block=False), atol=1e-5)
    assert spy["gqa"] == grouped.config.num_hidden_layers  # plain sdpa repeats the heads instead


def test_blocks_in_other_threads_change_nothing_this_thread_computes(grouped, spy):
    """Training replicas share one config: the model stays switched while any thread's block is open,
    and a thread outside every block gets `sdpa` itself, bit for bit, while another thread's is open."""
    ids = torch.randint(3, 60, (1, WIDTH + 3), generator=torch.Generator().manual_seed(4))
    kv = stored_window(grouped, ids)
    plain = masked_decode(grouped, ids, kv, block=False)
    opened, second_open, closed = threading.Event(), threading.Event(), threading.Event()

    def other_thread():
        with absorber_attention(grouped, window=5):
            opened.set()
            second_open.wait(10)
        closed.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        assert opened.wait(10) and grouped.config._attn_implementation == attention.NAME
        spy["gqa"] = 0
        outside = masked_decode(grouped, ids, kv, block=False)  # the model is switched; this thread is outside
        assert spy["gqa"] == 0 and torch.equal(outside, plain)
        with absorber_attention(grouped) as on:
            assert on and attention._WINDOW.get() == 0  # this thread's window, not the other's 5
            second_open.set()
            assert closed.wait(10)
            assert grouped.config._attn_implementation == attention.NAME  # the other closed first: still switched
            inside = masked_decode(grouped, ids, kv, block=False)  # within this thread's open block
        assert spy["gqa"] == grouped.config.num_hidden_layers
        assert torch.allclose(inside, plain, atol=1e-5)
    finally:
        second_open.set()
        worker.join(10)
    assert grouped.config._attn_implementation == "sdpa" and attention._WINDOW.get() is None


def test_the_block_switches_only_a_cpu_sdpa_model_and_always_switches_back(grouped, tokenizer):
    with absorber_attention(grouped, window=5) as on:
        assert on and grouped.config._attn_implementation == attention.NAME
        assert attention._WINDOW.get() == 5
    assert grouped.config._attn_implementation == "sdpa" and attention._WINDOW.get() is None
    with pytest.raises(RuntimeError, match="inside"), absorber_attention(grouped, window=5):
        raise RuntimeError("inside")
    assert grouped.config._attn_implementation == "sdpa" and attention._WINDOW.get() is None
    with absorber_attention(grouped, window=3) as outer:
        with absorber_attention(grouped, window=7) as inner:  # nested: its own window, the outer's switch
            assert outer and inner and attention._WINDOW.get() == 7
        assert grouped.config._attn_implementation == attention.NAME and attention._WINDOW.get() == 3
    assert grouped.config._attn_implementation == "sdpa" and attention._WINDOW.get() is None
    eager = tiny_model(tokenizer, seed=3)
    eager.set_attn_implementation("eager")
    with absorber_attention(eager, window=5) as on:
        assert not on and eager.config._attn_implementation == "eager"
    eager.config.sliding_window = 16  # a sliding window: a custom attention would override its mask
    eager.set_attn_implementation("sdpa")
    with absorber_attention(eager) as on:
        assert not on and eager.config._attn_implementation == "sdpa"


def test_a_round_with_steps_between_trains_as_it_did_under_sdpa(tokenizer, monkeypatch):
    """The absorber's reuse steps and teacher take the split; the round's losses are those of `sdpa`."""

    def run():
        built = AbsorptionEngine(
            tiny_model(tokenizer, seed=0),
            tokenizer=tokenizer,
            config=AbsorberConfig(**{**FAST, "max_steps": 6, "window_grad_every": 3}),
        )
        return built.run_round([], CONTEXT + chat("I work as a nurse."), n_probes=2, following=WINDOW, base_teacher=True)

    calls = []
    real = attention._WindowThenRow.apply
    monkeypatch.setattr(attention._WindowThenRow, "apply", lambda *a: calls.append(1) or real(*a))
    split = run()
    assert calls  # the steps between took the split
    monkeypatch.setattr(attention, "_flash_ops", lambda: None)  # no fused CPU kernel: plain sdpa everywhere
    calls.clear()
    plain = run()
    assert not calls
    assert split.loss_curve == pytest.approx(plain.loss_curve, rel=1e-4)
    assert split.final_loss == pytest.approx(plain.final_loss, rel=1e-4)
