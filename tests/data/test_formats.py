"""Input formats beside lines and JSON Lines: CSV and TSV with a header, bzip2 and xz, and the
mistakes that must not pass silently (a CSV read as lines, a URL, a missing column)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import os
from pathlib import Path

import pytest

from incr_cli.config.recipe import Recipe
from incr_cli.data import readers
from incr_cli.data.ingest import IngestOptions, ingest
from incr_cli.errors import InputError
from incr_cli.store.workspace import Workspace

ROWS = [{"id": str(i), "text": f"Row {i} holds \"quotes\", commas, and\na newline inside its field ({i * 7})."}
        for i in range(40)]


def read_all(path: Path, fmt: str = "auto", text_field: str = "text", max_doc_chars: int = 10_000):
    tally = readers.Tally()
    docs = [text for src in readers.expand_paths([str(path)], tally)
            for text, _cut in readers.read_documents(src, fmt, text_field, max_doc_chars, tally, readers.ReadState())]
    return docs, tally


def write_csv(path: Path, rows: list[dict[str, str]], *, delimiter: str = ",", bom: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("bom", [False, True])
def test_auto_reads_a_csv_column_not_its_lines(tmp_path, bom):
    docs, tally = read_all(write_csv(tmp_path / "data.csv", ROWS, bom=bom))
    assert docs == [r["text"] for r in ROWS]  # no header, no id column, quoted newlines kept
    assert not tally.docs and not tally.warnings


def test_tsv_by_name_and_csv_by_flag(tmp_path):
    tsv = write_csv(tmp_path / "data.tab", [{"body": r["text"], "id": r["id"]} for r in ROWS], delimiter="\t")
    assert read_all(tsv, text_field="body")[0] == [r["text"] for r in ROWS]
    odd = write_csv(tmp_path / "export.dat", ROWS)
    assert read_all(odd, fmt="csv")[0] == [r["text"] for r in ROWS]


def test_a_missing_column_rejects_every_row_and_names_the_columns(tmp_path):
    docs, tally = read_all(write_csv(tmp_path / "d.csv", [{"id": "1", "body": "b"}, {"id": "2", "body": "c"}]))
    assert docs == [] and tally.docs == {"missing_field": 2}
    assert set(tally.fields_seen) == {"id", "body"}


def test_bad_rows_are_counted_and_reading_goes_on(tmp_path):
    good = [f"good row number {i}" for i in range(3)]
    body = ("id,text\n" f"1,{good[0]}\n" f"2,\"{'x' * 300}\"\n" f"3,{good[1]}\n").encode()
    body += b"4,not utf-8 \xff here\n" + f"5,\"{good[2]}\"\n6\n".encode()
    (tmp_path / "bad.csv").write_bytes(body)
    docs, tally = read_all(tmp_path / "bad.csv", max_doc_chars=50)  # a field of 300 > 4 * 50 characters
    assert docs == good
    assert tally.docs == {"too_long": 1, "invalid_utf8": 1, "missing_field": 1}
    assert tally.doc_examples["invalid_utf8"] == [f"{tmp_path / 'bad.csv'}:5"]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_compression_is_recognised_by_content(tmp_path, compress):
    lines = [f"compressed line {i} of plain text" for i in range(20)]
    (tmp_path / "data.txt.z").write_bytes(compress(("\n".join(lines) + "\n").encode()))
    assert read_all(tmp_path / "data.txt.z")[0] == [line + "\n" for line in lines]  # raw lines: cleaning comes later
    plain = write_csv(tmp_path / "rows.csv", ROWS)
    (tmp_path / "rows.csv.z").write_bytes(compress(plain.read_bytes()))
    os.rename(tmp_path / "rows.csv.z", tmp_path / "rows.csv.xz")  # auto goes by the name under the suffix
    assert read_all(tmp_path / "rows.csv.xz")[0] == [r["text"] for r in ROWS]


def test_a_broken_xz_is_corrupt_and_keeps_nothing_false(tmp_path):
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(b"one line\n" * 1000)[:40])
    docs, tally = read_all(tmp_path / "a.txt.xz")
    assert tally.files == {"corrupt": 1} and all(d == "one line\n" for d in docs)


def test_lines_that_start_like_a_header_warn(tmp_path):
    (tmp_path / "a.txt").write_text("id,text\n1,hello there\n", encoding="utf-8")
    docs, tally = read_all(tmp_path / "a.txt")
    assert docs == ["id,text\n", "1,hello there\n"]  # read as asked...
    assert len(tally.warnings) == 1 and "--format csv" in tally.warnings[0]  # ...and said
    (tmp_path / "b.txt").write_text("id\ttext\n1\thello\n", encoding="utf-8")
    assert "--format tsv" in read_all(tmp_path / "b.txt")[1].warnings[0]
    (tmp_path / "prose.txt").write_text("Call me Ishmael, said he.\nYes,no\n", encoding="utf-8")
    assert read_all(tmp_path / "prose.txt")[1].warnings == []  # a sentence with a comma is no header


def test_ingest_records_the_format_and_field_of_each_source(tiny_workspace: Workspace, tiny_recipe: Recipe,
                                                           tmp_path: Path) -> None:
    res = ingest(tiny_workspace, [str(write_csv(tmp_path / "data.csv", ROWS))], recipe=tiny_recipe)
    assert res.documents["kept"] == len(ROWS)
    (source,) = tiny_workspace.increment_manifest(res.increment)["sources"]
    assert source["format"] == "csv" and source["text_field"] == "text" and source["reader"] == "csv:text"
    again = ingest(tiny_workspace, [str(tmp_path / "data.csv")], recipe=tiny_recipe, options=IngestOptions(fmt="lines"))
    assert again.increment is not None and again.warnings  # the same file read as lines is new input, and warned


def test_ingest_names_the_columns_when_the_text_column_is_missing(tiny_workspace, tiny_recipe, tmp_path):
    path = write_csv(tmp_path / "d.tsv", [{"id": r["id"], "body": r["text"]} for r in ROWS], delimiter="\t")
    with pytest.raises(InputError, match="fields are (id, body|body, id): choose one with --text-field"):
        ingest(tiny_workspace, [str(path)], recipe=tiny_recipe)
    assert tiny_workspace.increments() == []


def test_a_url_is_refused_before_anything_is_read(tiny_workspace, tiny_recipe):
    with pytest.raises(InputError, match="is a URL: .*download it first"):
        ingest(tiny_workspace, ["https://example.com/corpus.jsonl"], recipe=tiny_recipe)


def test_zstd_is_recognised_by_content(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    lines = [f"zstd line {i} of text" for i in range(50)]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(f'{{"text": "{line}"}}\n' for line in lines).encode()))
    assert read_all(tmp_path / "a.jsonl.zst")[0] == lines  # jsonl by the name under .zst, zstd by content


def _table(n: int, *, nulls: int = 0):
    pa = pytest.importorskip("pyarrow")
    texts = [f"columnar row {i} of the corpus" for i in range(n - nulls)] + [None] * nulls
    return pa.table({"id": list(range(n)), "text": texts})


def test_parquet_is_read_column_wise_in_batches(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table = _table(10_000, nulls=3)
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=1000)
    docs, tally = read_all(tmp_path / "big.parquet")
    assert docs == table.column("text").to_pylist()[:-3] and tally.docs == {"missing_field": 3}
    pq.write_table(table, tmp_path / "no-suffix")
    assert readers.resolve_format(str(tmp_path / "no-suffix"), "auto") == "parquet"  # by its magic bytes
    assert len(read_all(tmp_path / "no-suffix")[0]) == 10_000 - 3


def test_arrow_files_and_streams(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = _table(300)
    with pa.ipc.new_file(tmp_path / "f.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=64)
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=64)
    for name in ("f.arrow", "s.arrow"):
        assert read_all(tmp_path / name)[0] == table.column("text").to_pylist(), name


def test_a_columnar_file_without_the_column_names_its_columns(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"id": [1, 2, 3], "body": ["a", "b", "c"]}), tmp_path / "t.parquet")
    docs, tally = read_all(tmp_path / "t.parquet")
    assert docs == [] and tally.docs == {"missing_field": 3} and set(tally.fields_seen) == {"id", "body"}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    assert read_all(tmp_path / "broken.parquet")[1].files == {"corrupt": 1}


def _save_to_disk(folder: Path, texts: list[str]) -> Path:
    """A folder laid out as ``datasets.Dataset.save_to_disk`` writes it: Arrow stream shards, state.json
    naming them, dataset_info.json (the library itself is not needed to read it)."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    half = len(texts) // 2
    files = []
    for i, part in enumerate([texts[:half], texts[half:]]):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.table({"text": part, "label": [0] * len(part)})
        with pa.ipc.new_stream(folder / name, table.schema) as w:
            w.write_table(table)
        files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "f", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def test_a_datasets_folder_and_a_dataset_dict(tmp_path):
    train = [f"train example {i}" for i in range(20)]
    one = _save_to_disk(tmp_path / "one", train)
    docs, tally = read_all(one)
    assert docs == train and not tally.docs  # its JSON sidecars are not read as text
    _save_to_disk(tmp_path / "dict" / "train", train)
    _save_to_disk(tmp_path / "dict" / "test", ["test example"] * 4)
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    tally = readers.Tally()
    found = readers.expand_paths([str(tmp_path / "dict")], tally)
    assert [Path(f.path).parent.name for f in found] == ["train", "train"]
    assert "reading the train split of train, test" in tally.warnings[0]
    assert [Path(f.path).parent.name for f in readers.expand_paths([str(tmp_path / "dict" / "test")], tally)] == ["test"] * 2


