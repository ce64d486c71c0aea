"""Ingest: cleaning, packing, dedup, held-out split, every bad input, idempotence, memory, kill -9."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from incr_cli.config.recipe import Recipe, build_recipe
from incr_cli.data import readers
from incr_cli.data.clean import clean_text
from incr_cli.data.dedup import HeldOutCutoff, doc_hash, hash_unit
from incr_cli.data.ingest import IngestOptions, ingest
from incr_cli.data.packing import PackedWriter, tokenize_batch
from incr_cli.errors import InputError, UsageError
from incr_cli.model.weights import load_tokenizer
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the quick brown fox jumps over a lazy dog while emma reads her letters and harriet walks "
         "into the garden with mr knightley who speaks of frank churchill").split()


def make_docs(n: int, tag: str = "doc", words: int = 12) -> list[str]:
    """n distinct documents (a tag and a number make each one unique)."""
    return [f"{tag} {i} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words)) for i in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe_with(base: Recipe, **data: object) -> Recipe:
    """The cpu-tiny recipe with some data.* keys changed."""
    from incr_cli.config.recipe import recipe_to_dict

    d = recipe_to_dict(base)
    d["data"].update(data)
    return build_recipe(d)


def shards(ws: Workspace, inc: str) -> tuple[np.ndarray, np.ndarray, dict]:
    m = ws.verify_increment(inc)
    out = []
    for split in ("train", "heldout"):
        n = m["sequences"][split]
        out.append(np.fromfile(ws.increment_dir(inc) / f"{split}.bin", dtype=m["dtype"]).reshape(n, m["seq_len"]))
    return out[0], out[1], m


def unpack(rows: np.ndarray, m: dict) -> list[tuple[int, ...]]:
    """Documents (token ids) back from packed rows, checking the layout on the way."""
    if len(rows) == 0:
        return []
    assert (rows[:, 0] == m["cls_id"]).all()
    assert not (rows[:-1] == m["pad_id"]).any(), "only the last row may hold padding"
    stream = rows[:, 1:].reshape(-1)
    stream = stream[stream != m["pad_id"]]
    assert stream[-1] == m["sep_id"]
    docs, start = [], 0
    for end in np.flatnonzero(stream == m["sep_id"]):
        docs.append(tuple(int(t) for t in stream[start:end]))
        start = end + 1
    return docs


def fresh_workspace(template: Path, root: Path) -> Workspace:
    """A copy of the session's scratch:tiny workspace (like the tiny_workspace fixture) at ``root``."""
    return Workspace(template).copy_to(root)


def index_rows(ws: Workspace) -> dict[str, int]:
    with sqlite3.connect(ws.index_path) as conn:
        return dict(conn.execute("SELECT increment, COUNT(*) FROM documents GROUP BY increment").fetchall())


# ----------------------------------------------------------------------------- pure pieces


def test_clean_text_normalises_and_collapses() -> None:
    assert clean_text("  Cafe\u0301 \t\n  au\u00a0lait\x00\x07 \ufeff ") == "Caf\u00e9 au lait"
    assert clean_text("plain ascii   text") == "plain ascii text"
    assert clean_text("\x01\x02") == ""


def test_hash_unit_in_unit_interval() -> None:
    units = [hash_unit(doc_hash(t)) for t in make_docs(200)]
    assert all(0.0 <= u < 1.0 for u in units)
    assert hash_unit(doc_hash("a")) == hash_unit(doc_hash("a"))


@pytest.mark.parametrize("seed", range(6))
def test_streamed_cutoff_equals_the_kth_smallest_of_all_units(seed: int) -> None:
    """HeldOutCutoff keeps min_docs units, not all of them, and gives the cutoff of the whole array."""
    rng = np.random.default_rng(seed)
    units = rng.random(int(rng.integers(0, 400)))
    if seed % 2:
        units = np.round(units, 2)  # ties
    for fraction, min_docs in [(0.0, 8), (0.01, 8), (0.05, 0), (0.005, 30), (0.2, 3)]:
        n = len(units)
        if min_docs <= 0 or n < 2 * min_docs or (units < fraction).sum() >= min_docs:
            want = fraction
        else:
            want = float(np.nextafter(np.partition(units, min_docs - 1)[min_docs - 1], 1.0))
        streamed = HeldOutCutoff(fraction, min_docs)
        for u in units:
            streamed.add(float(u))
        assert streamed.cutoff() == want and len(streamed._smallest) <= min_docs


