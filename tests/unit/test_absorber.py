"""Algorithm 1 on the tiny model: it learns, it touches only LoRA, it rolls back."""

import pytest
import torch

from absorber_memory import AbsorptionError, fidelity, losses
from absorber_memory.absorber import segment_schedule, trainable_lora_parameters

from ..conftest import chat

CONTEXT = chat("My name is Ana and I live in Lisbon with my dog Bruno.", "Nice to meet you, Ana!")
QUERIES = ["What is my name?", "Where do I live?", "Tell me about my dog."]


def _base_weights(pm):
    return {n: p.detach().clone() for n, p in pm.model.named_parameters() if "lora_" not in n}


def test_absorb_lowers_the_sync_loss_and_keeps_base_weights(make_memory):
    pm = make_memory()
    before = _base_weights(pm)
    report = pm.absorb(CONTEXT)
    assert report.steps == 8 and report.stopped_by == "max_steps"
    assert report.final_loss < 0.7 * report.initial_loss
    assert report.context_tokens > 0 and report.sync_tokens > 0 and report.probes == 2
    assert len(report.loss_curve) == report.steps + 1
    after = _base_weights(pm)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(p.abs().sum() > 0 for n, p in pm.model.named_parameters() if "lora_B" in n)
    assert not any(p.requires_grad for p in pm.model.parameters())  # frozen again afterwards


def test_gradients_reach_only_lora_weights(make_memory):
    pm = make_memory()
    params = trainable_lora_parameters(pm.model, "default")
    trainable = {id(p) for p in params}
    assert all(p.requires_grad == (id(p) in trainable) for p in pm.model.parameters())
    assert all("lora_" in n for n, p in pm.model.named_parameters() if id(p) in trainable)


def test_absorbing_beats_dropping_on_held_out_queries(make_memory):
    pm = make_memory(max_steps=40, probe_count=4, probe_max_new_tokens=16)
    pm.absorb(CONTEXT)
    report = fidelity(pm, QUERIES, context=CONTEXT, window=[], max_new_tokens=12)
    assert report.kl_dropped > 0
    assert report.kl_absorbed < report.kl_dropped
    assert 0 < report.gap_closed <= 1
    again = fidelity(pm, QUERIES, context=CONTEXT, window=[], max_new_tokens=12)
    assert again.kl_absorbed == pytest.approx(report.kl_absorbed)  # deterministic
    assert report.note == ""


def test_fidelity_with_nothing_absorbed_explains_its_nan(make_memory):
    import math

    pm = make_memory()
    pm.add_messages(CONTEXT[:2])  # fits the window: nothing absorbed
    with pytest.warns(RuntimeWarning, match="gap_closed is nan: nothing has been absorbed yet"):
        report = fidelity(pm, QUERIES[:1], max_new_tokens=4)
    assert math.isnan(report.gap_closed) and report.kl_dropped == 0
    assert "nothing has been absorbed" in report.note and report.to_dict()["note"] == report.note


def test_runs_are_reproducible(make_memory):
    a, b = make_memory(), make_memory()
    assert a.absorb(CONTEXT).loss_curve == b.absorb(CONTEXT).loss_curve


def test_explicit_sync_segments_are_used_verbatim(make_memory):
    pm = make_memory()
    sync = [chat("What city is nice?", "Lisbon is lovely.")]
    report = pm.absorb(CONTEXT, sync)
    assert report.probes == 0 and report.sync_segments == 1
    assert report.sync_tokens == len(pm.fmt.encode_segments(sync[0]))


def test_threshold_stops_early(make_memory):
    pm = make_memory(loss_threshold=10.0)
    report = pm.absorb(CONTEXT)
    assert report.stopped_by == "threshold" and report.steps == 0