def test_stdin_is_ingested_streamed_and_recorded_as_dash(tiny_workspace: Workspace, tiny_recipe_path, tmp_path):
    import subprocess
    import sys

    text = "".join(f"piped document number {i} about the garden\n" for i in range(300))
    run = subprocess.run([sys.executable, "-m", "incr_cli", "ingest", str(tiny_workspace.root), "-", "--json"],
                         input=text, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["increment"].endswith("-stdin") and doc["documents"]["kept"] == 300
    assert [s["path"] for s in doc["sources"]] == ["-"]
    assert not list(tiny_workspace.staging.glob("stdin-*"))  # the spooled copy is gone
    again = subprocess.run([sys.executable, "-m", "incr_cli", "ingest", str(tiny_workspace.root), "-"],
                           input=text, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already ingested" in again.stderr + again.stdout


def test_every_format_ingests_the_same_documents_as_jsonl(tiny_workspace: Workspace, tiny_recipe: Recipe, tmp_path):
    """The same 60 documents (quotes, commas, tabs, newlines, non-ASCII) in every format: each
    increment holds exactly the documents (by hash) the .jsonl gives."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    from incr_cli.data.dedup import DOC_HASHES

    docs = [f"Document {i}: \"quoted\", with commas,\ttabs and\na newline; café {i * 13}" for i in range(60)]
    src = tmp_path / "src"
    src.mkdir()
    jsonl = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    (src / "d.jsonl").write_bytes(jsonl)
    (src / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (src / "d.jsonl.gz").write_bytes(gzip.compress(jsonl))
    rows = [{"id": str(i), "text": d} for i, d in enumerate(docs)]
    write_csv(src / "d.csv", rows)
    write_csv(src / "d.tsv", rows, delimiter="\t")
    table = pa.table({"id": list(range(60)), "text": docs})
    pq.write_table(table, src / "d.parquet", row_group_size=16)
    with pa.ipc.new_file(src / "d.arrow", table.schema) as w:
        w.write_table(table)
    _save_to_disk(src / "dataset", docs)

    def hashes(name: str) -> list[bytes]:
        ws = tiny_workspace.copy_to(tmp_path / f"ws-{name}")
        res = ingest(ws, [str(src / name)], recipe=tiny_recipe)
        assert res.documents["kept"] == len(docs) and not res.documents["rejected"], (name, res.documents)
        data = (ws.increment_dir(res.increment) / DOC_HASHES).read_bytes()
        return sorted(data[i:i + 16] for i in range(0, len(data), 16))

    want = hashes("d.jsonl")
    for name in ("d.jsonl.zst", "d.jsonl.gz", "d.csv", "d.tsv", "d.parquet", "d.arrow", "dataset"):
        assert hashes(name) == want, name
