"""The masked-only MLM head: run the encoder, then project to the vocabulary only where it counts.

With 15% of positions masked and a 30k vocabulary, the full head's (B, T, V) projection is most of
the head cost and a large activation that autograd keeps; projecting only the N masked hidden
states gives the same logits there. Known heads are split explicitly:

- BERT: ``model.bert`` (built without a pooler by BertForMaskedLM) then ``model.cls``;
- RoBERTa, XLM-R, CamemBERT: ``model.roberta`` then ``model.lm_head``;
- DistilBERT: ``model.distilbert`` then vocab_transform, activation, vocab_layer_norm, vocab_projector.

Any other AutoModelForMaskedLM runs whole (``kind == "full"``) and its logits are gathered, which is
slower but equally correct. The split is chosen by exact class name, so a subclass that changes
its forward never gets a split that would silently differ from it.
"""

from __future__ import annotations

import torch
from torch import nn

_KINDS: dict[str, str] = {
    "BertForMaskedLM": "bert",
    "RobertaForMaskedLM": "roberta",
    "XLMRobertaForMaskedLM": "roberta",
    "CamembertForMaskedLM": "roberta",
    "DistilBertForMaskedLM": "distilbert",
}


def head_kind(model: nn.Module) -> str:
    """-> "bert" | "roberta" | "distilbert" | "full": how MaskedLMHead will run ``model``."""
    return _KINDS.get(type(model).__name__, "full")


class MaskedLMHead(nn.Module):
    """Wraps an AutoModelForMaskedLM (``.model``); ``.kind`` says which split is used.

    An nn.Module holding the model as a submodule, so DDP, ``.to()``, ``.train()``/``.eval()`` and
    ``state_dict`` (keys prefixed "model.") work on it as on the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = head_kind(model)
        self.train(model.training)  # report the wrapped model's mode, so inference() restores it right

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                output_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) long, attention_mask (B, T), positions (B, T) bool ->
        (logits (N, V) at ``positions`` in row-major order, last hidden state (B, T, H) when
        ``output_hidden`` else None)."""
        model = self.model
        if self.kind == "full":
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=output_hidden, return_dict=True)
            hidden = out.hidden_states[-1] if output_hidden else None
            return out.logits[positions], hidden  # (N, V)

        encoder = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert"}[self.kind]
        hidden = getattr(model, encoder)(input_ids=input_ids, attention_mask=attention_mask,
                                         return_dict=True).last_hidden_state  # (B, T, H)
        picked = hidden[positions]  # (N, H)
        if self.kind == "bert":
            logits = model.cls(picked)
        elif self.kind == "roberta":
            logits = model.lm_head(picked)
        else:
            h = model.vocab_layer_norm(model.activation(model.vocab_transform(picked)))
            logits = model.vocab_projector(h)
        return logits, (hidden if output_hidden else None)  # (N, V)
