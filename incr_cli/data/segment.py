"""Word boundaries for whole-word masking of Chinese text, from a real segmenter (jieba).

BERT tokenizers split CJK text into single characters, so the vocabulary's "##" markers make every
character a word and whole-word masking masks single characters. Chinese BERT-wwm and Hugging
Face's run_mlm_wwm take the word boundaries from a segmenter instead; so does incr. The segmenter
runs once, at ingest, and its result is stored beside the token shards (``train.words.bin``,
``heldout.words.bin``: one uint8 per token position, 1 where the token continues the word of the
token before it), so training reads one more small array and pays nothing else.

Only CJK characters are joined: a token continues a word when it starts with a CJK character that
lies in the same jieba word as the previous token's first character. Everything else (English in
mixed text included) keeps the tokenizer's own word boundaries. Japanese is not segmented (jieba is
a Chinese segmenter): its kana and kanji stay single-character words.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from incr_cli.errors import UsageError

# CJK Unified Ideographs (+ extension A, compatibility ideographs, extensions B-F in plane 2).
_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
WORDS_SUFFIX = ".words.bin"


def has_cjk(text: str) -> bool:
    return _CJK_RE.search(text) is not None


def _is_cjk(codes: np.ndarray) -> np.ndarray:
    """codes (n,) uint32 code points -> (n,) bool."""
    return (((codes >= 0x3400) & (codes <= 0x4DBF)) | ((codes >= 0x4E00) & (codes <= 0x9FFF))
            | ((codes >= 0xF900) & (codes <= 0xFAFF)) | ((codes >= 0x20000) & (codes <= 0x2FFFF)))


class ChineseWords:
    """jieba, loaded once; ``continues`` marks the tokens that continue a Chinese word."""

    def __init__(self) -> None:
        try:
            import jieba
        except ImportError:
            raise UsageError("masking.whole_word with Chinese text needs the jieba segmenter: "
                             "pip install 'incr-cli[zh]' (or set masking.whole_word=false)") from None
        jieba.setLogLevel(60)  # its "Building prefix dict" lines on stderr
        self._jieba = jieba
        self.name = f"jieba {getattr(jieba, '__version__', '?')}"

    def continues(self, text: str, offsets: list[tuple[int, int]]) -> list[int]:
        """One 0/1 per token (its (start, end) character span in ``text``): 1 where it continues a word."""
        n = len(offsets)
        if n < 2 or not has_cjk(text):
            return [0] * n
        word_of = np.zeros(len(text) + 1, np.int64)  # (C,) jieba word index of each character
        for i, (_, start, end) in enumerate(self._jieba.tokenize(text)):
            word_of[start:end] = i
        starts = np.fromiter((s for s, _ in offsets), np.int64, n).clip(0, max(len(text) - 1, 0))  # (n,)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)[starts]
        same_word = np.zeros(n, bool)
        same_word[1:] = word_of[starts[1:]] == word_of[starts[:-1]]
        return (same_word & _is_cjk(codes)).astype(np.uint8).tolist()


def segmenter_for(recipe: Any, sample: list[str]) -> ChineseWords | None:
    """The segmenter ingest should run: only with ``masking.whole_word`` and Chinese in ``sample``."""
    if not recipe.masking.whole_word or not any(has_cjk(t) for t in sample):
        return None
    return ChineseWords()
