"""Vocabulary growth: new words of an increment become new tokens, in tokenizer revisions that only grow.

At ingest (``--extend-vocab N`` / ``vocab.max_new_tokens``) the words of the increment's training
documents are counted as the tokenizer's own pre-tokenizer cuts them; the most frequent ones that
its model cuts into at least ``vocab.min_pieces`` pieces (or maps to the unknown token), seen at
least ``vocab.min_frequency`` times, are added to the tokenizer's vocabulary with new ids at the
end. Existing ids never change, so every earlier increment's token ids stay valid for every later
model. The extended tokenizer (a *revision*) is stored in the increment's ``tokenizer/`` folder,
and its manifest's ``vocab`` records what was added, each word's frequency and the pieces (ids) the
old tokenizer cut it into, the revision's sha256 and its lineage (the sha256 of every revision it
extends, oldest first).

Which tokenizers can grow (fast tokenizers only; the word becomes one entry of the model's vocabulary):
- WordPiece (BERT, DistilBERT, ELECTRA, MPNet, MiniLM): the word is added to the vocabulary; the
  greedy longest-match then takes it whole.
- byte-level BPE (RoBERTa): the word (with its leading-space marker) is added and the BPE model is
  switched to ``ignore_merges`` (a word found whole in the vocabulary is one token).
- Unigram (SentencePiece-style: XLM-R, CamemBERT, ALBERT): the word is added with the highest
  score a piece can have (log-probability 0), so the Viterbi segmentation takes it whole.
Any other model type (WordLevel, a slow tokenizer) is refused with a message naming these three.

In training, ``grow_embeddings`` resizes the student to the newest revision: each new row of the
input embeddings, of an untied output projection and of the output bias starts as the mean of the
parent's rows for the pieces the old tokenizer produced for that word.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import VocabConfig
from incr_cli.errors import InputError, IntegrityError, UsageError, clip
from incr_cli.model.tokenizer import load_tokenizer, quiet_transformers, tokenizer_sha256
from incr_cli.store.workspace import Workspace

TOKENIZER_DIR = "tokenizer"  # the extended tokenizer inside an increment folder
GROWABLE = {"WordPiece": "WordPiece (BERT family)", "BPE": "byte-level BPE (RoBERTa)",
            "Unigram": "Unigram (SentencePiece: XLM-R, CamemBERT, ALBERT)"}
_MARKERS = "Ġ▁"  # byte-level BPE's and SentencePiece's word-start markers
_WORD_RE = re.compile(r"\w*[^\W\d_]\w*")  # word characters with at least one letter
# Files that describe a vocabulary for slow tokenizers: stale once tokenizer.json grows.
_SLOW_FILES = ("vocab.txt", "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "spm.model")


# ----------------------------------------------------------------------------- counting words


def growable_kind(tokenizer: Any) -> str:
    """The tokenizer's model type when it can grow; UsageError (exit 2) naming those that can otherwise."""
    kinds = ", ".join(GROWABLE.values())
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"vocabulary growth needs a fast tokenizer; {type(tokenizer).__name__} is not one "
                         f"(supported: {kinds})")
    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if kind not in GROWABLE:
        raise UsageError(f"--extend-vocab: the workspace tokenizer is a {kind} tokenizer, which cannot grow here; "
                         f"supported: {kinds}. Ingest without --extend-vocab (vocab.max_new_tokens=0)")
    return kind


@dataclass
class WordCounts:
    """Words of an increment as the tokenizer pre-tokenizes them, per split (the vocabulary form:
    normalised, with the word-start marker of byte-level BPE / SentencePiece)."""

    train: Counter = field(default_factory=Counter)
    heldout: Counter = field(default_factory=Counter)
    documents: Counter = field(default_factory=Counter)  # split -> documents counted

    def add(self, tokenizer: Any, text: str, heldout: bool) -> None:
        backend = tokenizer.backend_tokenizer
        normal = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = backend.pre_tokenizer.pre_tokenize_str(normal) if backend.pre_tokenizer is not None else [(normal, None)]
        split = "heldout" if heldout else "train"
        getattr(self, split).update(w for w, _ in words)
        self.documents[split] += 1


