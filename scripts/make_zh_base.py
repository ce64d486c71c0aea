"""Write a tiny random Chinese-capable BERT base (Hugging Face layout) for a Chinese line: no download.

Its vocabulary is the shipped English WordPiece vocabulary of ``scratch:tiny`` plus every character
of the given Chinese text, so mixed Chinese-English text tokenizes without [UNK] (BERT tokenizers
split CJK text into single characters, as Chinese BERT does). Run from the repository root:

    .venv/bin/python scripts/make_zh_base.py OUT [--text samples/chinese.txt]
    incr init WS --base OUT
"""

from __future__ import annotations

import argparse
import inspect
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def zh_vocab(text: str) -> list[str]:
    """The scratch vocabulary, then each new non-space character of ``text`` (in first-seen order)."""
    base = (ROOT / "incr_cli" / "assets" / "tiny-vocab.txt").read_text(encoding="utf-8").splitlines()
    known = set(base)
    extra = []
    for ch in unicodedata.normalize("NFC", text).lower():
        if not ch.isspace() and unicodedata.category(ch)[0] != "C" and ch not in known:
            known.add(ch)
            extra.append(ch)
    return base + extra


def write_zh_base(out: Path, text: str, seed: int = 0) -> Path:
    """A tiny BertForMaskedLM (hidden 64, 2 layers) and its tokenizer in ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = zh_vocab(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    options = {"do_lower_case": True, "tokenize_chinese_chars": True}
    # transformers 5 takes the vocabulary itself; 4.x takes the file path.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, **options)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), **options)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--text", type=Path, default=ROOT / "samples" / "chinese.txt")
    args = parser.parse_args()
    write_zh_base(args.out, args.text.read_text(encoding="utf-8"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
