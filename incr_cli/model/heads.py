"""The masked-only MLM head: run the encoder, then project to the vocabulary only where it counts.

With 15% of positions masked and a 30k vocabulary, the full head's (B, T, V) projection is most of
the head cost and a large activation that autograd keeps; projecting only the N masked hidden
states gives the same logits there. Known heads are split explicitly:

- BERT: ``model.bert`` (built without a pooler by BertForMaskedLM) then ``model.cls``;
- RoBERTa, XLM-R, CamemBERT: ``model.roberta`` then ``model.lm_head``;
- DistilBERT: ``model.distilbert`` then vocab_transform, activation, vocab_layer_norm, vocab_projector;
- ModernBERT: ``model.model`` then ``model.head`` and ``model.decoder``;
- DeBERTa-v2/v3: ``model.deberta`` then ``model.cls`` (legacy) or ``model.lm_predictions``;
- ELECTRA (the generator): ``model.electra`` then generator_predictions and generator_lm_head;
- ALBERT: ``model.albert`` then ``model.predictions``; MPNet: ``model.mpnet`` then ``model.lm_head``.

Any other AutoModelForMaskedLM runs whole (``kind == "full"``) and its logits are gathered, which is
slower but equally correct. The split is chosen by exact class name, so a subclass that changes
its forward never gets a split that would silently differ from it.

The same reasoning reaches into the last encoder layer of BERT and RoBERTa: its output is only
read at the masked positions, so there it computes keys and values for every token (the masked
queries attend to all of them) but queries, attention, output projection and feed-forward only for
the N masked rows. That is about 1/L of the encoder's work, x0.85 at a 15% masking rate, and it
is exact: the same module weights and functions, in the same order, at the rows that are used.
When the last hidden state is asked for (``output_hidden``) the layer runs whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn


def _deberta_v2_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if model.legacy:  # the config decides which of the two heads DebertaV2ForMaskedLM built
        return model.cls(hidden)
    return model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings)


# Exact class name -> (kind, the encoder's attribute). Each head below is what the class's own
# forward applies to the encoder's last hidden state, so at the masked rows it gives the same logits.
_SPLITS: dict[str, tuple[str, str]] = {
    "BertForMaskedLM": ("bert", "bert"),
    "RobertaForMaskedLM": ("roberta", "roberta"),
    "XLMRobertaForMaskedLM": ("roberta", "roberta"),
    "CamembertForMaskedLM": ("roberta", "roberta"),
    "DistilBertForMaskedLM": ("distilbert", "distilbert"),
    "ModernBertForMaskedLM": ("modernbert", "model"),
    "DebertaV2ForMaskedLM": ("deberta-v2", "deberta"),
    "ElectraForMaskedLM": ("electra", "electra"),  # the generator (ELECTRA's masked-LM half)
    "AlbertForMaskedLM": ("albert", "albert"),
    "MPNetForMaskedLM": ("mpnet", "mpnet"),
}
_HEADS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "bert": lambda m, h: m.cls(h),
    "roberta": lambda m, h: m.lm_head(h),
    "distilbert": lambda m, h: m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
    "modernbert": lambda m, h: m.decoder(m.head(h)),
    "deberta-v2": _deberta_v2_head,
    "electra": lambda m, h: m.generator_lm_head(m.generator_predictions(h)),
    "albert": lambda m, h: m.predictions(h),
    "mpnet": lambda m, h: m.lm_head(h),
}


# The last-layer split relies on transformers 5's layer interface (a layer returns its hidden state).
_LAYER_SPLIT_OK = int(transformers.__version__.split(".")[0]) >= 5


def head_kind(model: nn.Module) -> str:
    """-> a kind of ``_HEADS`` ("bert", "roberta", "modernbert", ...) or "full": how MaskedLMHead runs ``model``."""
    return _SPLITS.get(type(model).__name__, ("full", ""))[0]


def split_families() -> dict[str, str]:
    """Model class -> head kind, for the README's table and the log."""
    return {name: kind for name, (kind, _) in _SPLITS.items()}


