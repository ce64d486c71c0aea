"""The last encoder layer run at the masked rows only gives the whole layer's logits and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from incr_cli.model.heads import MaskedLMHead
from incr_cli.training.losses import kd_loss_sum, mlm_loss_sum

VOCAB = 99


def build(kind: str, attn: str):
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(**sizes))
    else:
        model = RobertaForMaskedLM(RobertaConfig(pad_token_id=0, max_position_embeddings=64, **sizes))
    model.config._attn_implementation = attn
    return model


def batch(pad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    attention = torch.ones_like(ids, dtype=torch.bool)
    if pad:
        attention[1, 10:] = False
        attention[3, 5:] = False
        ids[~attention] = 0
    positions = (torch.rand(ids.shape, generator=g) < 0.3) & attention
    positions[0] = False  # a row without masked positions
    positions[2, 7] = True
    return ids, attention, positions


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_masked_rows_match_the_whole_layer(kind, attn, pad):
    model = no_dropout(build(kind, attn)).train()
    head = MaskedLMHead(model)
    assert head.masked_last_layer
    ids, attention, positions = batch(pad)
    targets = ids[positions]

    def run(split: bool):
        head.masked_last_layer = split
        model.zero_grad()
        logits, hidden = head(ids, attention, positions)
        assert hidden is None
        loss = mlm_loss_sum(logits, targets)
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shapes = []
    feed_forward = model.base_model.encoder.layer[-1].intermediate.dense
    hook = feed_forward.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    split_logits, split_grads = run(True)
    whole_logits, whole_grads = run(False)
    hook.remove()
    assert shapes == [(int(positions.sum()), 32), (*ids.shape, 32)]  # the feed-forward ran on N rows, then on all
    torch.testing.assert_close(split_logits, whole_logits, atol=1e-5, rtol=1e-4)
    assert split_grads.keys() == whole_grads.keys()
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_teacher_under_inference_mode_and_the_layer_is_restored():
    model = build("bert", "sdpa").eval()
    head = MaskedLMHead(model)
    ids, attention, positions = batch(True, seed=1)
    layer = model.bert.encoder.layer[-1]
    with torch.inference_mode():
        split, _ = head(ids, attention, positions)
        head.masked_last_layer = False
        whole, _ = head(ids, attention, positions)
    assert "forward" not in layer.__dict__  # the stand-in forward is gone again
    assert kd_loss_sum(split, whole, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_dropout_in_training_still_trains_every_parameter_the_whole_layer_does():
    model = build("bert", "sdpa").train()  # dropout on: outputs differ from the whole layer, shapes do not
    head = MaskedLMHead(model)
    ids, attention, positions = batch(False)
    logits, _ = head(ids, attention, positions)
    mlm_loss_sum(logits, ids[positions]).backward()
    assert logits.shape == (int(positions.sum()), VOCAB)
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" not in n)


def test_hidden_asked_for_runs_the_whole_layer():
    model = build("bert", "sdpa").eval()
    head = MaskedLMHead(model)
    ids, attention, positions = batch(False)
    with torch.inference_mode():
        logits, hidden = head(ids, attention, positions, output_hidden=True)
        full = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    torch.testing.assert_close(logits, full.logits[positions])
