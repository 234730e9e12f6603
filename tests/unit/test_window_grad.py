"""`window_grad_every`: steps between full ones read the window through stored keys and values.

A streaming round's sync text S starts with the window (the turns still in
the prompt) and ends with the probes. With `window_grad_every=k`, every k-th
step reads and trains the whole of S, keeping the window's keys and values;
the steps between read only what follows the window, after those stored
keys and values, so they cost that part alone.
"""

from __future__ import annotations

import pytest
import torch

from absorber_memory import AbsorberConfig
from absorber_memory.absorber import Absorber, _WindowKV, causal_pairs
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.testing import tiny_model

from ..conftest import FAST, chat

CONTEXT = chat("My name is Ana and I live in Lisbon.", "Nice to meet you, Ana!")
WINDOW = chat("I keep two cats at home.", "Lovely, what are their names?", "Tom and Lila.", "Nice names.")
PROBES = chat("What do you remember about me?", "You are Ana from Lisbon.", "Where do I live?", "In Lisbon.")


def engine(tokenizer, **config) -> AbsorptionEngine:
    built = AbsorptionEngine(
        tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=AbsorberConfig(**{**FAST, **config})
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero B: the adapter changes the window's keys and values
        for name, p in built.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return built


def planned(absorber: Absorber):
    segments = [WINDOW + PROBES, PROBES]  # one row with the window as its lead, one without
    batch = absorber._plan([], CONTEXT, segments, [0, 0], [len(WINDOW), 0])
    targets = absorber._teacher_targets(batch, base_teacher=True)
    return batch, targets


def test_the_window_lead_is_counted_in_tokens(tokenizer):
    absorber = engine(tokenizer).absorber
    batch, _ = planned(absorber)
    window_tokens = len(absorber.fmt.encode_segments(WINDOW))
    assert batch.leads == [window_tokens, 0]
    assert batch.lengths[0] == window_tokens + len(absorber.fmt.encode_segments(PROBES))


def test_a_step_between_reads_the_same_states_and_loss_as_a_whole_forward(tokenizer):
    """Keys and values stored by a full step, read back before any update, give the whole forward's states."""
    absorber = engine(tokenizer).absorber
    batch, targets = planned(absorber)
    window = _WindowKV(every=3, leads=batch.leads)
    adapter = absorber.model.active_adapter
    with torch.no_grad():
        absorber._step(batch, targets, adapter, [0, 1], backward=False, window=window)
        assert set(window.kv) == {0}  # only the row with a window keeps one
        lead = batch.leads[0]
        whole = absorber._forward([batch.student[0]], logits=False)
        tail = absorber._forward_after(window.kv[0], batch.student[0][lead:], logits=False)
        for full_layer, tail_layer in zip(whole.hidden_states[1:], tail.hidden_states[1:], strict=True):
            assert torch.allclose(full_layer[0, lead:], tail_layer[0], atol=1e-5)
        between, _, _ = absorber._step(batch, targets, adapter, [0], backward=False, window=window, reuse=True)
        # The loss of that step: the whole forward's, over the tokens after the window only.
        skip = {0: lead}
        from absorber_memory.absorber import _spans

        states = [_spans(t, batch.lengths, [0], skip) for t in targets.states]
        expected = absorber._sync_loss(
            whole,
            [lead],
            [batch.lengths[0] - lead],
            states,
            None,
            absorber._hidden_scales(states),
            batch.lengths[0] - lead,
        )
        full, _, _ = absorber._step(batch, targets, adapter, [0], backward=False)
    assert between == pytest.approx(float(expected), rel=1e-5)
    assert between != pytest.approx(full, rel=1e-3)  # the full step's loss covers the window too


def read_tokens(model, run) -> list[int]:
    """Tokens each forward of `model` read while `run()` ran (from the embedding's input)."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_steps_between_read_only_what_follows_the_window(tokenizer):
    absorber = engine(tokenizer, max_steps=6, window_grad_every=3).absorber
    segments = [WINDOW + PROBES]
    whole = len(absorber.fmt.encode_segments(segments[0]))
    after = whole - len(absorber.fmt.encode_segments(WINDOW))
    reports = []
    seen = read_tokens(
        absorber.model,
        lambda: reports.append(absorber.train([], CONTEXT, segments, base_teacher=True, leads=[len(WINDOW)])),
    )
    teacher = len(absorber.fmt.encode_segments(CONTEXT)) + whole
    # The teacher reads [C; S] once; of steps 0..6 (6 updates, then the final loss), 0, 3 and 6 read the
    # whole row and the others what follows the window.
    assert seen == [teacher, whole, after, after, whole, after, after, whole]
    assert reports[0].step_tokens == 2 * whole + 4 * after  # what the 6 updates read (benchmarks count FLOPs by it)
    start = absorber._plan([], CONTEXT, segments, [0], [len(WINDOW)]).student_starts[0]
    window = whole - after
    assert reports[0].step_attention_pairs == 2 * causal_pairs(start, whole) + 4 * causal_pairs(start + window, after)
    assert reports[0].step_window_pairs == 4 * (start + window) * after
    assert reports[0].refresh_tokens == reports[0].refresh_attention_pairs == 0  # step 3 trains through the window
    assert reports[0].sync_tokens == whole


def round_report(tokenizer, **config):
    built = AbsorptionEngine(
        tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=AbsorberConfig(**{**FAST, **config})
    )
    report = built.run_round([], CONTEXT, n_probes=2, following=WINDOW, base_teacher=True)
    weights = [p.detach().clone() for n, p in built.model.named_parameters() if "lora_B" in n]
    return report, weights


def test_a_streaming_round_trains_with_steps_between_and_one_is_the_default(tokenizer):
    every_step, weights_1 = round_report(tokenizer, max_steps=6)
    default, _ = round_report(tokenizer, max_steps=6, window_grad_every=1)
    between, weights_3 = round_report(tokenizer, max_steps=6, window_grad_every=3)
    assert default.loss_curve == every_step.loss_curve  # 1 is the default and the paper's path
    assert between.loss_curve[0] == pytest.approx(every_step.loss_curve[0])  # step 0 reads the whole of S
    assert between.final_loss < between.initial_loss  # it trained; the final loss again reads the whole of S
    assert any(not torch.equal(a, b) for a, b in zip(weights_1, weights_3, strict=True))


def test_rows_without_a_window_always_run_whole(tokenizer):
    """A round with no following turns (one-shot) has no lead: `window_grad_every` changes nothing."""
    curves = []
    for every in (1, 3):
        built = AbsorptionEngine(
            tiny_model(tokenizer, seed=0),
            tokenizer=tokenizer,
            config=AbsorberConfig(**{**FAST, "max_steps": 4, "window_grad_every": every}),
        )
        curves.append(built.run_round([], CONTEXT, n_probes=2, base_teacher=True).loss_curve)
    assert curves[0] == curves[1]


@pytest.mark.parametrize("bad", [0, -1])
def test_window_grad_every_must_be_positive(bad):
    with pytest.raises(ValueError, match="window_grad_every"):
        AbsorberConfig(window_grad_every=bad)


def test_leads_must_match_the_segments(tokenizer):
    absorber = engine(tokenizer).absorber
    with pytest.raises(ValueError, match="`leads` needs one count per segment"):
        absorber.train([], CONTEXT, [WINDOW + PROBES], base_teacher=True, leads=[1, 2])
    with pytest.raises(ValueError, match="`leads` needs one count per segment"):
        absorber.train([], CONTEXT, [PROBES], base_teacher=True, leads=[len(PROBES) + 1])


def test_a_report_times_its_own_training(tokenizer):
    """`seconds` is the time `train` took (plus the teacher seconds passed in), whatever else it counts."""
    import time

    absorber = engine(tokenizer, max_steps=3, window_grad_every=3, train_window=False).absorber
    started = time.perf_counter()
    report = absorber.train([], CONTEXT, [WINDOW + PROBES], base_teacher=True, leads=[len(WINDOW)], teacher_seconds=2.0)
    took = time.perf_counter() - started
    assert 2.0 < report.seconds <= 2.0 + took and report.teacher_seconds <= report.seconds


def test_causal_pairs_count_the_attention_mask():
    for start, count in [(0, 1), (0, 5), (3, 4), (7, 0)]:
        mask = torch.ones(start + count, start + count).tril()[start:]  # the rows of the `count` tokens
        assert causal_pairs(start, count) == int(mask.sum())


def test_without_training_the_window_its_keys_and_values_are_refreshed_without_gradients(tokenizer):
    """`train_window=False`: after step 0, the k-th steps re-read the window with no gradient, then train the rest."""
    absorber = engine(tokenizer, max_steps=6, window_grad_every=3, train_window=False).absorber
    segments = [WINDOW + PROBES]
    whole = len(absorber.fmt.encode_segments(segments[0]))
    window = len(absorber.fmt.encode_segments(WINDOW))
    after = whole - window
    assert window != after  # the reads below are told apart by their length
    reads: list[tuple[int, bool]] = []
    embed = absorber.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda _m, a, _o: reads.append((a[0].numel(), torch.is_grad_enabled())))
    try:
        report = absorber.train([], CONTEXT, segments, base_teacher=True, leads=[len(WINDOW)])
    finally:
        handle.remove()
    teacher = len(absorber.fmt.encode_segments(CONTEXT)) + whole
    # Step 0 trains the whole row; step 3 re-reads the window, then trains what follows; the final loss is whole.
    assert [n for n, _ in reads] == [teacher, whole, after, after, window, after, after, after, whole]
    assert [g for n, g in reads[1:8] if n == window] == [False]  # the refresh reads without gradients
    assert all(g for n, g in reads[1:8] if n != window)  # the steps train
    assert report.step_tokens == whole + 5 * after  # the refresh trains nothing and is not counted
    start = absorber._plan([], CONTEXT, segments, [0], [len(WINDOW)]).student_starts[0]
    assert report.step_attention_pairs == causal_pairs(start, whole) + 5 * causal_pairs(start + window, after)
    assert report.step_window_pairs == 5 * (start + window) * after  # the stored keys, read without their gradients
    assert (report.refresh_tokens, report.refresh_attention_pairs) == (window, causal_pairs(start, window))
    assert report.final_loss < report.initial_loss
    # With the window trained (the default), step 3 reads the whole row instead.
    assert AbsorberConfig().train_window is True


@pytest.mark.parametrize("bad", ["first", "sometimes", 2.5])
def test_train_window_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="train_window"):
        AbsorberConfig(train_window=bad)
