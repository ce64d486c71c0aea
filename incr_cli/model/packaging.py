"""Sentence-transformers packaging: the files that make a folder load in ``SentenceTransformer``.

A base such as all-MiniLM-L6-v2 is the transformer plus modules.json (its pipeline: the
transformer, a pooling, maybe a normalisation or a dense layer), sentence_bert_config.json (max
length, casing), config_sentence_transformers.json and a folder per module after the first
(``1_Pooling/config.json``, a dense layer's weights). The transformer's own files are written by
``save_pretrained``; these are carried byte for byte from the base into every version and every
export, so each version loads as the model it was, and ``incr embed`` pools as the packaging says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from incr_cli.errors import IntegrityError

MODULES = "modules.json"
TOP_FILES = (MODULES, "sentence_bert_config.json", "config_sentence_transformers.json")
MAX_MODULE_BYTES = 256 << 20  # a dense layer's weights are a few MB; refuse to copy something absurd


def card_license(folder: Path) -> str | None:
    """The ``license:`` of a model folder's card (README.md's YAML front matter), or of its config."""
    import yaml

    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
        if text.startswith("---"):
            meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            if isinstance(meta, dict) and isinstance(meta.get("license"), str) and meta["license"].strip():
                return meta["license"].strip()
    except (OSError, UnicodeDecodeError, yaml.YAMLError, IndexError):
        pass
    try:
        found = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("license")
    except (OSError, ValueError, AttributeError):
        return None
    return found.strip() if isinstance(found, str) and found.strip() else None


def packaging_files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the sentence-transformers files in ``folder`` ({} when it has none)."""
    if not (folder / MODULES).is_file():
        return {}
    out = {name: (folder / name).read_bytes() for name in TOP_FILES if (folder / name).is_file()}
    for module in _modules(folder):
        rel = str(module.get("path") or "")
        sub = folder / rel
        if not rel or not sub.is_dir():  # "": the transformer itself; a Normalize module has no folder
            continue
        for path in sorted(p for p in sub.rglob("*") if p.is_file()):
            if path.stat().st_size > MAX_MODULE_BYTES:
                raise IntegrityError(f"{path}: over {MAX_MODULE_BYTES >> 20} MB, too large for a sentence-transformers "
                                     "module's file")
            out[str(path.relative_to(folder))] = path.read_bytes()
    return out


@dataclass(frozen=True)
class Pooling:
    """How the packaging turns token states into one vector: ``mode`` (mean, cls or max) and
    whether a Normalize module follows (unit length)."""

    mode: str
    normalize: bool


POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


def declared_pooling(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares (None: not packaged, or a pooling
    ``incr embed`` does not compute, such as mean_sqrt_len or a dense layer after it)."""
    if not (folder / MODULES).is_file():
        return None
    modules = _modules(folder)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if "Pooling" not in kinds or set(kinds) - {"Transformer", "Pooling", "Normalize"}:
        return None
    config_path = folder / str(modules[kinds.index("Pooling")].get("path") or "") / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    on = [mode for key, mode in POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_KEYS]
    if len(on) != 1 or others or on[0] not in ("mean", "cls"):  # the poolings incr embed computes
        return None
    return Pooling(on[0], normalize="Normalize" in kinds)


def _modules(folder: Path) -> list[dict]:
    try:
        modules = json.loads((folder / MODULES).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{folder / MODULES}: not readable JSON ({exc})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise IntegrityError(f"{folder / MODULES}: not a list of modules")
    return modules
