"""Build ``incr_cli/assets/tiny-vocab.txt``: the WordPiece vocabulary of the ``scratch:*`` presets.

Trains a lowercase WordPiece model with ``tokenizers`` on the shipped English ``samples/*.txt``, so the
from-scratch presets work offline and cover the text the tests and demos use. Deterministic: the
same samples give the same file. Run from the repository root:

    .venv/bin/python scripts/make_tiny_vocab.py [--size 3000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_vocab(files: list[Path], size: int) -> list[str]:
    """WordPiece tokens: the specials, then the rest in a fixed order.

    The trainer's token *set* is deterministic but its id order is not (ties are broken by hash-map
    order), so the ids are re-assigned: specials, words, then "##" pieces, each sorted. WordPiece
    matching is longest-match-first, so the ids do not change how text is split.
    """
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    # The same normalisation BertTokenizerFast(do_lower_case=True) applies, so the vocab matches it.
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=size, special_tokens=SPECIAL, min_frequency=2,
                               continuing_subword_prefix="##", show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    vocab = tokenizer.get_vocab()
    rest = sorted(set(vocab) - set(SPECIAL), key=lambda t: (t.startswith("##"), t))
    return SPECIAL + rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3000, help="vocabulary size (default 3000)")
    parser.add_argument("--out", type=Path, default=ROOT / "incr_cli" / "assets" / "tiny-vocab.txt")
    args = parser.parse_args()
    # The English samples: the vocabulary they gave stays the same now that a Chinese one ships too.
    files = sorted(f for f in (ROOT / "samples").glob("*.txt") if f.name != "chinese.txt")
    if not files:
        raise SystemExit(f"no samples/*.txt under {ROOT}")
    tokens = train_vocab(files, args.size)
    assert tokens[: len(SPECIAL)] == SPECIAL, tokens[:8]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens to {args.out}")


if __name__ == "__main__":
    main()