@pytest.mark.parametrize("losses", [{"mse": 1.0}, {"logit_kl": 1.0}, {"lm": 1.0}, {"l1": 1.0, "lm": 0.1}])
def test_other_losses_train(make_memory, losses):
    pm = make_memory(losses=losses)
    report = pm.absorb(CONTEXT)
    assert report.final_loss < report.initial_loss


def test_update_penalty_is_added(make_memory):
    plain = make_memory().absorb(CONTEXT)
    penalised = make_memory(update_penalty="l1", update_penalty_weight=100.0).absorb(CONTEXT)
    assert penalised.initial_loss == pytest.approx(plain.initial_loss)  # B = 0: no penalty yet
    assert penalised.final_loss > plain.final_loss


def test_first_teacher_is_the_frozen_model(make_memory):
    """With LoRA B = 0 the adapter is a no-op, so both teachers must agree exactly."""
    pm = make_memory()
    batch = pm.engine.absorber._plan([], CONTEXT, [chat("hi", "hello")], [0])
    base = pm.engine.absorber._teacher_targets(batch, base_teacher=True).states
    current = pm.engine.absorber._teacher_targets(batch, base_teacher=False).states
    assert all(torch.equal(a, b) for a, b in zip(base, current))


def _lora_state(pm):
    return {n: p.detach().clone() for n, p in pm.model.named_parameters() if "lora_" in n}


def test_nan_loss_rolls_back_and_raises(make_memory, monkeypatch):
    pm = make_memory()
    pm.absorb(CONTEXT)
    good = _lora_state(pm)
    calls = {"n": 0}
    real = losses.weighted_sum

    def poisoned(*args):  # one call per micro-batch; the tiny test's steps have one each
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(losses, "weighted_sum", poisoned)
    with pytest.raises(AbsorptionError, match="loss became nan at step 2; adapter rolled back"):
        pm.absorb(CONTEXT)
    assert all(torch.equal(good[n], p) for n, p in _lora_state(pm).items())