def test_batch_docs_bounds_memory_not_the_increment(tiny_recipe: Recipe, tmp_path: Path,
                                                     _tiny_workspace_template: Path) -> None:
    """data.batch_docs changes how many documents ingest holds at a time, never what it writes."""
    lines = make_docs(120) + make_docs(40)[::3]
    src = write_lines(tmp_path / "in.txt", lines)
    written = []
    for batch in (1000, 7, 1):
        ws = Workspace(_tiny_workspace_template).copy_to(tmp_path / f"ws{batch}")
        res = ingest(ws, [str(src)], recipe=replace(tiny_recipe, data=replace(tiny_recipe.data, batch_docs=batch)))
        folder = ws.increment_dir(res.increment)
        written.append({name: (folder / name).read_bytes() for name in ("train.bin", "heldout.bin", "doc_hashes.bin")})
    assert written[0] == written[1] == written[2]


def test_tokenized_while_reading_or_after_the_increment_is_the_same(tiny_recipe: Recipe, tmp_path: Path,
                                                                     _tiny_workspace_template: Path) -> None:
    """Pass 1 tokenizes as it reads (a token spool) unless whole-word masking or vocabulary growth need
    the texts after it (a text spool): both write the same files and count the same documents."""
    lines = make_docs(150) + ["\u0300\u0301", "caf\u00e9 \u2603 \u00bd", "\u0301"] + make_docs(20, tag="late")
    src = write_lines(tmp_path / "in.txt", lines)
    written, counts = [], []
    for whole_word in (False, True):  # English text: no segmenter either way, only the spool differs
        ws = Workspace(_tiny_workspace_template).copy_to(tmp_path / f"ws{whole_word}")
        recipe = replace(tiny_recipe, masking=replace(tiny_recipe.masking, whole_word=whole_word),
                         data=replace(tiny_recipe.data, batch_docs=16))
        res = ingest(ws, [str(src)], recipe=recipe)
        folder = ws.increment_dir(res.increment)
        assert not list(folder.glob(".spool*"))  # the spool never stays
        written.append({name: (folder / name).read_bytes() for name in ("train.bin", "heldout.bin", "doc_hashes.bin")})
        m = ws.increment_manifest(res.increment)
        counts.append((m["documents"], m["tokens"], m["sequences"], m["unknown"]))
    assert written[0] == written[1]
    assert counts[0] == counts[1] and counts[0][0]["rejected"].get("no_tokens", 0) >= 1


def heldout_cutoff(units: np.ndarray, fraction: float, min_docs: int) -> float:
    """``HeldOutCutoff`` of all ``units`` at once."""
    c = HeldOutCutoff(fraction, min_docs)
    for unit in units.tolist():
        c.add(unit)
    return c.cutoff()


def test_heldout_cutoff_raises_to_min_docs_only_when_big_enough() -> None:
    units = np.linspace(0.01, 0.99, 100)
    assert heldout_cutoff(units, 0.05, 0) == 0.05
    c = heldout_cutoff(units, 0.0, 8)
    assert (units < c).sum() == 8
    assert heldout_cutoff(units[:15], 0.0, 8) == 0.0  # fewer than 2 * min docs: the fraction alone
    assert heldout_cutoff(units, 0.5, 8) == 0.5


