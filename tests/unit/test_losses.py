import pytest
import torch

from absorber_memory import losses


def _states(seed, layers=3, tokens=5, hidden=8, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * (i + 1) * torch.randn(tokens, hidden, generator=g) for i in range(layers)]


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_identical_states_give_zero(kind):
    t = _states(0)
    assert losses.hidden_sync_loss(t, [x.clone() for x in t], kind).item() == 0.0


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_a_wrong_teacher_gives_a_larger_loss(kind):
    teacher = _states(0)
    near = [t + 0.01 * torch.randn_like(t) for t in teacher]
    far = _states(1)
    assert 0 < losses.hidden_sync_loss(near, teacher, kind) < losses.hidden_sync_loss(far, teacher, kind)


def test_per_layer_normalisation_weighs_layers_alike():
    # Layer 2 has 100x the scale of layer 1; the same relative error must count the same.
    teacher = [torch.ones(4, 4), 100 * torch.ones(4, 4)]
    off_small = [1.1 * teacher[0], teacher[1].clone()]
    off_big = [teacher[0].clone(), 1.1 * teacher[1]]
    a = losses.hidden_sync_loss(off_small, teacher, "l1")
    b = losses.hidden_sync_loss(off_big, teacher, "l1")
    assert torch.allclose(a, b) and a.item() == pytest.approx(0.05, rel=1e-4)


def test_gradient_flows_to_student_only():
    teacher = [t.requires_grad_() for t in _states(0)]
    student = [t.requires_grad_() for t in _states(1)]
    losses.hidden_sync_loss(student, teacher).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_layer_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same non-zero number of layers"):
        losses.hidden_sync_loss(_states(0, layers=2), _states(0, layers=3))
    with pytest.raises(ValueError, match="`kind`"):
        losses.hidden_sync_loss(_states(0), _states(0), "l3")


def test_logit_kl_is_zero_for_equal_and_positive_otherwise():
    a = torch.randn(6, 11)
    assert losses.logit_kl_loss(a, a.clone()).abs().item() < 1e-6
    assert losses.logit_kl_loss(a, torch.randn(6, 11)).item() > 0


def test_lm_loss_is_cross_entropy():
    logits, targets = torch.randn(5, 7), torch.tensor([0, 1, 2, 3, 4])
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(losses.lm_loss(logits, targets), expected)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_update_penalty_is_zero_for_a_fresh_adapter(kind):
    a, b = torch.randn(4, 8), torch.zeros(8, 4)
    assert losses.lora_update_penalty([(a, b, 2.0)], kind).item() == 0.0
    b = torch.randn(8, 4)
    assert losses.lora_update_penalty([(a, b, 2.0)], kind).item() > 0


def test_weighted_sum():
    terms = {"l1": torch.tensor(2.0), "lm": torch.tensor(3.0)}
    assert losses.weighted_sum(terms, {"l1": 1.0, "lm": 0.5}).item() == pytest.approx(3.5)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_sync_loss_parts_add_up_to_the_whole(kind):
    torch.manual_seed(0)
    teacher = [torch.randn(10, 8) for _ in range(3)]
    student = [t + 0.3 * torch.randn(10, 8) for t in teacher]
    whole = losses.hidden_sync_loss(student, teacher, kind)
    scales = losses.layer_scales(teacher, kind)
    parts = [
        losses.hidden_sync_loss(
            [s[a:b] for s in student], [t[a:b] for t in teacher], kind, scales=scales, total_tokens=10
        )
        for a, b in ((0, 3), (3, 10))
    ]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)
    assert float(parts[0]) != pytest.approx(float(whole), rel=1e-2)  # a part alone is not the whole


def test_logit_kl_parts_add_up_to_the_whole():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 5), torch.randn(6, 5)
    whole = losses.logit_kl_loss(student, teacher)
    parts = losses.logit_kl_loss(student[:2], teacher[:2], total_tokens=6) + losses.logit_kl_loss(
        student[2:], teacher[2:], total_tokens=6
    )
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_logit_kl_from_log_probabilities_normalised_once_equals_from_logits():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 5) * 3, torch.randn(6, 5, requires_grad=True)
    from_logits = losses.logit_kl_loss(student, teacher)
    normalised = losses.log_probs(teacher)
    assert torch.allclose(normalised.exp().sum(-1), torch.ones(6))
    assert float(losses.logit_kl_loss(student, normalised, teacher_normalized=True)) == pytest.approx(
        float(from_logits), rel=1e-6
    )
    # Raw logits passed as if normalised are not normalised: the flag is what skips the work.
    assert float(losses.logit_kl_loss(student, teacher, teacher_normalized=True)) != pytest.approx(
        float(from_logits), rel=1e-3
    )