def test_cancel_from_progress_callback_rolls_back(make_memory):
    pm = make_memory()
    good = _lora_state(pm)

    def cancel(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pm.engine.absorber.train([], CONTEXT, [chat("hi", "hello")], on_step=cancel)
    assert all(torch.equal(good[n], p) for n, p in _lora_state(pm).items())


def test_hidden_state_losses_skip_the_lm_head(make_memory):
    pm = make_memory()
    seqs = [pm.fmt.encode_segments(CONTEXT)]
    assert pm.engine.absorber._forward(seqs, logits=False).logits.shape[1] == 1
    assert pm.engine.absorber._forward(seqs, logits=True).logits.shape[1] == len(seqs[0])


def test_segment_schedule_cycles_through_all_segments_evenly():
    from collections import Counter

    assert segment_schedule(5, None, 0)() == [0, 1, 2, 3, 4]
    assert segment_schedule(3, 7, 0)() == [0, 1, 2]  # more per step than segments: all of them
    draw = segment_schedule(5, 2, seed=0)
    steps = [draw() for _ in range(10)]
    assert all(len(rows) == 2 and len(set(rows)) == 2 for rows in steps)
    assert set(Counter(r for rows in steps for r in rows).values()) == {4}  # 20 draws, each segment 4 times
    again = segment_schedule(5, 2, seed=0)
    assert [again() for _ in range(10)] == steps  # seeded
    other = segment_schedule(5, 2, seed=1)
    assert [other() for _ in range(10)] != steps


def test_sync_batch_segments_trains_on_a_subset_per_step(make_memory, monkeypatch):
    sync = [
        chat("What city is nice?", "Lisbon is lovely."),
        chat("Any pets?", "A dog, Bruno."),
        chat("Hello!", "Hi Ana."),
        chat("Weather?", "Sunny in Lisbon."),
    ]
    pm = make_memory(sync_batch_segments=2, max_steps=12)
    sizes, steps = [], []
    forward, step = pm.engine.absorber._forward, pm.engine.absorber._step
    monkeypatch.setattr(
        pm.engine.absorber, "_forward", lambda seqs, logits=True, **k: sizes.append(len(seqs)) or forward(seqs, logits, **k)
    )
    monkeypatch.setattr(pm.engine.absorber, "_step", lambda b, t, a, rows, *r, **k: steps.append(len(rows)) or step(b, t, a, rows, *r, **k))
    report = pm.absorb(CONTEXT, sync)
    assert sizes[0] == 4 and sum(sizes[1:]) == 2 * 13  # one teacher pass over all four, then two rows per step
    assert steps == [2] * 13  # (and the last check)
    assert report.sync_segments == 4 and report.final_loss < report.initial_loss
    full = make_memory(max_steps=12).absorb(CONTEXT, sync)
    assert full.loss_curve[0] != report.loss_curve[0]  # a subset's loss, not the whole batch's
    with pytest.raises(ValueError, match="sync_batch_segments"):
        make_memory(sync_batch_segments=0)


def test_micro_batches_group_longest_first_under_the_token_budget():
    from absorber_memory import AbsorberConfig
    from absorber_memory.absorber import micro_batches

    config = AbsorberConfig(micro_batch_tokens=100)
    widths = [10, 60, 30, 25, 120]
    groups = micro_batches(widths, [0, 1, 2, 3, 4], config)
    # 120 alone (over budget), 60 alone (2 x 60 > 100), 25 joins 30 (padded by 5 of 30), 10 would be padded by
    # two thirds of 30: it runs alone rather than be padded.
    assert groups == [[4], [1], [2, 3], [0]]
    assert sorted(r for g in groups for r in g) == [0, 1, 2, 3, 4]
    assert micro_batches(widths, [0, 3], config) == [[3], [0]]  # only the step's rows
    assert micro_batches([24, 20, 19, 18], [0, 1, 2, 3], config) == [[0, 1, 2, 3]]  # similar widths share a forward


@pytest.mark.parametrize("losses_mix", [{"l1": 1.0}, {"mse": 0.5, "logit_kl": 1.0}])
def test_micro_batched_steps_equal_one_padded_batch(make_memory, losses_mix):
    """Same losses and same adapter whether a step runs as one padded batch or one forward per segment."""
    sync = [
        chat("What city is nice?", "Lisbon is lovely, with old trams and hills."),
        chat("Pets?", "Bruno."),
        chat("Hello!", "Hi Ana, good to see you again today."),
        chat("Weather?", "Sunny."),
    ]
    runs = {}
    for budget in (100_000, 1):  # everything in one batch / every segment alone
        pm = make_memory(micro_batch_tokens=budget, max_steps=6, losses=losses_mix)
        report = pm.absorb(CONTEXT, sync)
        runs[budget] = (report.loss_curve, _lora_state(pm))
    (one_curve, one_state), (each_curve, each_state) = runs[100_000], runs[1]
    assert one_curve == pytest.approx(each_curve, rel=1e-4, abs=1e-6)
    assert one_curve[-1] < one_curve[0]
    diff = max(float((one_state[n] - each_state[n]).abs().max()) for n in one_state)
    size = max(float(one_state[n].abs().max()) for n in one_state)
    assert diff < 1e-3 * size


def test_micro_batches_skip_the_padding_of_short_segments(make_memory, monkeypatch):
    long = chat("Tell me everything about Lisbon. " * 6, "It is a city of hills, trams and light. " * 6)
    sync = [long] + [chat("Hi", "Hello")] * 3
    pm = make_memory(max_steps=2)  # the default budget would fit all four rows padded to the long one
    forward, seen = pm.engine.absorber._forward, []

    def counting(seqs, logits=True, **kwargs):
        seen.append((len(seqs) * max(len(s) for s in seqs), sum(len(s) for s in seqs)))
        return forward(seqs, logits, **kwargs)

    monkeypatch.setattr(pm.engine.absorber, "_forward", counting)
    pm.absorb(CONTEXT, sync)
    teacher, student = seen[:2], seen[2:]  # the teacher reads the rows once, grouped the same way
    assert sum(p for p, _ in teacher) == sum(r for _, r in teacher)
    padded, real = sum(p for p, _ in student), sum(r for _, r in student)
    assert len(student) == 2 * 3  # per step (and the last check): the long row alone, the three short ones together
    assert padded == real  # the three short rows are not padded to the long one
    assert 4 * max(p for p, _ in student) > 2 * padded / 3  # one padded batch a step would read over twice as much


def test_a_long_shared_context_is_read_once_with_the_same_teacher_targets(make_memory, monkeypatch):
    from absorber_memory import absorber

    pm = make_memory(losses={"l1": 1.0, "logit_kl": 0.5})
    context = CONTEXT * 4
    segments = [chat(q, "I remember.") for q in QUERIES]
    batch = pm.engine.absorber._plan([], context, segments, [0, 2, 0])
    whole = pm.engine.absorber._teacher_targets(batch, base_teacher=True)
    calls = []
    real = pm.model.forward
    monkeypatch.setattr(pm.model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", batch.teacher_starts[0])
    cached = pm.engine.absorber._teacher_targets(batch, base_teacher=True)
    shared = batch.teacher_starts[0]
    # [prefix; C] once, then each row's S alone: no forward reads C a second time.
    assert calls[0] == (1, shared) and [c[1] for c in calls[1:]] == [len(r) - shared for r in batch.teacher]
    pairs = [*zip(whole.states, cached.states, strict=True), *zip(whole.held_states, cached.held_states, strict=True),
             (whole.logits.probs, cached.logits.probs), (whole.held_logits.probs, cached.held_logits.probs),
             (whole.logits.neg_entropy, cached.logits.neg_entropy)]
    for a, b in pairs:
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_an_absorption_reading_its_context_once_trains_like_one_reading_it_per_segment(make_memory, monkeypatch):
    from absorber_memory import absorber, generation

    def run(threshold):
        monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", threshold)
        monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", threshold)
        pm = make_memory(probe_count=4, losses={"l1": 1.0, "logit_kl": 0.25})
        report = pm.absorb(CONTEXT * 3)
        return report, [p.detach().clone() for p in trainable_lora_parameters(pm.model, "default")]

    batched, batched_weights = run(10**9)
    cached, cached_weights = run(1)
    assert cached.steps == batched.steps and cached.sync_tokens == batched.sync_tokens
    assert cached.loss_curve == pytest.approx(batched.loss_curve, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched_weights, cached_weights, strict=True))


def test_a_streaming_round_reads_its_context_once_for_probe_answers_and_targets(make_memory, monkeypatch):
    from absorber_memory import absorber, generation

    following = chat("Let us talk about the weather.", "It is sunny today.")

    def run(reuse):
        monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", 1)
        monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", 1 if reuse else 10**9)
        pm = make_memory(probe_count=3, losses={"l1": 1.0, "logit_kl": 0.25})
        reads, targets = [], []
        real_forward, real_targets = pm.model.forward, pm.engine.absorber._teacher_targets
        monkeypatch.setattr(pm.model, "forward",
                            lambda *a, **k: reads.append(k["input_ids"].shape) or real_forward(*a, **k))
        monkeypatch.setattr(pm.engine.absorber, "_teacher_targets",
                            lambda *a: targets.append(len(reads)) or real_targets(*a))
        report = pm.engine.run_round([], CONTEXT * 3, n_probes=3, following=following, base_teacher=True)
        weights = [p.detach().clone() for p in trainable_lora_parameters(pm.model, "default")]
        plan = pm.engine.absorber._plan([], CONTEXT * 3, [[]], [0])
        return report, weights, reads[targets[0]], plan.teacher_starts[0]

    fresh, fresh_weights, fresh_read, shared = run(reuse=False)
    cached, cached_weights, cached_read, _ = run(reuse=True)
    # One sync segment (the chained probes): the targets' forward reads C again unless it continues from the
    # cache the probe answers left; then it reads only S.
    assert fresh_read[1] == shared + fresh.sync_tokens
    assert cached_read == (1, cached.sync_tokens)
    assert cached.sync_tokens == fresh.sync_tokens and cached.steps == fresh.steps
    assert cached.loss_curve == pytest.approx(fresh.loss_curve, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fresh_weights, cached_weights, strict=True))