@dataclass
class Candidate:
    token: str  # the vocabulary entry (e.g. "numpy", "Ġnumpy", "▁numpy")
    frequency: int  # occurrences in the training documents
    pieces: list[str]  # what the old tokenizer cut it into
    piece_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "word": surface(self.token), "frequency": self.frequency,
                "pieces": self.pieces, "piece_ids": self.piece_ids}


def surface(token: str) -> str:
    """The word as text: without a leading word-start marker (byte-level BPE's bytes are kept as they map)."""
    return token[1:] if token[:1] in _MARKERS else token


class _Pieces:
    """A tokenizer model's pieces of single words, memoised (a word is cut the same way every time)."""

    def __init__(self, tokenizer: Any):
        self.model = tokenizer.backend_tokenizer.model
        self.memo: dict[str, tuple[list[str], list[int]]] = {}

    def __call__(self, word: str) -> tuple[list[str], list[int]]:
        if word not in self.memo:
            toks = self.model.tokenize(word)
            self.memo[word] = ([t.value for t in toks], [t.id for t in toks])
        return self.memo[word]

    def count(self, words: Counter) -> int:
        """Tokens of all these words (each occurrence cut like its word)."""
        return sum(n * len(self(w)[0]) for w, n in words.items())


def candidates(counts: WordCounts, tokenizer: Any, settings: VocabConfig) -> list[Candidate]:
    """Every word worth a token, most frequent first (ties: more pieces first, then alphabetical).

    A candidate occurs at least ``min_frequency`` times in the training documents, has a letter,
    is not in the vocabulary yet, and the tokenizer cuts it into ``min_pieces`` or more pieces or
    maps it to the unknown token."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    pieces = _Pieces(tokenizer)
    found = []
    for word, n in counts.train.items():
        if n < settings.min_frequency or word in vocab or not _WORD_RE.fullmatch(surface(word)):
            continue
        values, ids = pieces(word)
        if len(ids) >= settings.min_pieces or (unk is not None and unk in ids):
            found.append(Candidate(word, n, values, ids))
    found.sort(key=lambda c: (-c.frequency, -len(c.piece_ids), c.token))
    return found


def token_counts(counts: WordCounts, old: Any, new: Any) -> dict[str, dict[str, Any]]:
    """Tokens per split before (old tokenizer) and after (new), and per document."""
    before, after = _Pieces(old), _Pieces(new)
    out = {}
    for split in ("train", "heldout"):
        words, docs = getattr(counts, split), counts.documents[split]
        b, a = before.count(words), after.count(words)
        out[split] = {"documents": docs, "before": b, "after": a,
                      "per_document_before": round(b / docs, 2) if docs else None,
                      "per_document_after": round(a / docs, 2) if docs else None}
    return out


# ----------------------------------------------------------------------------- growing a tokenizer


def extend_tokenizer(tokenizer: Any, tokens: list[str], folder: Path) -> Any:
    """Write ``tokenizer`` grown by ``tokens`` (new ids len(tokenizer), len(tokenizer)+1, ...) into
    ``folder`` and return it loaded from there (so what is used is what is stored)."""
    from transformers import AutoTokenizer


    kind = growable_kind(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, start = spec["model"], len(tokenizer)
    for i, token in enumerate(tokens):
        if kind == "Unigram":
            if len(model["vocab"]) != start + i:
                raise UsageError("--extend-vocab: this Unigram tokenizer has tokens outside its vocabulary list, "
                                 "so new ids cannot go at the end; ingest without --extend-vocab")
            model["vocab"].append([token, 0.0])  # the best score a piece can have: taken whole
        else:
            model["vocab"][token] = start + i
    if kind == "BPE":
        model["ignore_merges"] = True  # a word found whole in the vocabulary is one token
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        tokenizer.save_pretrained(folder)
    for name in _SLOW_FILES:
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with quiet_transformers():
        grown = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    _check_grown(tokenizer, grown, tokens)
    return grown


def _check_grown(old: Any, new: Any, tokens: list[str]) -> None:
    """The revision keeps every old id and gives each new token its own id at the end."""
    start = len(old)
    if len(new) != start + len(tokens):
        raise IntegrityError(f"the extended tokenizer has {len(new)} tokens, expected {start + len(tokens)}")
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    if any(new_vocab.get(t) != i for t, i in old_vocab.items()):
        raise IntegrityError("the extended tokenizer moved an existing token id; nothing was written")
    for i, token in enumerate(tokens):
        if new_vocab.get(token) != start + i:
            raise IntegrityError(f"the extended tokenizer did not give {clip(token)} the id {start + i}")


# ----------------------------------------------------------------------------- revisions of a line


@dataclass
class Revision:
    """A tokenizer revision: its sha256 and lineage (oldest first, ending with it), where it lives."""

    sha256: str
    lineage: list[str]
    source: str  # the version or increment folder it is read from
    size: int

    @property
    def number(self) -> int:
        return len(self.lineage) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "lineage": self.lineage, "revision": self.number, "size": self.size}


def version_revision(ws: Workspace, version: str, tokenizer: Any) -> Revision:
    """The revision of a version's tokenizer (its manifest's ``tokenizer``, else revision 0)."""
    sha = tokenizer_sha256(tokenizer)
    recorded = ws.version_manifest(version).get("tokenizer") or {}
    lineage = list(recorded.get("lineage") or [sha])
    return Revision(sha, lineage if lineage[-1] == sha else [sha], version, len(tokenizer))


def increment_lineage(manifest: dict[str, Any]) -> list[str]:
    """The revisions an increment's ids are valid in from the start: its tokenizer's lineage."""
    sha = manifest.get("tokenizer_sha256")
    return list(manifest.get("tokenizer_lineage") or ([sha] if sha else []))


def line_tokenizer(ws: Workspace) -> tuple[Any, Revision]:
    """The tokenizer an ingest uses: the newest revision among LATEST's and its pending increments'
    (so that revisions chain), with its Revision."""
    latest = ws.latest()
    grown = [d for d in ws.pending(latest) if ws.increment_manifest(d).get("vocab")]
    if not grown:
        tokenizer = load_tokenizer(ws, latest)
        return tokenizer, version_revision(ws, latest, tokenizer)
    newest = max(grown, key=lambda d: len(increment_lineage(ws.increment_manifest(d))))
    revision = _increment_revision(ws, newest)
    for d in grown:
        _require_in(revision, d, increment_lineage(ws.increment_manifest(d))[-1])
    return load_revision(ws, newest), revision


def _increment_revision(ws: Workspace, increment: str) -> Revision:
    vocab = ws.increment_manifest(increment)["vocab"]
    return Revision(vocab["sha256"], list(vocab["lineage"]), increment, int(vocab["size"]))


def load_revision(ws: Workspace, increment: str) -> Any:
    """The extended tokenizer stored in an increment folder."""
    from transformers import AutoTokenizer


    folder = ws.increment_dir(increment) / TOKENIZER_DIR
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a damaged tokenizer file surfaces as many exception types
        raise IntegrityError(f"{increment}: its extended tokenizer cannot be loaded ({type(exc).__name__}); "
                             f"run `incr verify {ws.root} --all`") from None


def _require_in(revision: Revision, increment: str, sha: str) -> None:
    if sha not in revision.lineage:
        raise InputError(f"{increment} was tokenized with a tokenizer revision that {revision.source}'s revision "
                         f"{revision.number} does not extend (two pending increments grew the vocabulary apart); "
                         f"train the pending increments into a version, or remove {increment} and ingest it again")


@dataclass
class Growth:
    """What a training run grows the student to: the revision, its tokenizer, the new ids and their pieces."""

    revision: Revision
    tokenizer: Any
    parent_size: int  # the parent's vocabulary (the teacher's)
    added: list[dict[str, Any]]  # Candidate.to_dict() + "id", in id order


def training_growth(ws: Workspace, parent: Revision, new: list[str], replay: list[str]) -> Growth | None:
    """The newest revision among the increments a run trains as new data, when it extends the
    parent's; None when none grew. InputError when the increments' revisions do not chain, or do not
    extend the parent's (e.g. ingested on top of another LATEST)."""
    manifests = {d: ws.increment_manifest(d) for d in [*new, *replay]}
    grown = [d for d in new if manifests[d].get("vocab")]
    if not grown:
        return None
    newest = max(grown, key=lambda d: len(increment_lineage(manifests[d])))
    revision = _increment_revision(ws, newest)
    for d, m in manifests.items():
        _require_in(revision, d, m.get("tokenizer_sha256", ""))
    if parent.sha256 not in revision.lineage:
        raise InputError(f"{newest} grew the vocabulary of another tokenizer than {parent.source}'s; train it from "
                         f"the version it was ingested on (--parent), or remove it and ingest it again")
    if revision.sha256 == parent.sha256:
        return None
    added: dict[int, dict[str, Any]] = {}
    for d in new:
        vocab = manifests[d].get("vocab") or {}
        if vocab.get("sha256") in revision.lineage and vocab.get("sha256") not in parent.lineage:
            added.update({int(a["id"]): a for a in vocab.get("added", [])})
    tokenizer = load_revision(ws, newest)
    if sorted(added) != list(range(parent.size, len(tokenizer))):
        raise IntegrityError(f"{newest}: its tokenizer revision does not match the tokens its increments added; "
                             f"run `incr verify {ws.root} --all`")
    return Growth(revision, tokenizer, parent.size, [added[i] for i in sorted(added)])


