"""Tiny random models of every encoder family incr supports, from a config and a small tokenizer.

No download: WordPiece families use the shipped tiny vocabulary; byte-level BPE (RoBERTa) and
SentencePiece-style Unigram (XLM-R, CamemBERT, ALBERT, DeBERTa-v2) tokenizers are trained here,
in a fraction of a second, on the shipped fortunes sample.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "deberta-v2", "electra", "albert",
            "mpnet", "camembert"]
WORDPIECE = {"bert", "distilbert", "electra", "mpnet", "modernbert"}
BPE = {"roberta"}  # the rest are Unigram with "▁" word starts, like SentencePiece
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _training_text() -> list[str]:
    return (REPO / "samples" / "fortunes.txt").read_text(encoding="utf-8").splitlines()[:400]


@cache
def tokenizer_json(kind: str) -> str:
    """A small trained tokenizer (as tokenizer.json text) of style "bpe" or "unigram"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, unk_token="<unk>",
                                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.train_from_iterator(_training_text(), trainer)
    return tok.to_str()


def tokenizer_for(family: str) -> Any:
    """A fast tokenizer with the family's special tokens ([CLS]/[SEP] or <s>/</s>, a mask and an unk)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from incr_cli.model.weights import scratch_tokenizer

    if family in WORDPIECE:
        return scratch_tokenizer()
    backend = Tokenizer.from_str(tokenizer_json("bpe" if family in BPE else "unigram"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def model_for(family: str, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A tiny random *ForMaskedLM of ``family`` sized to ``tokenizer``."""
    import transformers as tf

    v, pad = len(tokenizer), tokenizer.pad_token_id
    common = dict(vocab_size=v, pad_token_id=pad, max_position_embeddings=160, **TINY)
    builders = {
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**common)),
        "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**{**common, "max_position_embeddings": 162})),
        "xlm-roberta": lambda: tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(**{**common, "max_position_embeddings": 162})),
        "camembert": lambda: tf.CamembertForMaskedLM(tf.CamembertConfig(**{**common, "max_position_embeddings": 162})),
        "distilbert": lambda: tf.DistilBertForMaskedLM(tf.DistilBertConfig(
            vocab_size=v, pad_token_id=pad, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=160)),
        "modernbert": lambda: tf.ModernBertForMaskedLM(tf.ModernBertConfig(
            vocab_size=v, pad_token_id=pad, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=160, global_attn_every_n_layers=2, local_attention=16,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)),
        "deberta-v2": lambda: tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
            **common, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
            position_biased_input=False)),
        "electra": lambda: tf.ElectraForMaskedLM(tf.ElectraConfig(**common, embedding_size=16)),
        "albert": lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(**common, embedding_size=16)),
        "mpnet": lambda: tf.MPNetForMaskedLM(tf.MPNetConfig(**{**common, "max_position_embeddings": 162})),
    }
    torch.manual_seed(seed)
    return builders[family]()


def write_family_dir(folder: Path, family: str, seed: int = 0) -> Path:
    """A local Hugging Face-layout folder (safetensors weights + tokenizer) of a tiny ``family`` model."""
    tokenizer = tokenizer_for(family)
    model = model_for(family, tokenizer, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
