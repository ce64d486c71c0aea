"""Fill-mask predictions from workspace versions, side by side (a quick look at what a version learned)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from incr_cli.errors import UsageError, shown
from incr_cli.model.weights import load_version
from incr_cli.store.workspace import Workspace


@dataclass(frozen=True)
class Prediction:
    token: str
    score: float


def fill_mask(ws: Workspace, versions: list[str], texts: list[str], *, top_k: int = 5,
              mask: str = "[MASK]") -> dict[str, list[list[Prediction]]]:
    """For each version, the top-k tokens at the first mask of each text.

    ``mask`` in a text is replaced by the tokenizer's own mask token, so the same texts work for
    BERT ([MASK]) and RoBERTa (<mask>) lines. Returns {version: [[Prediction] * top_k] * len(texts)}.
    """
    results: dict[str, list[list[Prediction]]] = {}
    for version in versions:
        model, tokenizer = load_version(ws, version)
        texts_v = [t.replace(mask, tokenizer.mask_token) for t in texts]
        for text in texts_v:
            if tokenizer.mask_token not in text:
                raise UsageError(f"text {shown(text)} has no {mask}; put {mask} where a word should be predicted")
        enc = tokenizer(texts_v, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            logits = model(**enc).logits  # (B, T, V)
        first_mask = (enc["input_ids"] == tokenizer.mask_token_id).int().argmax(dim=1)  # (B,)
        probs = logits[torch.arange(len(texts_v)), first_mask].float().softmax(-1)  # (B, V)
        top = probs.topk(top_k, dim=-1)
        results[version] = [
            [Prediction(tokenizer.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(top.values, top.indices)
        ]
    return results
