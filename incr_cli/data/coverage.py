"""How much of a text the tokenizer can represent: unknown tokens and characters mapped to nothing.

Text a tokenizer does not cover (Chinese into an English WordPiece vocabulary, say) becomes
``[UNK]`` tokens, or is dropped by its normaliser without a trace. Training on it teaches nothing
and its perplexity means nothing, so ingest measures both shares per increment, records them in the
manifest, warns above ``data.unknown_warn`` and refuses above ``data.unknown_max``.

Counted over the documents' own tokens (no [CLS]/[SEP]/padding):
- ``unknown_share``: tokens that are the tokenizer's unknown token / all tokens;
- ``dropped_share``: non-space characters that no token's offsets cover / all non-space characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from incr_cli.errors import InputError, clip
from incr_cli.progress import Reporter

EXAMPLE_CONTEXT = 20  # characters shown either side of the first unknown token


@dataclass
class Coverage:
    """Running counts over the batches of one increment (see the module docstring)."""

    unk_id: int | None
    tokens: int = 0
    unknown: int = 0
    chars: int = 0
    dropped: int = 0
    example: str | None = None

    def add(self, texts: list[str], ids: list[list[int]], offsets: list[list[tuple[int, int]] | None]) -> None:
        """One tokenizer batch: ``texts`` and, per text, its token ids and (start, end) character offsets;
        None offsets for a text known to lose no character (``packing.tokenize_for_coverage``: printable
        ASCII without an unknown token, for a tokenizer that drops none of it)."""
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        n = int(lengths.sum())
        self.tokens += n
        if self.unk_id is not None and n:
            flat = np.fromiter(chain.from_iterable(ids), np.int64, n)
            is_unk = flat == self.unk_id
            self.unknown += int(is_unk.sum())
            if self.example is None and is_unk.any():
                self.example = _example(texts, offsets, lengths, int(np.argmax(is_unk)))
        self.chars += _nonspace(texts)
        spanned = [i for i, spans in enumerate(offsets) if spans is not None]
        if spanned:
            some_texts, some_offsets = [texts[i] for i in spanned], [offsets[i] for i in spanned]
            self.dropped += _uncovered(some_texts, some_offsets, sum(map(len, some_offsets)))

    @property
    def unknown_share(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    @property
    def dropped_share(self) -> float:
        return self.dropped / self.chars if self.chars else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "unknown_tokens": self.unknown, "unknown_share": round(self.unknown_share, 6),
                "chars": self.chars, "dropped_chars": self.dropped, "dropped_share": round(self.dropped_share, 6),
                "example": self.example}


def _nonspace(texts: list[str]) -> int:
    return sum(len(t) - t.count(" ") for t in texts)  # cleaned text: the only whitespace is " "


def _uncovered(texts: list[str], offsets: list[list[tuple[int, int]]], n_spans: int) -> int:
    """Non-space characters of ``texts`` inside no token's (start, end) span, over the whole batch at once."""
    joined = " ".join(texts)  # the joining spaces are never counted
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])  # (D,) where each text begins in ``joined``
    spans = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), np.int64, 2 * n_spans).reshape(-1, 2)
    shift = np.repeat(starts, [len(o) for o in offsets])  # (M,)
    edges = np.zeros(len(joined) + 1, np.int64)
    np.add.at(edges, spans[:, 0] + shift, 1)
    np.add.at(edges, spans[:, 1] + shift, -1)
    covered = np.cumsum(edges)[:-1] > 0  # (C,)
    codes = np.frombuffer(joined.encode("utf-32-le"), np.uint32)  # one code point per character
    return int((~covered & (codes != ord(" "))).sum())


def _example(texts: list[str], offsets: list[list[tuple[int, int]]], lengths: np.ndarray, flat_index: int) -> str:
    """The text around the token at ``flat_index`` of the batch (documents' tokens laid end to end)."""
    doc = int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))
    start, end = offsets[doc][flat_index - int(lengths[:doc].sum())]
    text = texts[doc]
    return text[max(0, start - EXAMPLE_CONTEXT): end + EXAMPLE_CONTEXT]


def check_coverage(coverage: Coverage, increment: str, *, warn_above: float, refuse_above: float,
                   allow_unknown: bool, reporter: Reporter) -> None:
    """Refuse (InputError, exit 2) or warn about an increment the tokenizer cannot represent.

    An increment with no token besides unknown ones is refused even with ``allow_unknown``: nothing
    in it can be a training target.
    """
    share = max(coverage.unknown_share, coverage.dropped_share)
    what = (f"{coverage.unknown_share:.1%} of its tokens are unknown ([UNK])" if coverage.unknown_share >= coverage.dropped_share
            else f"{coverage.dropped_share:.1%} of its characters map to no token")
    example = f' (e.g. "{clip(coverage.example)}")' if coverage.example else ""  # one [UNK] can span a long word
    if coverage.tokens and coverage.unknown == coverage.tokens:
        raise InputError(f"{increment}: every token is unknown ([UNK]) to the workspace tokenizer{example}, so nothing "
                         "can be learned from it; use a base whose vocabulary covers this text")
    if share > refuse_above and not allow_unknown:
        raise InputError(f"{increment}: {what} for the workspace tokenizer{example}; above data.unknown_max="
                         f"{refuse_above:g}: use a base whose vocabulary covers this text, or pass --allow-unknown")
    if share > warn_above:
        reporter.warn(f"{increment}: {what} for the workspace tokenizer{example}; they are never masking targets "
                      "and perplexity leaves them out, but the model learns nothing from that text")