class MaskedLMHead(nn.Module):
    """Wraps an AutoModelForMaskedLM (``.model``); ``.kind`` says which split is used.

    An nn.Module holding the model as a submodule, so DDP, ``.to()``, ``.train()``/``.eval()`` and
    ``state_dict`` (keys prefixed "model.") work on it as on the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = head_kind(model)
        self.masked_last_layer = _LAYER_SPLIT_OK and self.kind in ("bert", "roberta") and _plain_encoder(model)
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

        encoder = getattr(model, _SPLITS[type(model).__name__][1])
        hidden = None
        if self.masked_last_layer and not output_hidden and not torch.compiler.is_compiling() and positions.any():
            picked = _encode_masked_rows(encoder, input_ids, attention_mask, positions)  # (N, H)
        else:
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
            picked = hidden[positions]  # (N, H)
        logits = _HEADS[self.kind](model, picked)  # (N, V)
        return logits, (hidden if output_hidden else None)


def _plain_encoder(model: nn.Module) -> bool:
    """True when the last encoder layer is a plain bidirectional BERT-style layer (no cross-attention,
    no chunked feed-forward) with the submodules ``_masked_rows_of_layer`` uses."""
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "chunk_size_feed_forward", 0):
        return False
    layers = getattr(getattr(getattr(model, model.base_model_prefix, None), "encoder", None), "layer", None)
    if not layers:
        return False
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return all(hasattr(attention, a) for a in ("query", "key", "value", "dropout", "scaling", "num_attention_heads",
                                               "attention_head_size", "config")) \
        and all(hasattr(layer, a) for a in ("intermediate", "output")) and hasattr(layer.attention, "output")


def _encode_masked_rows(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state at ``positions`` only -> (N, H), row-major like ``hidden[positions]``.

    Runs the encoder with its last layer standing aside (its forward replaced, for this call only,
    by one that records the layer's input and attention mask), then that layer on the masked rows.
    """
    layer = encoder.encoder.layer[-1]
    seen: dict[str, torch.Tensor | None] = {}

    def record(hidden_states, attention_mask=None, *args, **kwargs):
        seen["hidden"], seen["mask"] = hidden_states, attention_mask
        return hidden_states

    own = layer.__dict__.get("forward")
    layer.forward = record
    try:
        encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    finally:
        if own is None:
            del layer.forward
        else:
            layer.forward = own
    return _masked_rows_of_layer(layer, seen["hidden"], seen["mask"], positions)


def _masked_rows_of_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                          positions: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at ``positions`` only. hidden (B, T, H) is the layer's input, mask what
    the encoder passes its layers (None or (B, 1 | heads, 1 | T, T)), positions (B, T) bool -> (N, H).

    Queries are packed per row into (B, Q, H), Q the most masked positions in a row, so attention
    runs batched through the model's own attention function; padding rows are dropped after it.
    """
    attention = layer.attention.self
    batch, length, width = hidden.shape
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    counts = positions.sum(dim=1)  # (B,)
    q_len = int(counts.max())
    # Masked columns first, in their order (a stable sort), then the rest: (B, Q) column of each query.
    columns = torch.argsort((~positions).to(torch.int8), dim=1, stable=True)[:, :q_len]
    valid = torch.arange(q_len, device=hidden.device) < counts[:, None]  # (B, Q)

    rows = hidden[positions]  # (N, H) the residual stream at the masked positions
    query = attention.query(rows)  # (N, H)
    packed = query.new_zeros((batch, q_len, query.shape[-1]))
    packed[valid] = query
    query = packed.view(batch, q_len, heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
    key = attention.key(hidden).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
    value = attention.value(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    if mask is not None and mask.dim() == 4 and mask.shape[-2] == length:  # one row per query position
        index = columns[:, None, :, None].expand(batch, mask.shape[1], q_len, length)
        mask = mask.expand(batch, mask.shape[1], length, length).gather(2, index)  # (B, 1 | heads, Q, T)

    dropout = attention.dropout.p if attention.training else 0.0
    impl = attention.config._attn_implementation
    if impl in (None, "eager"):
        context = _eager_attention(query, key, value, mask, attention.scaling, dropout)
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        context, _ = ALL_ATTENTION_FUNCTIONS[impl](attention, query, key, value, mask, dropout=dropout,
                                                  scaling=attention.scaling)
    context = context.reshape(batch, q_len, width)[valid]  # (N, H); attention functions return (B, Q, heads, d)
    attended = layer.attention.output(context, rows)  # dense, dropout, LayerNorm(+ residual)
    return layer.output(layer.intermediate(attended), attended)  # (N, H)


def _eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, dropout: float) -> torch.Tensor:
    """transformers' eager attention: (B, heads, Q, d) x (B, heads, T, d) -> (B, Q, heads, d)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        weights = weights + mask
    weights = nn.functional.dropout(nn.functional.softmax(weights, dim=-1), p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()