@pytest.mark.parametrize("with_logits", [False, True])
def test_independent_probe_answers_record_the_window_s_teacher_states_for_the_targets(
    make_memory, monkeypatch, with_logits
):
    """The targets' forward reads only what follows the window; the round trains as if it read it all."""
    from absorber_memory import absorber, generation

    following = chat("Let us talk about the weather.", "It is sunny today.", "And tomorrow?", "Rain, I think.")
    monkeypatch.setattr(generation, "SHARED_PREFIX_TOKENS", 1)
    monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", 1)
    real_recorded = absorber._recorded

    def run(record):
        monkeypatch.setattr(absorber, "_recorded", real_recorded if record else lambda *a: 0)
        losses_ = {"l1": 1.0, "logit_kl": 0.25} if with_logits else {"l1": 1.0}
        pm = make_memory(probe_count=3, losses=losses_, probe_answers="independent", max_steps=4)
        reads, targets = [], []
        real_forward, real_targets = pm.model.forward, pm.engine.absorber._teacher_targets
        monkeypatch.setattr(pm.model, "forward",
                            lambda *a, **k: reads.append(k["input_ids"].shape[1]) or real_forward(*a, **k))
        monkeypatch.setattr(pm.engine.absorber, "_teacher_targets",
                            lambda *a: targets.append(len(reads)) or real_targets(*a))
        report = pm.engine.run_round([], CONTEXT * 3, n_probes=3, following=following, base_teacher=True)
        weights = [p.detach().clone() for p in trainable_lora_parameters(pm.model, "default")]
        window = sum(pm.engine.fmt.count(m) for m in following)
        return report, weights, reads[targets[0]], window

    fresh, fresh_weights, fresh_read, window = run(record=False)
    recorded, recorded_weights, recorded_read, _ = run(record=True)
    assert fresh_read == fresh.sync_tokens  # after [prefix; C] from the probe answers' cache
    assert recorded_read <= recorded.sync_tokens - window  # the window's states came from the answers' read
    assert recorded.loss_curve == pytest.approx(fresh.loss_curve, rel=1e-3)
    assert recorded.initial_loss == pytest.approx(fresh.initial_loss, rel=1e-5)  # the same targets, to rounding
    # Adam's normalised steps carry the targets' rounding (they were read in two pieces) into the weights.
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(fresh_weights, recorded_weights, strict=True))


