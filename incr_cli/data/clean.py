"""Cleaning documents: control characters out, whitespace normalised, and the reading of sources into
cleaned documents (``readers`` does the formats)."""

from __future__ import annotations

import re
import unicodedata

from incr_cli.config.recipe import Recipe
from incr_cli.data import readers
from incr_cli.data.readers import ReadState, Tally

# C0/C1 control characters and BOM / zero-width characters; tab, newline etc. become spaces later.
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b\ufeff]")


# ----------------------------------------------------------------------------- cleaning and hashing


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, collapse every run of whitespace to one space."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if _CONTROL_RE.search(text):
        text = _CONTROL_RE.sub("", text)
    return " ".join(text.split())


def clean_documents(spec: str, *, fmt: str, text_field: str, recipe: Recipe) -> tuple[list[str], Tally]:
    """The documents of one path (file, folder or glob), read and cleaned as ingest reads them, in
    ingest's order (files sorted, documents in file order), without dedup or a held-out split.

    Documents shorter than ``data.min_doc_chars`` after cleaning are dropped; longer than
    ``data.max_doc_chars`` are cut. -> (documents, tally of skipped files and rejected documents)."""
    max_chars, min_chars = recipe.data.max_doc_chars, recipe.data.min_doc_chars
    tally = Tally()
    docs = []
    for src in readers.expand_paths([spec], tally):
        for raw, _cut in readers.read_documents(src, fmt, text_field, max_chars, tally, ReadState()):
            text = clean_text(raw)[:max_chars].rstrip()
            if len(text) >= min_chars:
                docs.append(text)
    return docs, tally