@pytest.mark.parametrize("lengths", [[3, 5, 1, 9, 2, 7], [7], [6, 6], [20, 0, 4]])
def test_packed_writer_layout(tmp_path: Path, lengths: list[int]) -> None:
    seq_len, cls_id, sep_id, pad_id = 8, 2, 3, 0
    docs = [[10 + 5 * d + k for k in range(n)] for d, n in enumerate(lengths)]
    w = PackedWriter(tmp_path / "x.bin", seq_len, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, dtype="uint16")
    w.add(docs[:2])
    w.add([])
    w.add(docs[2:])
    w.close()
    rows = np.fromfile(tmp_path / "x.bin", dtype=np.uint16).reshape(-1, seq_len)
    stream_len = sum(lengths) + len(lengths)
    assert w.rows == len(rows) == -(-stream_len // (seq_len - 1))
    assert w.tokens == stream_len + len(rows)  # every non-pad token: stream + one [CLS] per row
    assert (rows != pad_id).sum() == w.tokens
    m = {"cls_id": cls_id, "sep_id": sep_id, "pad_id": pad_id}
    assert unpack(rows, m) == [tuple(d) for d in docs]
    if stream_len % (seq_len - 1) == 0:
        assert not (rows == pad_id).any()  # an exact fit wastes nothing


def test_tokenize_batch_keeps_special_token_text_as_text(tiny_workspace: Workspace) -> None:
    tok = load_tokenizer(tiny_workspace, "v0000")
    ids = tokenize_batch(tok, ["hello [SEP] world [PAD]"])[0]
    assert tok.sep_token_id not in ids and tok.pad_token_id not in ids


# ----------------------------------------------------------------------------- dedup and split


def test_cross_ingest_dedup(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    ws = tiny_workspace
    docs = make_docs(150)
    first = ingest(ws, [str(write_lines(tmp_path / "a.txt", docs[:100]))], recipe=tiny_recipe)
    second = ingest(ws, [str(write_lines(tmp_path / "b.txt", docs[50:]))], recipe=tiny_recipe)
    assert first.increment == "d0001-a" and second.increment == "d0002-b"
    assert first.documents["kept"] == 100
    assert second.documents["kept"] == 50 and second.documents["duplicate"] == 50
    assert second.duplicates_in == {"d0001-a": 50}
    assert index_rows(ws) == {"d0001-a": 100, "d0002-b": 50}
    m = ws.verify_increment("d0002-b")
    assert m["documents"]["duplicate"] == 50 and m["sources"][0]["bytes"] == (tmp_path / "b.txt").stat().st_size


def test_within_ingest_dedup_across_batches(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    recipe = replace(tiny_recipe, data=replace(tiny_recipe.data, batch_docs=7))  # duplicates in this and later batches
    docs = make_docs(30)
    lines = docs + docs[::2] + ["  " + docs[1].replace(" ", "   ") + "  "]  # whitespace variants are duplicates
    res = ingest(tiny_workspace, [str(write_lines(tmp_path / "a.txt", lines))], recipe=recipe)
    assert res.documents["kept"] == 30 and res.documents["duplicate"] == 16
    assert res.duplicates_in == {}
    train, heldout, m = shards(tiny_workspace, res.increment)
    assert len(unpack(train, m)) + len(unpack(heldout, m)) == 30


def test_heldout_split_is_deterministic_and_never_in_train(tmp_path: Path, tiny_recipe: Recipe,
                                                          _tiny_workspace_template: Path) -> None:
    docs = make_docs(400, tag="marker")
    src = write_lines(tmp_path / "in.txt", docs)
    results = []
    for k in range(2):
        ws = fresh_workspace(_tiny_workspace_template, tmp_path / f"ws{k}")
        res = ingest(ws, [str(src)], recipe=tiny_recipe)
        results.append((ws, res))
    (ws0, r0), (ws1, r1) = results
    t0, h0, m0 = shards(ws0, r0.increment)
    t1, h1, m1 = shards(ws1, r1.increment)
    assert np.array_equal(t0, t1) and np.array_equal(h0, h1)
    assert m0["files"] == m1["files"]
    # every document is in exactly the split its hash says, in input order
    tok = load_tokenizer(ws0, "v0000")
    ids = [tuple(x) for x in tokenize_batch(tok, docs)]
    held = [hash_unit(doc_hash(clean_text(d))) < m0["heldout_cutoff"] for d in docs]
    assert 0 < sum(held) < len(docs) and sum(held) == m0["documents"]["heldout"]
    assert unpack(h0, m0) == [x for x, h in zip(ids, held) if h]
    assert unpack(t0, m0) == [x for x, h in zip(ids, held) if not h]


def test_heldout_min_docs_on_a_small_increment(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    recipe = recipe_with(tiny_recipe, heldout_fraction=0.0, heldout_min_docs=5)
    res = ingest(tiny_workspace, [str(write_lines(tmp_path / "a.txt", make_docs(12)))], recipe=recipe)
    assert res.documents["heldout"] == 5 and res.documents["train"] == 7
    res = ingest(tiny_workspace, [str(write_lines(tmp_path / "b.txt", make_docs(9, tag="small")))], recipe=recipe)
    assert res.documents["heldout"] == 0  # fewer than 2 * min docs: nothing is forced out


def test_reingest_is_a_noop(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    ws = tiny_workspace
    src = write_lines(tmp_path / "a.txt", make_docs(40))
    assert ingest(ws, [str(src)], recipe=tiny_recipe).increment == "d0001-a"
    again = ingest(ws, [str(src)], recipe=tiny_recipe)
    assert again.increment is None and again.message.startswith("nothing new") and "d0001-a" in again.message
    copy = write_lines(tmp_path / "copy" / "renamed.txt", make_docs(40) + [""])  # other bytes, same documents
    again = ingest(ws, [str(copy)], recipe=tiny_recipe)
    assert again.increment is None
    assert again.message == "nothing new: all 40 documents are already in d0001-a"
    assert ws.increments() == ["d0001-a"] and index_rows(ws) == {"d0001-a": 40}
    assert not list(ws.staging.glob("tmp-*"))


def test_lost_index_is_rebuilt_from_the_increments(tiny_workspace: Workspace, tiny_recipe: Recipe,
                                                  tmp_path: Path) -> None:
    ws = tiny_workspace
    docs = make_docs(80)
    ingest(ws, [str(write_lines(tmp_path / "a.txt", docs[:50]))], recipe=tiny_recipe)
    for path in ws.data.glob("index.sqlite*"):
        path.unlink()
    res = ingest(ws, [str(write_lines(tmp_path / "b.txt", docs[30:]))], recipe=tiny_recipe)
    assert res.documents["kept"] == 30 and res.duplicates_in == {"d0001-a": 20}
    assert index_rows(ws) == {"d0001-a": 50, "d0002-b": 30}


def test_unreadable_index_is_an_integrity_error(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    from incr_cli.errors import IntegrityError

    tiny_workspace.data.mkdir(exist_ok=True)
    tiny_workspace.index_path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(IntegrityError, match="index.sqlite.*move it away"):
        ingest(tiny_workspace, [str(write_lines(tmp_path / "a.txt", make_docs(5)))], recipe=tiny_recipe)


def test_gz_inputs_read_like_plain(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    docs = make_docs(30)
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(docs[:15]) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[15:]))
    res = ingest(tiny_workspace, [str(tmp_path / "*.gz")], recipe=tiny_recipe)
    assert res.increment == f"d0001-{tmp_path.name}" and res.documents["kept"] == 30  # named after the folder
    assert [s["reader"] for s in res.sources] == ["lines", "jsonl:text"]
    plain = write_lines(tmp_path / "plain" / "all.txt", docs)
    assert ingest(tiny_workspace, [str(plain)], recipe=tiny_recipe).documents["duplicate"] == 30


def test_truncated_gz_keeps_what_was_read(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    docs = make_docs(3000, words=30)
    data = gzip.compress(("\n".join(docs) + "\n").encode(), compresslevel=1)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    res = ingest(tiny_workspace, [str(tmp_path / "cut.txt.gz")], recipe=tiny_recipe)
    assert 0 < res.documents["kept"] < 3000
    assert res.skipped["corrupt"]["count"] == 1 and len(res.sources) == 1


def test_paragraphs_format(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    text = "first para line one\nline two\n\n\n  second paragraph  \n\nthird\nwith\nthree lines\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    res = ingest(tiny_workspace, [str(tmp_path / "p.txt")], recipe=tiny_recipe, options=IngestOptions(fmt="paragraphs"))
    assert res.documents["kept"] == 3
    train, heldout, m = shards(tiny_workspace, res.increment)
    tok = load_tokenizer(tiny_workspace, "v0000")
    want = {tuple(x) for x in tokenize_batch(tok, ["first para line one line two", "second paragraph",
                                                  "third with three lines"])}
    assert set(unpack(train, m)) | set(unpack(heldout, m)) == want


# ----------------------------------------------------------------------------- bad input


def test_invalid_utf8_mid_file_keeps_good_lines(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    docs = make_docs(20)
    data = "\n".join(docs[:10]).encode() + b"\nbad \xff\xfe bytes here\n" + "\n".join(docs[10:]).encode() + b"\n"
    (tmp_path / "mixed.txt").write_bytes(data)
    res = ingest(tiny_workspace, [str(tmp_path / "mixed.txt")], recipe=tiny_recipe)
    assert res.documents["kept"] == 20 and res.documents["rejected"] == {"invalid_utf8": 1}
    assert tiny_workspace.increment_manifest(res.increment)["documents"]["rejected"] == {"invalid_utf8": 1}


def test_binary_empty_missing_fifo_unreadable_files(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_lines(tmp_path / "in" / "good.txt", make_docs(10))
    (tmp_path / "in" / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" + os.urandom(5000))
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    os.mkfifo(tmp_path / "in" / "pipe")  # opening it would block forever
    locked = write_lines(tmp_path / "in" / "locked.txt", make_docs(5, tag="secret"))
    real_open = readers.open_binary

    def deny(path: str):  # root reads a chmod 000 file anyway, so refuse it here
        if os.path.basename(path) == "locked.txt":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(readers, "open_binary", deny)
    res = ingest(tiny_workspace, [str(tmp_path / "in"), str(tmp_path / "nope.txt")], recipe=tiny_recipe)
    assert res.increment == "d0001-in" and res.documents["kept"] == 10
    counts = {reason: info["count"] for reason, info in res.skipped.items()}
    assert counts == {"binary": 1, "empty": 1, "not_a_file": 1, "unreadable": 1, "missing": 1}
    assert res.skipped["missing"]["examples"] == [str(tmp_path / "nope.txt")]
    assert [s["path"] for s in res.sources] == [str(good)]
    assert tiny_workspace.increment_manifest(res.increment)["skipped"]["binary"]["count"] == 1
    assert locked.exists()


def test_huge_single_line_is_cut(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    recipe = recipe_with(tiny_recipe, max_doc_chars=1000)
    big = "é" + "word " * 400_000  # 2 MB on one line, a 2-byte character first
    (tmp_path / "big.txt").write_text("short doc one\n" + big + "\nshort doc two\n", encoding="utf-8")
    res = ingest(tiny_workspace, [str(tmp_path / "big.txt")], recipe=recipe)
    assert res.documents["kept"] == 3 and res.documents["cut_long"] == 1
    train, heldout, m = shards(tiny_workspace, res.increment)
    lengths = sorted(len(d) for d in unpack(train, m) + unpack(heldout, m))
    assert lengths[-1] <= 1000  # wordpieces of at most 1000 characters


def test_malformed_jsonl_lines_are_counted(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    docs = make_docs(6)
    lines = [json.dumps({"body": d}) for d in docs] + ["{not json", "[1, 2]", json.dumps({"text": "x"}),
                                                       json.dumps({"body": 42}), ""]
    (tmp_path / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"body": "bad \xff"}\n')
    res = ingest(tiny_workspace, [str(tmp_path / "a.jsonl")], recipe=tiny_recipe, options=IngestOptions(text_field="body"))
    assert res.documents["kept"] == 6
    assert res.documents["rejected"] == {"malformed_json": 1, "not_an_object": 1, "missing_field": 2, "invalid_utf8": 1}


def test_too_short_documents_are_rejected(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    recipe = recipe_with(tiny_recipe, min_doc_chars=20)
    res = ingest(tiny_workspace, [str(write_lines(tmp_path / "a.txt", make_docs(5) + ["tiny", "  ", "ok?"]))],
                 recipe=recipe)
    assert res.documents["kept"] == 5 and res.documents["rejected"] == {"too_short": 2}


def test_directory_of_2000_small_files_and_a_symlink_loop(tiny_workspace: Workspace, tiny_recipe: Recipe,
                                                          tmp_path: Path) -> None:
    top = tmp_path / "many"
    docs = make_docs(2000)
    for i, d in enumerate(docs):
        sub = top / f"part{i % 10:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04d}.txt").write_text(d + "\n", encoding="utf-8")
    os.symlink(top, top / "part00" / "back-to-top")  # a folder loop
    os.symlink("self", top / "self")  # a link to itself
    (top / ".hidden").write_text("not read\n", encoding="utf-8")
    res = ingest(tiny_workspace, [str(top)], recipe=tiny_recipe)
    assert res.documents["kept"] == 2000 and len(res.sources) == 2000
    counts = {reason: info["count"] for reason, info in res.skipped.items()}
    assert counts == {"symlink_loop": 1, "hidden": 1}
    # the order is by sorted path: the same on every machine
    assert [s["path"] for s in res.sources] == sorted(s["path"] for s in res.sources)


def test_nothing_readable_is_an_input_error(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="nothing readable.*missing.txt"):
        ingest(tiny_workspace, [str(tmp_path / "missing.txt")], recipe=tiny_recipe)
    with pytest.raises(InputError, match=r"blob.bin \(binary\)"):
        ingest(tiny_workspace, [str(tmp_path / "blob.bin")], recipe=tiny_recipe)
    assert tiny_workspace.increments() == [] and not list(tiny_workspace.staging.glob("tmp-*"))


def test_only_empty_or_blank_input_writes_nothing(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n", encoding="utf-8")
    res = ingest(tiny_workspace, [str(tmp_path / "e.txt"), str(tmp_path / "blank.txt")], recipe=tiny_recipe)
    assert res.increment is None and res.message.startswith("nothing to ingest")
    assert tiny_workspace.increments() == []


def test_bad_name_and_format_are_usage_errors(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path: Path) -> None:
    src = str(write_lines(tmp_path / "a.txt", make_docs(3)))
    with pytest.raises(UsageError, match="increment name"):
        ingest(tiny_workspace, [src], recipe=tiny_recipe, options=IngestOptions(name="../evil"))
    with pytest.raises(UsageError, match="--format"):
        ingest(tiny_workspace, [src], recipe=tiny_recipe, options=IngestOptions(fmt="xml"))


def test_default_name() -> None:
    assert readers.default_name("/x/My Corpus.v2.jsonl.gz") == "My-Corpus.v2"
    assert readers.default_name("data/news/*.txt") == "news"
    assert readers.default_name("/") == "data"
    assert readers.default_name("corpora/") == "corpora"


# ----------------------------------------------------------------------------- memory and crashes

_SCRIPT = textwrap.dedent("""
    import os, resource, sys, json
    import psutil
    from incr_cli.data.ingest import IngestOptions, ingest
    from incr_cli.config.recipe import load_recipe
    from incr_cli.store.workspace import Workspace
    ws = Workspace.open(sys.argv[1])
    recipe = load_recipe(ws.recipe_path, sys.argv[3:])
    from incr_cli.model.weights import load_tokenizer
    tok = load_tokenizer(ws, "v0000")
    before = psutil.Process().memory_info().rss
    try:  # reset the kernel's peak-RSS mark so the peak below is the ingest's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    res = ingest(ws, [sys.argv[2]], recipe=recipe, tokenizer=tok)
    try:
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "increment": res.increment, "docs": res.documents}))
""")


def _run_script(ws: Workspace, path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(ws.root), str(path), *overrides],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def _generate(path: Path, mb: float, *, unique_every: int) -> None:
    """About ``mb`` MB of lines; one in ``unique_every`` is new, the rest repeat (dedup drops them)."""
    docs = make_docs(2000, words=20)
    size, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            block = "".join(f"{j} {docs[j % 2000]}\n" if j % unique_every == 0 else docs[j % 2000] + "\n"
                            for j in range(i, i + 10_000))
            f.write(block)
            size += len(block)
            i += 10_000


def test_memory_stays_bounded_on_a_large_input(tiny_workspace: Workspace, tmp_path: Path) -> None:
    """30 MB, mostly repeats (so tokenizing stays quick) plus one 8 MB line: RSS grows by far less."""
    path = tmp_path / "big.txt"
    _generate(path, 30, unique_every=40)
    with open(path, "a", encoding="utf-8") as f:
        f.write("x" * 8_000_000 + "\n")
    proc = _run_script(tiny_workspace, path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["increment"] and report["docs"]["kept"] > 5_000 and report["docs"]["cut_long"] == 1
    assert report["peak"] < 1 << 30
    assert report["peak"] - report["before"] < 100 << 20, report  # the ingest itself adds ~25 MB here


@pytest.mark.slow
def test_memory_stays_bounded_when_everything_is_new(tiny_workspace: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    _generate(path, 30, unique_every=1)
    proc = _run_script(tiny_workspace, path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["docs"]["kept"] > 200_000
    assert report["peak"] < 1 << 30 and report["peak"] - report["before"] < 100 << 20, report


@pytest.mark.parametrize("fault", ["ingest.batch@2:kill", "ingest.before_rename:kill"])
def test_kill_9_midway_then_rerun_equals_uninterrupted(tmp_path: Path, tiny_recipe: Recipe, fault: str,
                                                       _tiny_workspace_template: Path) -> None:
    src = write_lines(tmp_path / "in.txt", make_docs(2600))
    ref = fresh_workspace(_tiny_workspace_template, tmp_path / "ref")
    ws = fresh_workspace(_tiny_workspace_template, tmp_path / "ws")
    ingest(ref, [str(write_lines(tmp_path / "old.txt", make_docs(50, tag="old")))], recipe=tiny_recipe)
    ingest(ws, [str(tmp_path / "old.txt")], recipe=tiny_recipe)
    expected = ingest(ref, [str(src)], recipe=tiny_recipe)

    proc = _run_script(ws, src, env={"INCR_FAULT": fault})
    assert proc.returncode == -9, proc.stderr
    assert ws.increments() == ["d0001-old"]  # no partial increment
    rows = index_rows(ws)
    assert rows.get("d0001-old") == 50
    if fault.startswith("ingest.before_rename"):
        assert rows.get("d0002-in") == expected.documents["kept"]  # committed, folder never renamed in
    else:
        assert "d0002-in" not in rows  # the transaction was never committed

    again = ingest(ws, [str(src)], recipe=tiny_recipe)
    assert again.increment == expected.increment == "d0002-in"
    assert again.documents == expected.documents
    a, b = ws.verify_increment("d0002-in"), ref.verify_increment("d0002-in")
    assert a["files"] == b["files"]  # byte-identical shards
    assert index_rows(ws) == index_rows(ref)
    assert not list(ws.staging.glob("tmp-*"))


def test_tokenizing_through_the_backend_gives_the_wrappers_ids_and_spans_and_restores_it():
    from incr_cli.data.packing import tokenize_with_offsets
    from incr_cli.model.weights import scratch_tokenizer

    tok = scratch_tokenizer()
    texts = make_docs(40) + ["a [MASK] in the text [SEP] and [CLS]", "café naïve 中文 🙂", "", "   "]
    tok.backend_tokenizer.enable_truncation(8)  # a setting of the caller's, to be left as it was
    ids, spans = tokenize_with_offsets(tok, texts)
    assert tok.backend_tokenizer.truncation["max_length"] == 8 and not tok.backend_tokenizer.encode_special_tokens
    tok.backend_tokenizer.no_truncation()
    want = tok(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    assert ids == want["input_ids"] and [list(map(tuple, s)) for s in spans] == [list(map(tuple, s))
                                                                              for s in want["offset_mapping"]]
    assert tok.mask_token_id not in ids[40]  # "[MASK]" written in a document is text, not the mask token


def test_plain_text_skips_the_spans_only_where_no_character_can_be_lost():
    """Printable-ASCII texts are encoded without spans (faster) when the tokenizer drops no printable
    ASCII: the same ids, and the same coverage counts as spans for every text give."""
    from tokenizers import normalizers

    from incr_cli.data.coverage import Coverage
    from incr_cli.data.packing import covers_printable_ascii, tokenize_for_coverage, tokenize_with_offsets
    from incr_cli.model.weights import scratch_tokenizer

    tok = scratch_tokenizer()
    texts = make_docs(30) + ["plain ascii ~~~ with a zzqxj word", "caf\u00e9 \u2603 \u0301", "tab\there", "", "x"]
    assert covers_printable_ascii(tok)
    ids, spans = tokenize_for_coverage(tok, texts, plain_covered=True, unk_id=tok.unk_token_id)
    exact_ids, exact_spans = tokenize_with_offsets(tok, texts)
    assert ids == exact_ids
    plain = [t.isascii() and t.isprintable() and tok.unk_token_id not in i for t, i in zip(texts, ids)]
    assert [s is None for s in spans] == plain and any(plain) and not all(plain)
    fast, exact = Coverage(tok.unk_token_id), Coverage(tok.unk_token_id)
    fast.add(texts, ids, spans)
    exact.add(texts, exact_ids, exact_spans)
    assert fast.to_dict() == exact.to_dict() and exact.dropped > 0  # the lone accent is dropped
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("~", ""), normalizers.Lowercase()])
    assert not covers_printable_ascii(tok)  # then every text gets its spans
    assert all(s is not None for s in tokenize_for_coverage(tok, texts, plain_covered=False, unk_id=None)[1])
