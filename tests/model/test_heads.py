"""The masked-only head gives the full head's logits, loss and gradients, for every split."""

from __future__ import annotations

import pytest
import torch
from helpers_arch import FAMILIES, model_for
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from incr_cli.config.recipe import MaskingConfig
from incr_cli.model.heads import MaskedLMHead
from incr_cli.training.losses import hidden_loss_sum, kd_loss_sum, mlm_loss_sum
from incr_cli.training.masking import TokenIds, mask_batch

VOCAB = 99
SPECIAL = torch.tensor([0, 1, 2, 3, 4])  # pad, unk/bos, cls, sep/eos, mask
SIZES = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2)


class _Vocab:
    """What helpers_arch.model_for reads of a tokenizer: 99 ids, 0 = pad, 2 = cls, 3 = sep."""

    pad_token_id, cls_token_id, sep_token_id = 0, 2, 3

    def __len__(self) -> int:
        return VOCAB


class CustomBertForMaskedLM(BertForMaskedLM):
    """A subclass may change forward: it never gets a split, so it stands for every unknown class."""


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, **SIZES))
    if kind == "roberta":
        return RobertaForMaskedLM(RobertaConfig(hidden_size=32, intermediate_size=64, pad_token_id=0,
                                                max_position_embeddings=64, **SIZES))
    if kind == "distilbert":
        return DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2,
                                                      n_heads=2, pad_token_id=0))
    if kind == "deberta-v2-new-head":  # legacy=False: the lm_predictions head tied to the embeddings
        model = model_for("deberta-v2", _Vocab())
        return DebertaV2ForMaskedLM(DebertaV2Config(**{**model.config.to_dict(), "legacy": False}))
    if kind in FAMILIES:
        return model_for(kind, _Vocab())
    return CustomBertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, **SIZES))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    ids[:, 0] = 2
    ids[-1, 8:] = 0  # padding in the last row
    out = mask_batch(ids, MaskingConfig(probability=0.3), TokenIds(SPECIAL, 4, VOCAB), generator=g)
    return out, ids != 0


KINDS = ["bert", "roberta", "distilbert", "modernbert", "deberta-v2", "electra", "albert", "mpnet", "full"]


@pytest.mark.parametrize("kind", [*KINDS, "deberta-v2-new-head"])
def test_masked_only_head_matches_the_full_head(kind):
    model = build(kind).train()  # dropout on would break equality: disable it for the comparison
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    head = MaskedLMHead(model)
    assert head.kind == kind.replace("-new-head", "") and head.model is model
    masked, attention = batch()

    logits, hidden = head(masked.input_ids, attention, masked.positions, output_hidden=True)
    loss = mlm_loss_sum(logits, masked.targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    full = model(input_ids=masked.input_ids, attention_mask=attention, output_hidden_states=True)
    full_logits = full.logits[masked.positions]
    full_loss = mlm_loss_sum(full_logits, masked.targets)
    full_loss.backward()

    assert logits.shape == (masked.targets.numel(), VOCAB)
    torch.testing.assert_close(logits, full_logits)
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    assert hidden.shape == (*masked.input_ids.shape, 32)
    full_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["bert", "full"])
def test_no_hidden_unless_asked(kind):
    head = MaskedLMHead(build(kind).eval())
    masked, attention = batch()
    with torch.inference_mode():
        logits, hidden = head(masked.input_ids, attention, masked.positions)
    assert hidden is None and logits.shape[0] == masked.targets.numel()


def test_teacher_student_distillation_through_the_head():
    teacher, student = MaskedLMHead(build("bert").eval()), MaskedLMHead(build("bert").eval())
    masked, attention = batch(1)
    with torch.inference_mode():
        t_logits, t_hidden = teacher(masked.input_ids, attention, masked.positions, output_hidden=True)
    s_logits, s_hidden = student(masked.input_ids, attention, masked.positions, output_hidden=True)
    assert kd_loss_sum(s_logits, t_logits, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert hidden_loss_sum(s_hidden, t_hidden, attention).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_under_bf16_autocast(kind):
    head = MaskedLMHead(build(kind).eval())
    masked, attention = batch()
    with torch.inference_mode():
        reference, _ = head(masked.input_ids, attention, masked.positions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = head(masked.input_ids, attention, masked.positions)
            loss = mlm_loss_sum(logits, masked.targets)
    assert logits.shape == reference.shape
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
