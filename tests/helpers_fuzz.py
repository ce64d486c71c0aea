"""Hypothesis settings, input strategies and oracles for the fuzz suite (tests/faults/test_fuzz.py).

The oracles restate the documented reading rules in the plainest way (split the whole input on "\\n",
decode each line strictly), so the streaming readers, with their bounded buffers, gzip and line
cuts, are checked against something obviously right.

Profiles: by default every test is derandomized (a fixed seed derived from the test) with a small
example budget, so `make test` is fast and reproducible. ``INCR_FUZZ=long`` multiplies each budget
by 50 (``INCR_FUZZ_SCALE=N`` by N) and draws fresh random examples on every run, printing a
reproduction blob when one fails.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from incr_cli.data import readers
from incr_cli.data.readers import MAX_JSON_DEPTH

LONG = os.environ.get("INCR_FUZZ", "") == "long"
SCALE = int(os.environ.get("INCR_FUZZ_SCALE", "50" if LONG else "1"))

# What any message may be: every echoed value is cut to 200 characters (errors.MAX_SHOWN_CHARS),
# so a line holds a few of them plus a temporary path; a recipe error lists at most 20 problems.
MAX_MESSAGE_LINE = 1200
MAX_MESSAGE_LINES = 25


def fuzz(examples: int) -> settings:
    """Settings for one property: ``examples`` in the default run, SCALE times that in the long one."""
    return settings(max_examples=examples * SCALE, derandomize=not LONG, deadline=None, database=None,
                    print_blob=LONG, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.large_base_example,
                                                            HealthCheck.function_scoped_fixture])


def assert_bounded(message: str) -> None:
    """A message (an error, a warning, a --json problem) that cannot flood a terminal or a log."""
    lines = message.splitlines()
    assert len(lines) <= MAX_MESSAGE_LINES, f"{len(lines)} lines: {message[:500]}"
    for line in lines:
        assert len(line) <= MAX_MESSAGE_LINE, f"a line of {len(line):,} characters: {line[:300]}"
    assert "Traceback" not in message, message[-2000:]


# ----------------------------------------------------------------------------- inputs

# Any Unicode text a file could hold (no lone surrogates: they have no UTF-8 form), with control
# characters, NUL, "\r", "\u2028" and friends included.
TEXT = st.text(st.characters(codec="utf-8"), max_size=60)
# Byte sequences that are not UTF-8 or are otherwise awkward.
ODD_BYTES = st.sampled_from([b"\xff", b"caf\xe9", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                             b"\x00", b"\r", b"\xef\xbb\xbf", b"\x0b\x0c", b"\xc2\x85", b"\xe2\x80\xa8"])
# readers.MAX_JSON_LINE_BYTES during the jsonl fuzz (64 MiB in use): longer lines are "too_long". Above
# the longest nested record below, so depth and length are told apart.
JSON_LINE_LIMIT = 150_000
ENDINGS = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r", b""])


def line_bytes(max_huge: int = 20_000) -> st.SearchStrategy[bytes]:
    """One line's content: valid text, arbitrary bytes, odd bytes mixed in, or a huge value."""
    return st.one_of(
        TEXT.map(lambda t: t.encode("utf-8")),
        st.binary(max_size=40),
        st.lists(st.one_of(ODD_BYTES, TEXT.map(str.encode)), max_size=6).map(b"".join),
        st.integers(1, max_huge).map(lambda n: b"w" * n),
    )


@st.composite
def text_file(draw: st.DrawFn, max_huge: int = 20_000) -> bytes:
    """The bytes of a text file: lines of ``line_bytes`` joined by mixed line endings; NUL bytes
    (which make a file binary) only in some files, so most examples get past the binary sniff."""
    parts = draw(st.lists(st.tuples(line_bytes(max_huge), ENDINGS), max_size=15))
    data = b"".join(line + end for line, end in parts)
    return not_gzip(data if draw(st.booleans()) else data.replace(b"\x00", b"\x01"))


def not_gzip(data: bytes) -> bytes:
    """``data`` with a newline first if it starts like gzip: the readers take such a file for gzip
    (and a broken one: ``corrupt``), which the oracles below do not model; test_fuzz pins it once."""
    return b"\n" + data if data.startswith(b"\x1f\x8b") else data


@dataclass(frozen=True)
class Record:
    """One JSON Lines record: its bytes and what the reader must do with it (the text, or a reason)."""

    raw: bytes
    text: str | None = None
    reason: str | None = None


def _nested(depth: int) -> Record:
    """``{"text": "deep", "d": [[...]]}``: ``depth`` (>= 2) levels in all, the object included."""
    n = depth - 1
    raw = b'{"text": "deep", "d": ' + b"[" * n + b"]" * n + b"}"
    return Record(raw, reason="too_deep") if depth > MAX_JSON_DEPTH else Record(raw, text="deep")


def _json(text: str, ascii_only: bool, extra: dict) -> Record:
    return Record(json.dumps({**extra, "text": text}, ensure_ascii=ascii_only).encode("utf-8"), text=text)