def test_a_cache_that_did_not_read_the_context_is_not_used_for_the_targets(make_memory, monkeypatch):
    from absorber_memory import absorber
    from absorber_memory.generation import PromptCache

    monkeypatch.setattr(absorber, "SHARED_PREFIX_TOKENS", 1)
    pm = make_memory(losses={"l1": 1.0, "logit_kl": 0.5})
    ab = pm.engine.absorber
    batch = ab._plan([], CONTEXT * 3, [chat(QUERIES[0], "I remember.")], [0])
    whole = ab._teacher_targets(batch, base_teacher=True)
    other = PromptCache()
    tok = pm.engine.tokenizer
    other.generate_ids(pm.model, tok, tok("something else entirely")["input_ids"], 3)
    before = list(other.ids)
    targets = ab._teacher_targets(batch, base_teacher=True, read=other)
    assert other.ids == before  # neither used nor cropped
    for a, b in [*zip(whole.states, targets.states, strict=True), (whole.logits.probs, targets.logits.probs)]:
        assert torch.allclose(a, b, atol=1e-5)


def test_the_fused_head_gives_the_loss_and_gradients_of_the_model_logits(make_memory):
    from absorber_memory.absorber import plain_output_weight

    pm = make_memory(losses={"l1": 1.0, "logit_kl": 1.0})
    ab = pm.engine.absorber
    assert plain_output_weight(pm.model) is pm.model.get_output_embeddings().weight
    segments = [chat(q, "I remember that well.") for q in QUERIES]
    batch = ab._plan([{"role": "system", "content": "Be kind."}], CONTEXT, segments, [0, 0, 0])
    targets = ab._teacher_targets(batch, base_teacher=True)
    scales = ab._hidden_scales(targets.states)
    params = trainable_lora_parameters(pm.model, "default")
    with torch.no_grad():  # a trained-looking adapter, so the student differs from the teacher
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    found = []
    for fused in (False, True):
        ab.fused_head = fused
        assert ab._student_logits(targets) is not fused
        out = ab._forward(batch.student, ab._student_logits(targets), logits_from=min(batch.student_starts))
        if fused:
            assert out.logits.shape[1] == 1  # the forward skipped the vocabulary projection
        loss = ab._sync_loss(out, batch.student_starts, batch.lengths, targets.states, targets.logits, scales,
                             sum(batch.lengths))
        grads = torch.autograd.grad(loss, params)
        found.append((float(loss.detach()), grads))
    (plain, plain_grads), (fused_loss, fused_grads) = found
    assert fused_loss == pytest.approx(plain, rel=1e-5) and plain > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain_grads, fused_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in fused_grads)


