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


def test_kl_to_prepared_targets_equals_kl_from_logits():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 5) * 3, torch.randn(6, 5)
    targets = losses.next_token_targets(teacher)
    assert torch.allclose(targets.probs.sum(-1), torch.ones(6)) and len(targets) == 6
    assert float(losses.kl_to_targets(student, targets)) == pytest.approx(
        float(losses.logit_kl_loss(student, teacher)), rel=1e-5
    )
    assert float(losses.kl_to_targets(teacher, targets)) == pytest.approx(0.0, abs=1e-5)
    half = targets.select(lambda t: t[:3])
    assert float(losses.kl_to_targets(student[:3], half, total_tokens=6)) == pytest.approx(
        float(losses.logit_kl_loss(student[:3], teacher[:3], total_tokens=6)), rel=1e-5
    )


def _linear_kl_case(rows=7, hidden=6, vocab=13, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    states = torch.randn(rows, hidden, generator=gen, dtype=dtype)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2
    return weight, states, teacher


@pytest.mark.parametrize("chunk_bytes", [4 * 13, 4 * 13 * 3, losses.KL_CHUNK_BYTES])  # 1 row, 3 rows, all at once
def test_linear_kl_matches_the_kl_of_materialised_logits_in_value_and_gradient(monkeypatch, chunk_bytes):
    monkeypatch.setattr(losses, "KL_CHUNK_BYTES", chunk_bytes)
    weight, states, teacher = _linear_kl_case()
    targets = losses.next_token_targets(teacher)
    a = states.clone().requires_grad_()
    expected = losses.logit_kl_loss(a @ weight.T, teacher, total_tokens=10)
    (expected * 3).backward()
    b = states.clone().requires_grad_()
    fused = losses.linear_kl_loss(b, weight, targets, total_tokens=10)
    (fused * 3).backward()
    assert float(fused.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and float(fused.detach()) > 0
    assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7) and a.grad.abs().sum() > 0


def test_linear_kl_is_zero_where_the_student_is_the_teacher_and_works_without_gradients():
    weight, states, _ = _linear_kl_case()
    targets = losses.next_token_targets(states @ weight.T)
    assert float(losses.linear_kl_loss(states, weight, targets)) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        shifted = losses.linear_kl_loss(states + 0.5, weight, targets)
    assert float(shifted) > 0 and not shifted.requires_grad


def test_linear_kl_refuses_a_trainable_head_and_mismatched_rows():
    weight, states, teacher = _linear_kl_case()
    targets = losses.next_token_targets(teacher)
    with pytest.raises(ValueError, match="frozen output projection"):
        losses.linear_kl_loss(states, weight.clone().requires_grad_(), targets)
    with pytest.raises(ValueError, match="6 hidden rows for 7 teacher distributions"):
        losses.linear_kl_loss(states[:6], weight, targets)


def test_linear_kl_resolves_a_small_kl_between_large_float32_logits():
    # Peaked logits of a real model's size and a student close to the teacher: the KL is a small
    # difference of entropy-sized terms, which a long float32 dot product got 10x wrong.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(49152, 64, generator=gen) * 0.15
    states = torch.randn(48, 64, generator=gen) * 3
    teacher = (states + 0.05 * torch.randn(48, 64, generator=gen)) @ weight.T
    expected = losses.logit_kl_loss((states @ weight.T).double(), teacher.double())
    fused = losses.linear_kl_loss(states, weight, losses.next_token_targets(teacher))
    assert float(fused) == pytest.approx(float(expected), rel=1e-2) and float(expected) > 0
