"""Tokenizers of a line, without torch: loading a version's, the ``scratch:*`` one, the checksum
ingest records, and the quiet loading of transformers. Ingest and vocabulary growth need only these,
so `incr ingest` never imports torch (model loading lives in ``weights.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from incr_cli.errors import IntegrityError, UsageError, shown
from incr_cli.store.workspace import Workspace

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_VOCAB = ASSETS / "tiny-vocab.txt"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and warnings so the CLI's own output stays clean."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    previous, hub_previous = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its "Retrying in 1s" lines
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on stderr
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hub_logging.set_verbosity(hub_previous)
        if bars:
            hf_logging.enable_progress_bar()


def _load_vocab(path: Path) -> dict[str, int]:
    tokens = path.read_text(encoding="utf-8").splitlines()
    return {tok: i for i, tok in enumerate(tokens)}


def scratch_tokenizer() -> Any:
    """The lowercase WordPiece tokenizer of the ``scratch:*`` presets (from the shipped vocabulary)."""
    from transformers import BertTokenizerFast

    # transformers 5 takes the vocabulary itself; 4.x takes the file path.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        return BertTokenizerFast(vocab=_load_vocab(TINY_VOCAB), do_lower_case=True)
    return BertTokenizerFast(vocab_file=str(TINY_VOCAB), do_lower_case=True)


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of what decides token ids (vocab/merges, normalizer, pre-tokenizer, added tokens).

    Stable for the same tokenizer across save/load; ingest records it so data and model match.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    added = sorted(spec.get("added_tokens") or [], key=lambda t: t.get("id", 0))
    key = {"model": spec.get("model"), "normalizer": spec.get("normalizer"),
           "pre_tokenizer": spec.get("pre_tokenizer"), "added_tokens": added}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def require_fast(tokenizer: Any, where: str) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{where}: the tokenizer is not a fast (Rust) tokenizer; incr needs tokenizer.json "
                         "or a vocabulary transformers can convert")
    return tokenizer


def first_line(exc: BaseException | None) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines() if exc else []
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def version_folder(ws: Workspace, version: str) -> Path:
    """``version``'s folder (UsageError naming the valid ones when there is none; its weights must be kept)."""
    folder = ws.version_dir(version)
    if not folder.is_dir():
        raise UsageError(f"unknown version {shown(version)}; valid versions: {', '.join(ws.versions()) or 'none'}")
    ws.require_weights(version)
    return folder


def load_tokenizer(ws: Workspace, version: str) -> Any:
    """The fast tokenizer stored in a version folder: the class its ``tokenizer_config.json`` names (what
    ``AutoTokenizer`` would pick), taken from transformers directly: importing ``AutoTokenizer`` loads
    the model configuration code, and with it torch, which a tokenizer does not need."""
    folder = version_folder(ws, version)
    try:
        with quiet_transformers():
            tokenizer = _named_class(folder).from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a corrupt tokenizer file surfaces as many exception types
        raise IntegrityError(f"{version}: the tokenizer files cannot be loaded ({first_line(exc)}); "
                             f"run `incr verify {ws.root} --all`") from None
    return require_fast(tokenizer, f"{version}")


def _named_class(folder: Path) -> Any:
    """The fast tokenizer class ``folder/tokenizer_config.json`` names (``BertTokenizerFast`` for
    ``BertTokenizer`` where transformers has both), else ``AutoTokenizer``."""
    import transformers

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and name.isidentifier():
        base = name.removesuffix("Fast")
        for candidate in (f"{base}Fast", base):
            cls = getattr(transformers, candidate, None)
            if cls is not None and hasattr(cls, "from_pretrained"):
                return cls
    from transformers import AutoTokenizer

    return AutoTokenizer
