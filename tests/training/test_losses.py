"""Loss terms: sums (not means), float32 math, and the values a hand computation gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from incr_cli.training.losses import ewc_penalty, hidden_loss_sum, kd_loss_sum, mlm_loss_sum, topk_correct


def logits(n=6, v=11, seed=0):
    return torch.randn((n, v), generator=torch.Generator().manual_seed(seed))


def test_mlm_loss_is_a_sum_of_cross_entropies():
    z, targets = logits(), torch.tensor([0, 3, 10, 2, 2, 7])
    expected = sum(-torch.log_softmax(z[i], -1)[t] for i, t in enumerate(targets.tolist()))
    torch.testing.assert_close(mlm_loss_sum(z, targets), expected)
    assert mlm_loss_sum(z.bfloat16(), targets).dtype == torch.float32


def test_kd_zero_when_student_equals_teacher():
    z = logits()
    assert kd_loss_sum(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss_sum(z, logits(seed=1), 2.0).item() > 0


def test_kd_matches_hand_computation():
    student, teacher, t = logits(seed=2), logits(seed=3), 3.0
    expected = t * t * F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="sum")
    torch.testing.assert_close(kd_loss_sum(student, teacher, t), expected)
    # The definition itself: sum_n sum_v p_t (log p_t - log p_s), times T^2.
    p_t = torch.softmax(teacher / t, -1)
    by_hand = t * t * (p_t * (p_t.log() - torch.log_softmax(student / t, -1))).sum()
    torch.testing.assert_close(kd_loss_sum(student, teacher, t), by_hand)


def test_kd_does_not_reach_the_teacher():
    student = logits(seed=4).requires_grad_()
    teacher = logits(seed=5).requires_grad_()
    kd_loss_sum(student, teacher, 2.0).backward()
    assert student.grad is not None and teacher.grad is None


def test_hidden_loss():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn((2, 4, 8), generator=g), torch.randn((2, 4, 8), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for kind in ("mse", "cosine"):
        assert hidden_loss_sum(student, student.clone(), mask, kind).item() == pytest.approx(0.0, abs=1e-6)
    real = mask.bool()
    mse = ((student - teacher) ** 2).mean(-1)[real].sum()
    torch.testing.assert_close(hidden_loss_sum(student, teacher, mask, "mse"), mse)
    cos = (1 - F.cosine_similarity(student, teacher, dim=-1))[real].sum()
    torch.testing.assert_close(hidden_loss_sum(student, teacher, mask, "cosine"), cos)
    # Padding does not count, whatever it holds.
    teacher[0, 3] = float("nan")
    torch.testing.assert_close(hidden_loss_sum(student, teacher, mask, "mse"), mse)
    with pytest.raises(ValueError, match="hidden_loss"):
        hidden_loss_sum(student, teacher, mask, "l1")


def tiny_model():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64))


def test_ewc_penalty_and_gradient():
    model = tiny_model()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    assert ewc_penalty(params, anchor, fisher, 100.0).item() == 0.0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    weight = 100.0
    penalty = ewc_penalty(params, anchor, fisher, weight)
    by_hand = weight / 2 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(penalty, by_hand)
    penalty.backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, weight * fisher[name] * (p.detach() - anchor[name]))


def test_ewc_only_counts_named_parameters_and_rejects_a_name_mismatch():
    model = tiny_model()
    params = {n: p for n, p in model.named_parameters() if "embeddings" not in n}  # frozen ones left out
    anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    expected = 0.5 * sum((p.detach() ** 2).sum() for p in params.values())
    torch.testing.assert_close(ewc_penalty(params, anchor, fisher, 1.0), expected)
    with pytest.raises(ValueError, match="module.bert"):
        ewc_penalty(params, anchor, {f"module.{n}": f for n, f in fisher.items()}, 1.0)


def test_topk_correct():
    z = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 0.3]])
    targets = torch.tensor([1, 3, 0])
    assert topk_correct(z, targets, 1).item() == 1
    assert topk_correct(z, targets, 2).item() == 2
    assert topk_correct(z, targets, 10).item() == 3
    assert topk_correct(z[:0], targets[:0], 5).item() == 0


def test_float32_math_under_bf16_autocast():
    student, teacher, targets = logits(seed=6), logits(seed=7), torch.tensor([1, 2, 3, 4, 5, 6])
    hidden_s, hidden_t = logits(seed=8).view(2, 3, 11), logits(seed=9).view(2, 3, 11)
    mask = torch.ones((2, 3))
    reference = [mlm_loss_sum(student, targets), kd_loss_sum(student, teacher, 2.0),
                 hidden_loss_sum(hidden_s, hidden_t, mask, "cosine")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = [mlm_loss_sum(student, targets), kd_loss_sum(student, teacher, 2.0),
                 hidden_loss_sum(hidden_s, hidden_t, mask, "cosine")]
    for got, want in zip(under, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