# ----------------------------------------------------------------------------- growing a model


def _output_bias(model: Any) -> Any:
    """The output projection's bias Parameter, if it has one."""
    import torch

    out = model.get_output_embeddings()
    bias = getattr(out, "bias", None) if out is not None else None
    return bias if isinstance(bias, torch.nn.Parameter) else None


def grow_embeddings(model: Any, growth: Growth) -> None:
    """Resize ``model`` to the revision's vocabulary, in place: each new row of the input embeddings,
    of an untied output projection and of the output bias is the mean of its pieces' rows
    (``piece_ids``; pieces added earlier in the same growth are filled first, in id order)."""
    import torch  # only training grows a model: ingest never imports torch through here

    size = len(growth.tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if size > rows:
        model.resize_token_embeddings(size, mean_resizing=False)
    emb = model.get_input_embeddings().weight  # (V, H)
    out = model.get_output_embeddings()
    untied = out is not None and out.weight.data_ptr() != emb.data_ptr() and out.weight.shape[0] >= size
    bias = _output_bias(model)
    with torch.no_grad():
        for entry in growth.added:
            new_id, pieces = int(entry["id"]), torch.tensor(entry["piece_ids"], dtype=torch.long)
            emb[new_id] = emb[pieces].mean(0)
            if untied:
                out.weight[new_id] = out.weight[pieces].mean(0)
            if bias is not None and bias.shape[0] >= size:
                bias[new_id] = bias[pieces].mean()


# ----------------------------------------------------------------------------- scoring across revisions


@dataclass(frozen=True)
class VocabLimits:
    """Which positions a version is scored on when its vocabulary and the increment's differ.

    ``model_vocab``: the version's vocabulary size when it predates tokens the increment uses (ids it
    lacks read as unknown, its logits are cut there, targets it lacks are not scored);
    ``valid_below``: score only targets below this id (two versions compared on the positions valid
    for both). None: no limit."""

    model_vocab: int | None = None
    valid_below: int | None = None


NO_LIMITS = VocabLimits()


def scoring_vocab(manifest: dict[str, Any], increment: str, revision: Revision, remedy: str) -> tuple[int, VocabLimits]:
    """How a version (its tokenizer ``revision``) scores an increment (its ``manifest``) -> (the
    vocabulary size masks are drawn over: the increment's, the limits: ``model_vocab`` when the
    increment holds ids the version lacks, a later revision). InputError when the two tokenizers are
    not one line's revisions (``remedy`` says what to do)."""
    sha = manifest.get("tokenizer_sha256")
    size = int(manifest.get("vocab_size") or revision.size)
    if not sha or sha in revision.lineage:
        return size, NO_LIMITS
    if revision.sha256 in increment_lineage(manifest):
        return size, VocabLimits(model_vocab=revision.size)
    raise InputError(f"{increment} was tokenized with a different tokenizer than {revision.source}'s; {remedy}")
