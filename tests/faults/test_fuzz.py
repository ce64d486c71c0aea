"""Property-based fuzzing of everything that reads user input: the readers (lines, paragraphs, JSON
Lines, each plain and gzipped), recipe files and overrides, manifests and LATEST, and `incr ingest`
end to end.

The properties: nothing raises but the library's own errors (the CLI's exit 2; never exit 1 or a
traceback), every message is bounded in size, memory stays bounded on huge or explosive input, and
whatever was valid in the input is read, and ingested, exactly once. Library functions are called in
this process (each example costs milliseconds); `incr ingest` and `incr recipe validate` run
in-process through the CLI. Settings and profiles (``INCR_FUZZ=long``): tests/helpers_fuzz.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from incr_cli.config.recipe import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    SECTIONS,
    Recipe,
    load_recipe,
    recipe_to_dict,
)
from incr_cli.data import readers
from incr_cli.data.clean import clean_text
from incr_cli.data.dedup import DOC_HASHES, doc_hash
from incr_cli.data.readers import ReadState, SourceFile, Tally
from incr_cli.errors import IntegrityError, RecipeError
from incr_cli.store.files import MANIFEST, read_manifest
from incr_cli.store.workspace import Workspace
from tests.helpers_fuzz import (
    JSON_LINE_LIMIT,
    TEXT,
    Expected,
    assert_bounded,
    expect_jsonl,
    expect_lines,
    expect_paragraphs,
    fuzz,
    gz,
    jsonl_file,
    line_bytes,
    not_gzip,
    text_file,
)
from tests.helpers_reliability import cli

# ----------------------------------------------------------------------------- readers


def _read(tmp: Path, data: bytes, fmt: str, *, compress: bool, max_doc_chars: int = 1000):
    """Read ``data`` (gzipped first when ``compress``) as one file; return (docs, tally, state)."""
    path = tmp / ("input.gz" if compress else "input")
    path.write_bytes(gz(data) if compress else data)
    src = SourceFile(str(path), str(path), path.stat().st_size)
    tally, state = Tally(), ReadState()
    docs = list(readers.read_documents(src, fmt, "text", max_doc_chars, tally, state))
    return docs, tally, state


def _assert_read_as(expected: Expected, docs, tally: Tally, state: ReadState, path: str) -> None:
    assert state.skipped == expected.skipped
    assert [text for text, _ in docs] == expected.docs
    assert dict(tally.docs) == {reason: len(lines) for reason, lines in expected.rejected.items()}
    for reason, lines in expected.rejected.items():  # the first ten of each, by line number
        assert tally.doc_examples[reason] == [f"{path}:{no}" for no in lines[:10]]


@fuzz(60)
@given(data=text_file(), compress=st.booleans())
def test_lines_reader_reads_every_valid_line_once(tmp_path_factory, data, compress):
    tmp = tmp_path_factory.mktemp("lines")
    docs, tally, state = _read(tmp, data, "lines", compress=compress)
    _assert_read_as(expect_lines(data, 1000), docs, tally, state, str(tmp / ("input.gz" if compress else "input")))
    # only lines over the reader's limit are cut: 4 * max_doc_chars + 4 bytes with the newline, so a line
    # of 4000 to 4003 bytes is cut or not by its ending (whether a newline follows it within the limit)
    assert all(cut == (len(text.encode()) >= 4000) for text, cut in docs if not 4000 <= len(text.encode()) < 4004)
    assert all(len(text.encode()) >= 4000 for text, cut in docs if cut)


@fuzz(40)
@given(data=st.lists(st.tuples(line_bytes(max_huge=300), st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\n \n", b"\r"])),
                     max_size=25).map(lambda parts: not_gzip(b"".join(a + b for a, b in parts).replace(b"\x00", b""))),
       compress=st.booleans())
def test_paragraphs_reader_reads_every_valid_paragraph_once(tmp_path_factory, data, compress):
    tmp = tmp_path_factory.mktemp("paragraphs")
    docs, tally, state = _read(tmp, data, "paragraphs", compress=compress, max_doc_chars=100_000)
    _assert_read_as(expect_paragraphs(data), docs, tally, state, str(tmp / ("input.gz" if compress else "input")))


@fuzz(60)
@given(file=jsonl_file(), compress=st.booleans())
def test_jsonl_reader_skips_each_bad_record_with_its_reason_and_line(tmp_path_factory, monkeypatch, file, compress):
    """Deep nesting (to 60,000 levels), malformed, non-UTF-8, lone surrogates, wrong fields, too long:
    each bad record is counted under its reason at its line; every good record around it is read."""
    monkeypatch.setattr(readers, "MAX_JSON_LINE_BYTES", JSON_LINE_LIMIT)
    data, records = file
    tmp = tmp_path_factory.mktemp("jsonl")
    docs, tally, state = _read(tmp, data, "jsonl", compress=compress)
    _assert_read_as(expect_jsonl(data, records), docs, tally, state, str(tmp / ("input.gz" if compress else "input")))


@fuzz(60)
@given(data=st.one_of(st.binary(max_size=300), text_file(max_huge=5000)),
       fmt=st.sampled_from(["lines", "paragraphs", "jsonl", "csv", "tsv", "parquet", "arrow"]),
       compress=st.booleans())
def test_any_bytes_in_any_format_read_without_error(tmp_path_factory, data, fmt, compress):
    """Arbitrary bytes: nothing raises, every document is text UTF-8 can hold, and each non-blank
    line (or paragraph) is either a document or one rejection."""
    docs, tally, state = _read(tmp_path_factory.mktemp("any"), data, fmt, compress=compress)
    for text, _ in docs:
        text.encode("utf-8")  # no lone surrogate reaches the cleaner and the hash
    if state.skipped is None and fmt == "jsonl":
        lines = [line for line in data.split(b"\n") if line.strip()]
        assert len(docs) + sum(tally.docs.values()) == len(lines)


def test_a_plain_file_that_starts_like_gzip_is_corrupt(tmp_path):
    docs, _, state = _read(tmp_path, b"\x1f\x8b\nsome text after gzip's magic\n", "lines", compress=False)
    assert docs == [] and state.skipped == "corrupt"


@fuzz(25)
@given(data=text_file(max_huge=3000), cut_at=st.floats(0, 1))
def test_a_truncated_gz_keeps_a_prefix_of_its_documents(tmp_path_factory, data, cut_at):
    tmp = tmp_path_factory.mktemp("truncated")
    whole = expect_lines(data, 1000, sniff=False)  # the damage may come before a NUL that would make it binary
    packed = gz(data)
    path = tmp / "cut.gz"
    path.write_bytes(packed[: int(len(packed) * cut_at)])
    src = SourceFile(str(path), str(path), path.stat().st_size)
    tally, state = Tally(), ReadState()
    docs = [text for text, _ in readers.read_documents(src, "lines", "text", 1000, tally, state)]
    assert docs == whole.docs[: len(docs)]
    assert state.skipped in (None, "corrupt", "empty", "binary")


# ----------------------------------------------------------------------------- recipes


def _load(tmp: Path, text: str | bytes, overrides=()) -> Recipe | RecipeError:
    path = tmp / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        assert_bounded(str(exc))
        return exc


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                           max_leaves=12)
SECTION_NAMES = st.one_of(st.sampled_from(list(SECTIONS)), TEXT)
KEY_NAMES = st.one_of(st.sampled_from(sorted({f.name for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values()})),
                      TEXT)
RECIPE_DICTS = st.dictionaries(SECTION_NAMES, st.one_of(st.dictionaries(KEY_NAMES, YAML_VALUES, max_size=4), YAML_VALUES),
                               max_size=4)


@fuzz(60)
@given(text=st.one_of(RECIPE_DICTS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=200),
                      st.binary(max_size=200)))
def test_any_recipe_file_loads_or_is_one_recipe_error(tmp_path_factory, text):
    _load(tmp_path_factory.mktemp("recipe"), text)


@st.composite
def _laughs(draw) -> tuple[str, int]:
    """(YAML, values it expands to): ``levels`` anchors each naming the previous ``fanout`` times,
    the last under a random recipe key (nine of nine is the classic billion laughs: 387 million)."""
    levels, fanout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]")
    key = draw(st.sampled_from(["train:\n  freeze: *{}", "train:\n  lr: *{}", "strategy: *{}", "eval: {{seed: *{}}}"]))
    size = 1 + fanout  # a0 and its items
    for _ in range(1, levels):
        size = 1 + fanout * size
    return "\n".join(lines) + "\n" + key.format(f"a{levels - 1}") + "\n", size


@fuzz(30)
@given(case=_laughs())
def test_aliases_past_the_limit_are_refused_without_expanding(tmp_path_factory, case):
    text, size = case
    tracemalloc.start()
    try:
        result = _load(tmp_path_factory.mktemp("laughs"), text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB to load a recipe of {len(text)} bytes"
    if size > MAX_YAML_VALUES:
        assert isinstance(result, RecipeError) and f"(the limit is {MAX_YAML_VALUES:,})" in str(result)


@st.composite
def _deep(draw) -> tuple[str, int]:
    """(YAML, depth): ``train.freeze`` nested ``n`` lists or mappings deep, flow or block style."""
    n = draw(st.one_of(st.integers(1, MAX_YAML_DEPTH + 3), st.integers(1, 30_000)))
    style = draw(st.sampled_from(["flow-list", "flow-map", "block"]))
    if style == "flow-list":
        inner = "[" * n + "]" * n  # the innermost list is empty
    elif style == "flow-map":
        inner = "{a: " * n + "x" + "}" * n
    else:
        inner = "\n    " + "- " * n + "x"  # compact nested block sequences
    # levels: the top mapping, train's mapping, then freeze's n containers (and a leaf, but for [])
    return f"train:\n  freeze: {inner}\n", 2 + n + (style != "flow-list")


@fuzz(30)
@given(case=_deep())
def test_deep_nesting_is_refused_naming_the_key_and_the_limit(tmp_path_factory, case):
    text, depth = case
    result = _load(tmp_path_factory.mktemp("deep"), text)
    refused = f"nested more than {MAX_YAML_DEPTH} levels deep (the limit)"
    if depth > MAX_YAML_DEPTH:
        assert isinstance(result, RecipeError) and refused in str(result), str(result)
        assert "- train.freeze" in str(result), str(result)  # the scanner may stop it before the composer
    else:
        assert refused not in str(result)


def _valid_value(cls: type, name: str):
    """A value the schema accepts for ``cls.name`` (None when drawing one needs more than a range)."""
    import dataclasses
    import typing

    from incr_cli.config.recipe import _choices, _unwrap_optional

    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    inner, optional = _unwrap_optional(typing.get_type_hints(cls)[name])
    meta = f.metadata
    choices = _choices(meta)  # a tuple, or read when asked (strategy.name's come from the registered strategies)
    if typing.get_origin(inner) is list:  # a list of choices (tracking.sinks); free strings (train.freeze) are not drawn
        return st.lists(st.sampled_from(choices), unique=True) if choices else None
    if inner is bool:
        base = st.booleans()
    elif choices:
        base = st.sampled_from(choices)
    elif inner in (int, float) and (meta["lo"] is not None or meta["hi"] is not None):
        lo, hi = meta["lo"], meta["hi"]
        if inner is int:
            base = st.integers(int(lo) if lo is not None else -10**6, int(hi) if hi is not None else 10**9)
        else:
            base = st.floats(lo, hi if hi is not None else 1e12, exclude_min=meta["lo_open"], exclude_max=meta["hi_open"])
    else:
        return None
    return st.one_of(base, st.none()) if optional else base


VALID_KEYS = [(section, name) for section, cls in SECTIONS.items() for name in cls.__dataclass_fields__
              if _valid_value(cls, name) is not None and section != "masking"]  # masking ratios must add up to <= 1


@st.composite
def _valid_settings(draw) -> dict[str, object]:
    keys = draw(st.lists(st.sampled_from(VALID_KEYS), unique=True, max_size=8))
    return {f"{section}.{name}": draw(_valid_value(SECTIONS[section], name)) for section, name in keys}


@fuzz(40)
@given(settings=_valid_settings(), as_overrides=st.booleans())
def test_every_valid_setting_is_taken_as_written(tmp_path_factory, settings, as_overrides):
    """Valid keys and values, in a file or as overrides, all arrive in the recipe (unless the
    strategy preset fixes them): the limits refuse nothing real."""
    tmp = tmp_path_factory.mktemp("valid")
    if as_overrides:
        items = [f"{key}={json.dumps(value)}" for key, value in settings.items()]  # JSON is YAML
        result = _load(tmp, "", items)
    else:
        nested: dict[str, dict] = {}
        for key, value in settings.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        result = _load(tmp, yaml.safe_dump(nested))
    assert isinstance(result, Recipe), str(result)
    resolved = recipe_to_dict(result)
    from incr_cli.config.recipe import preset_settings

    fixed = preset_settings(result)
    for key, value in settings.items():
        section, name = key.split(".")
        if key not in fixed:
            assert resolved[section][name] == value, key


@fuzz(60)
@given(items=st.lists(st.one_of(st.text(max_size=40), st.builds("{}.{}={}".format, SECTION_NAMES, KEY_NAMES, st.text(max_size=40)),
                                st.builds("train.freeze={}".format, st.integers(0, 20_000).map(lambda n: "[" * n + "]" * n))),
                      max_size=5))
def test_any_overrides_give_a_recipe_or_one_recipe_error(items):
    try:
        load_recipe(None, items)
    except RecipeError as exc:
        assert_bounded(str(exc))


# ----------------------------------------------------------------------------- manifests and LATEST

WEIGHTS_SHA256 = hashlib.sha256(b"w").hexdigest()  # of the one file each fuzzed folder holds

FILE_NAMES = st.one_of(st.sampled_from(["weights.bin", "x\x00y", "../../etc/passwd", "/abs", ".", "", "weights.bin/x",
                                         "a" * 5000, "w" * 300]), TEXT)
FILE_RECORDS = st.one_of(YAML_VALUES, st.fixed_dictionaries({"size": st.one_of(st.just(1), YAML_SCALARS),
                                                             "sha256": st.one_of(st.just(WEIGHTS_SHA256), YAML_SCALARS)}))
MANIFESTS = st.one_of(
    st.binary(max_size=200),
    YAML_VALUES.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 50_000).map(lambda n: b'{"format": 1, "files": ' + b"[" * n + b"]" * n + b"}"),
    st.builds(lambda files, fmt: json.dumps({"format": fmt, "files": files}).encode(),
              st.one_of(st.dictionaries(FILE_NAMES, FILE_RECORDS, max_size=3), YAML_VALUES),
              st.one_of(st.just(1), YAML_SCALARS)),
)


@fuzz(80)
@given(content=MANIFESTS)
def test_any_manifest_is_read_or_named_as_damaged(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("folder")
    (folder / "weights.bin").write_bytes(b"w")
    (folder / MANIFEST).write_bytes(content)
    ws = Workspace(folder.parent)
    for read in (read_manifest, lambda f: ws.verify_folder(f, use_cache=False)):
        try:
            read(folder)
        except IntegrityError as exc:
            assert_bounded(str(exc))


@fuzz(40)
@given(content=st.one_of(st.binary(max_size=300), TEXT.map(str.encode), st.just(b"v0000\n"), st.just(b"v0000"),
                         st.integers(1, 100_000).map(lambda n: b"v" * n)))
def test_any_latest_names_a_version_or_is_one_error(tmp_path_factory, content):
    root = tmp_path_factory.mktemp("ws")
    (root / "checkpoints" / "v0000").mkdir(parents=True)
    (root / "LATEST").write_bytes(content)
    try:
        assert Workspace(root).latest() == "v0000"
        assert content.strip() == b"v0000"
    except IntegrityError as exc:
        assert_bounded(str(exc))


# ----------------------------------------------------------------------------- incr ingest, end to end


@pytest.fixture(scope="module")
def fuzz_ws(tmp_path_factory, _tiny_workspace_template) -> Workspace:
    """One workspace for every ingest example: each must add exactly the valid documents it has not seen."""
    return Workspace(_tiny_workspace_template).copy_to(tmp_path_factory.mktemp("fuzz-ws") / "ws")


def _hashes(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i:i + 16] for i in range(0, len(data), 16)]


def _known(ws: Workspace) -> set[bytes]:
    if not ws.index_path.exists():
        return set()
    with sqlite3.connect(ws.index_path) as conn:
        return {row[0] for row in conn.execute("SELECT hash FROM documents")}


@st.composite
def _ingest_input(draw) -> tuple[bytes, str, Expected]:
    kind = draw(st.sampled_from(["lines", "jsonl"]))
    if kind == "lines":
        data = draw(text_file(max_huge=20_000))
        return data, "lines", expect_lines(data, 2000)
    data, records = draw(jsonl_file())
    return data, "jsonl", expect_jsonl(data, records)


@fuzz(15)
@given(case=_ingest_input(), compress=st.booleans())
def test_ingest_adds_each_valid_document_exactly_once_and_exits_0_or_2(fuzz_ws, tmp_path_factory, monkeypatch, case,
                                                                       compress):
    monkeypatch.setattr(readers, "MAX_JSON_LINE_BYTES", JSON_LINE_LIMIT)
    data, fmt, expected = case
    src = tmp_path_factory.mktemp("in") / ("input.gz" if compress else "input")
    src.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    cleaned = [clean_text(text)[:2000].rstrip() for text in expected.docs]
    wanted = {doc_hash(text) for text in cleaned if text}
    new = wanted - _known(fuzz_ws)
    before = fuzz_ws.increments()

    # --allow-unknown: text the tiny English vocabulary maps to [UNK] is valid input here (the
    # coverage guard has its own tests); only an increment with no known token at all is refused.
    result = cli("ingest", fuzz_ws.root, src, "--format", fmt, "data.max_doc_chars=2000", "--allow-unknown", "--json")
    assert result.exit_code in (0, 2), result.output
    assert_bounded(result.stderr)
    written = [inc for inc in fuzz_ws.increments() if inc not in before]
    if result.exit_code == 2:  # nothing readable or usable, or nothing the tokenizer knows: nothing valid lost
        assert not written, result.stderr
        assert not new or "every token is unknown ([UNK])" in result.stderr, result.stderr
        return
    if not new:
        assert not written
        return
    assert len(written) == 1
    rejected = json.loads(result.stdout)["documents"]["rejected"]
    by_reader = {reason: n for reason, n in rejected.items() if reason not in ("too_short", "no_tokens")}
    assert by_reader == {reason: len(lines) for reason, lines in expected.rejected.items()}
    hashes = _hashes(fuzz_ws.increment_dir(written[0]) / DOC_HASHES)
    assert len(hashes) == len(set(hashes)) and set(hashes) == new  # each valid new document, once
    assert _known(fuzz_ws) >= wanted


@fuzz(20)
@given(text=st.one_of(RECIPE_DICTS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.binary(max_size=200),
                      _laughs().map(lambda c: c[0]), _deep().map(lambda c: c[0])))
def test_recipe_validate_exits_0_or_2_with_bounded_output(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cli-recipe") / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    result = cli("recipe", "validate", path, "--json")
    assert result.exit_code in (0, 2), result.output
    assert_bounded(result.stderr)
    problems = json.loads(result.stdout)["problems"][str(path)]
    assert len(problems) <= 21 and all(len(p) < 1000 for p in problems)


# ----------------------------------------------------------------------------- huge input, memory bounded


def test_huge_inputs_are_read_in_bounded_memory(tmp_path, monkeypatch):
    """A 40 MB line, a 50,000-deep JSON record, a 2 MB recipe: each read with a bounded peak."""
    cases = {
        "lines": (b"word " * 8_000_000, "lines", 20 << 20),  # ~4 * max_doc_chars bytes held, not 40 MB
        "jsonl": (b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b'}\n{"text": "after"}\n', "jsonl", 20 << 20),
    }
    for name, (data, fmt, bound) in cases.items():
        tracemalloc.start()
        try:
            docs, tally, _ = _read(tmp_path, data, fmt, compress=False, max_doc_chars=200_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < bound, f"{name}: peak {peak / 2**20:.0f} MiB"
    assert [t for t, _ in docs] == ["after"] and tally.docs == {"too_deep": 1}
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_RECIPE_BYTES + b"\n")
    tracemalloc.start()
    try:
        result = _load(tmp_path, big.read_bytes())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, RecipeError) and "larger than 1 MiB (the limit)" in str(result)
    assert peak < 8 << 20