RECORDS = st.one_of(
    st.builds(_json, TEXT, st.booleans(), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)),
    TEXT.map(lambda t: Record(b"\xef\xbb\xbf" + json.dumps({"text": t}).encode(), text=t)),  # a BOM (cat of files)
    st.integers(2, MAX_JSON_DEPTH + 5).map(_nested),  # around the limit
    st.integers(MAX_JSON_DEPTH + 1, 60_000).map(_nested),  # far past Python's recursion limit
    st.sampled_from([b"{not json", b'{"text": "a"', b"[1, 2", b"{'text': 'a'}", b'{"text": "a"}}', b'{"text": "a\x01"}',
                     b'{"text": "a\x00b"}', b"\x01", b'{"text": NaN']).map(lambda b: Record(b, reason="malformed_json")),
    st.sampled_from([b"[1, 2]", b"3", b'"text"', b"null"]).map(lambda b: Record(b, reason="not_an_object")),
    st.sampled_from([b'{"text": 5}', b'{"body": "x"}', b'{"text": ["a"]}',
                     b'{"text": null}']).map(lambda b: Record(b, reason="missing_field")),
    st.sampled_from([b'{"text": "caf\xe9"}', b'{"text": "\\ud800"}', b'{"text": "a\\udfff b"}', b"\xff{}",
                     b'{"text": "\xed\xa0\x80"}']).map(lambda b: Record(b, reason="invalid_utf8")),
    st.integers(JSON_LINE_LIMIT - 20, JSON_LINE_LIMIT + 20).map(lambda n: Record(b'{"text": "' + b"x" * n + b'"}',
                                                                                 text="x" * n)),
)
BLANK = st.sampled_from([b"", b"  ", b"\t", b"\r"])


@st.composite
def jsonl_file(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, Record]]]:
    """(file bytes, [(line number, record)]): records and blank lines, "\\n" or "\\r\\n" endings."""
    data, records, line = b"", [], 0
    for item in draw(st.lists(st.one_of(RECORDS, BLANK), max_size=20)):
        line += 1
        end = draw(st.sampled_from([b"\n", b"\r\n"]))
        if isinstance(item, Record):
            if len(item.raw + end) > JSON_LINE_LIMIT:  # whatever it holds: it is never parsed
                item = Record(item.raw, reason="too_long")
            records.append((line, item))
            data += item.raw + end
        else:
            data += item + end
    return data, records


# ----------------------------------------------------------------------------- oracles


def split_lines(data: bytes) -> list[bytes]:
    """Lines as the readers see them: ended by "\\n" only (kept), the last one possibly unended."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def decode_line(line: bytes, limit: int) -> tuple[str | None, bool]:
    """(text, cut) of one line under the byte ``limit``: a longer line keeps its first ``limit``
    bytes less a partial last character; None when it is not UTF-8."""
    cut = len(line) > limit
    head = line[:limit] if cut else line
    for trim in range(4 if cut else 1):
        try:
            return head[: len(head) - trim].decode("utf-8"), cut
        except UnicodeDecodeError:
            continue
    return None, cut


@dataclass
class Expected:
    """What reading one file must give: documents in order, rejected documents' line numbers, or a skip."""

    docs: list[str] = field(default_factory=list)
    rejected: dict[str, list[int]] = field(default_factory=dict)
    skipped: str | None = None


def file_skip(data: bytes) -> str | None:
    if not data:
        return "empty"
    return "binary" if b"\x00" in data[: readers.BINARY_SNIFF_BYTES] else None


def expect_lines(data: bytes, max_doc_chars: int, *, sniff: bool = True) -> Expected:
    out = Expected(skipped=file_skip(data) if sniff else None)
    if out.skipped:
        return out
    for no, line in enumerate(split_lines(data), 1):
        text, _ = decode_line(line, 4 * max_doc_chars + 4)
        if text is None:
            out.rejected.setdefault("invalid_utf8", []).append(no)
        elif not text.isspace():
            out.docs.append(text)
    return out


def expect_paragraphs(data: bytes) -> Expected:
    """Paragraphs (no line in these inputs is long enough to be cut): runs of non-blank lines."""
    out = Expected(skipped=file_skip(data))
    if out.skipped:
        return out
    paragraph: list[tuple[int, bytes]] = []
    for no, line in [*enumerate(split_lines(data), 1), (0, b"")]:
        if line.strip():
            paragraph.append((no, line))
            continue
        if paragraph:
            texts = [decode_line(raw, 1 << 30)[0] for _, raw in paragraph]
            if None in texts:
                out.rejected.setdefault("invalid_utf8", []).append(paragraph[0][0])
            else:
                out.docs.append("\n".join(texts))  # type: ignore[arg-type]
        paragraph = []
    return out


def expect_jsonl(data: bytes, records: list[tuple[int, Record]]) -> Expected:
    out = Expected(skipped=file_skip(data))
    if out.skipped:
        return out
    for no, rec in records:
        if rec.reason:
            out.rejected.setdefault(rec.reason, []).append(no)
        else:
            out.docs.append(rec.text)  # type: ignore[arg-type]
    return out


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)
