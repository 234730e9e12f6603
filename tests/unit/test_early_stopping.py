"""Early stopping on held-out probes: held-out tokens never train, the best adapter is kept."""

import pytest
import torch

from absorber_memory import AbsorberConfig, ConfigError
from absorber_memory.absorber import trainable_lora_parameters
from absorber_memory.engine import held_out_probes

from ..conftest import chat

CONTEXT = chat("My name is Ana and I live in Lisbon with my dog Bruno.", "Nice to meet you, Ana!")
SYNC = chat("Where do I live?", "You live in Lisbon.", "What is my dog called?", "Your dog is Bruno.")


def _lora(pm):
    return [p.detach().clone() for p in trainable_lora_parameters(pm.model, "default")]


def _train(pm, holdout, **kw):
    return pm.engine.absorber.train([], CONTEXT, [SYNC], base_teacher=True, holdout=holdout, **kw)


def test_off_by_default_and_the_curve_is_unchanged(make_memory):
    a, b = make_memory(), make_memory(early_stopping_patience=0, early_stopping_holdout=0.5)
    ra, rb = a.absorb(CONTEXT), b.absorb(CONTEXT)
    assert AbsorberConfig().early_stopping_patience == 0
    assert ra.loss_curve == rb.loss_curve and ra.heldout_curve == [] and ra.best_step is None
    assert ra.heldout_tokens == 0 and ra.stopped_by == "max_steps"


def test_held_out_tokens_are_never_trained_on(make_memory):
    """Holding out the last exchange trains exactly as if the segment ended before it."""
    held, cut = make_memory(), make_memory()
    r1 = _train(held, [2])
    r2 = cut.engine.absorber.train([], CONTEXT, [SYNC[:2]], base_teacher=True)
    assert r1.loss_curve == pytest.approx(r2.loss_curve, rel=1e-5)
    assert all(
        torch.allclose(x, y, atol=2e-5) for x, y in zip(_lora(held), _lora(cut), strict=True)
    )  # float noise only
    assert r1.sync_tokens == r2.sync_tokens and r1.heldout_tokens == len(held.fmt.encode_segments(SYNC[2:]))


def test_stops_when_the_held_out_loss_rises_and_keeps_the_best_adapter(make_memory):
    pm = make_memory(lr=5e-2, max_steps=40, early_stopping_patience=3)
    report = _train(pm, [2])
    assert report.stopped_by == "early_stopping" and report.steps < 40
    curve = report.heldout_curve
    assert len(curve) == report.steps + 1 and report.heldout_tokens > 0
    best = report.best_step
    assert curve[best] == min(curve) and report.steps - best == 3
    assert all(value >= curve[best] * (1 - 1e-3) for value in curve[best + 1 :])
    # The kept adapter is the one of step `best`: training that many steps without early stopping gives it.
    again = make_memory(lr=5e-2, max_steps=max(best, 1))
    if best == 0:
        assert all(float(p.abs().sum()) == 0 for n, p in pm.model.named_parameters() if "lora_B" in n)
    else:
        _train(again, [2])
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_lora(pm), _lora(again), strict=True))
    assert report.final_loss == report.loss_curve[best]


def test_keeps_training_while_the_held_out_loss_falls(make_memory):
    pm = make_memory(lr=1e-2, max_steps=12, early_stopping_patience=50)
    report = _train(pm, [2])
    assert report.stopped_by == "max_steps" and report.steps == 12
    assert report.heldout_curve[report.best_step] < report.heldout_curve[0]


def test_one_shot_rounds_hold_out_whole_probe_segments(make_memory):
    pm = make_memory(probe_count=4, early_stopping_patience=2, early_stopping_holdout=0.5, max_steps=6)
    report = pm.absorb(CONTEXT)
    assert report.probes == 4 and report.heldout_tokens > 0
    assert len(report.heldout_curve) == len(report.loss_curve)


def test_streaming_rounds_hold_out_the_last_probes_of_the_chain(make_memory):
    pm = make_memory(
        probe_count=4, early_stopping_patience=2, window_tokens=40, absorb_tokens=20, sync_tokens=20, max_steps=6
    )
    reports = pm.add_messages(
        chat("I am Ana.", "Hi Ana!", "I live in Lisbon.", "Nice city.", "My dog is Bruno.", "Cute!")
    )
    assert reports and all(r.heldout_tokens > 0 and r.heldout_curve for r in reports)


def test_how_many_probes_are_held_out():
    on = AbsorberConfig(early_stopping_patience=2)
    assert held_out_probes(on, 8) == 2 and held_out_probes(on, 1) == 1 and held_out_probes(on, 0) == 0
    assert held_out_probes(AbsorberConfig(early_stopping_patience=2, early_stopping_holdout=0.9), 4) == 4
    assert held_out_probes(AbsorberConfig(), 8) == 0


def test_a_single_probe_is_not_held_out_when_nothing_else_would_train(make_memory):
    pm = make_memory(probe_count=1, early_stopping_patience=2)
    report = pm.absorb(CONTEXT)
    assert report.heldout_tokens == 0 and report.heldout_curve == [] and report.steps == 8


@pytest.mark.parametrize(
    "field, value",
    [("early_stopping_patience", -1), ("early_stopping_holdout", 0.0), ("early_stopping_holdout", 1.0)],
)
def test_bad_settings_are_refused(field, value):
    with pytest.raises((ConfigError, ValueError), match=field):
        AbsorberConfig(**{field: value})


def test_bad_holdout_is_refused_and_nothing_trains(make_memory):
    pm = make_memory()
    before = _lora(pm)
    with pytest.raises(ValueError, match="holdout"):
        _train(pm, [2, 0])
    with pytest.raises(ValueError, match="holdout"):
        _train(pm, [5])
    with pytest.raises(Exception, match="held out"):
        _train(pm, [4])
    assert all(torch.equal(x, y) for x, y in zip(before, _lora(pm), strict=True))