def test_a_head_that_is_not_plain_reads_the_model_logits(make_memory):
    from absorber_memory.absorber import plain_output_weight

    pm = make_memory(losses={"l1": 1.0, "logit_kl": 0.5})
    base = pm.model.get_base_model()
    head = base.lm_head
    real = base.forward

    def capped(*args, **kwargs):  # a head that caps its logits, as some architectures do
        out = real(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    base.forward = capped
    assert plain_output_weight(pm.model) is None
    ab = pm.engine.absorber
    batch = ab._plan([], CONTEXT, [chat(QUERIES[0], "I remember.")], [0])
    assert ab._student_logits(ab._teacher_targets(batch, base_teacher=True))
    report = pm.absorb(CONTEXT)
    assert report.final_loss < report.initial_loss
    base.forward = real
    head.weight.requires_grad_(True)  # a head being trained is never fused
    assert plain_output_weight(pm.model) is None
    head.weight.requires_grad_(False)
    assert plain_output_weight(pm.model) is head.weight


def test_logits_from_the_sync_start_give_the_loss_of_logits_everywhere(make_memory):
    pm = make_memory(losses={"l1": 1.0, "logit_kl": 1.0})
    ab = pm.engine.absorber
    ab.fused_head = False  # the loss reads the forward's logits
    segments = [chat(q, "I remember that well.") for q in QUERIES]
    batch = ab._plan([{"role": "system", "content": "Be kind."}], CONTEXT, segments, [0, 0, 0])
    targets = ab._teacher_targets(batch, base_teacher=True)
    rows = [0, 1, 2]
    scales = ab._hidden_scales(targets.states)
    seqs = [batch.student[r] for r in rows]
    first = min(batch.student_starts)
    assert first > 0
    losses_ = []
    for logits_from in (0, first):
        out = ab._forward(seqs, True, logits_from=logits_from)
        assert out.logits.shape[1] == max(map(len, seqs)) - logits_from
        losses_.append(float(ab._sync_loss(out, [batch.student_starts[r] for r in rows], batch.lengths, targets.states,
                                           targets.logits, scales, sum(batch.lengths))))
    assert losses_[1] == pytest.approx(losses_[0], rel=1e-5) and losses_[0] > 0
