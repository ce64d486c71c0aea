"""Datasets in the local Hugging Face cache, by name (``incr ingest --dataset NAME[:CONFIG]``): the
files of one split, found on disk, never over the network (a missing dataset is an exit 2 naming
where it was looked for and how to download it).

A downloaded dataset lives in one of two caches:

- the ``datasets`` library's (what ``load_dataset`` prepared): ``$HF_DATASETS_CACHE`` (default
  ``$HF_HOME/datasets``, ``~/.cache/huggingface/datasets``), as
  ``NAMESPACE___NAME/CONFIG/VERSION/HASH/NAME-SPLIT.arrow`` (or ``NAME-SPLIT-00000-of-00004.arrow``
  shards);
- the Hub's (the repository's files as downloaded, e.g. by ``huggingface-cli download --repo-type
  dataset``): ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``), as
  ``datasets--NAMESPACE--NAME/snapshots/REVISION/...``, Parquet (or JSON Lines, CSV) files whose
  path names the config and the split (``CONFIG/SPLIT-00000-of-00001.parquet``, ``data/SPLIT-*``,
  ``CONFIG/SPLIT/*.parquet``).

The first that holds the dataset is used; its files are then read like any other (``readers.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from incr_cli.errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CONFIG = re.compile(r"^[\w.-]+$")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz", ".jsonl.zst", ".json.gz")


@dataclass(frozen=True)
class CachedDataset:
    """One split of a cached dataset: its files and where they were found."""

    name: str
    config: str | None
    split: str
    files: list[str]
    cache: str  # "datasets" or "hub"
    folder: str  # the folder the files are under

    @property
    def label(self) -> str:
        return f"{self.name}{':' + self.config if self.config else ''} ({self.split})"


def _home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def datasets_cache() -> Path:
    return Path(os.environ.get("HF_DATASETS_CACHE") or _home() / "datasets")


def hub_cache() -> Path:
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _home() / "hub")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[:CONFIG]`` -> (name, config or None); InputError for anything else."""
    name, _, config = spec.partition(":")
    if not _NAME.match(name) or (config and not _CONFIG.match(config)) or ".." in name:
        raise InputError(f"--dataset {spec!r}: expected NAME or NAMESPACE/NAME, then optionally :CONFIG "
                         "(letters, digits, '_', '.', '-'), e.g. wikitext:wikitext-2-raw-v1")
    return name, config or None


def find(spec: str, split: str = "train") -> CachedDataset:
    """The files of ``split`` of the dataset ``spec`` (``NAME[:CONFIG]``) in the local caches."""
    name, config = parse_spec(spec)
    if not _CONFIG.match(split):
        raise InputError(f"--split {split!r}: expected a split name such as train, validation or test")
    for look in (_in_datasets_cache, _in_hub_cache):
        found = look(name, config, split)
        if found is not None:
            return found
    raise InputError(f"--dataset {spec}: not in the local Hugging Face cache (looked in "
                     f"{datasets_cache() / name.replace('/', '___')} and "
                     f"{hub_cache() / ('datasets--' + name.replace('/', '--'))}); incr never downloads: fetch it first "
                     f"(huggingface-cli download --repo-type dataset {name}, or datasets.load_dataset online), "
                     "or pass its files")


def _choose_config(spec_name: str, configs: list[str], config: str | None, where: Path) -> str:
    if config is not None:
        if config not in configs:
            raise InputError(f"--dataset {spec_name}:{config}: no such config in {where} (it has "
                             f"{', '.join(sorted(configs)) or 'none'})")
        return config
    if len(configs) == 1:
        return configs[0]
    if "default" in configs:
        return "default"
    raise InputError(f"--dataset {spec_name}: {len(configs)} configs in {where} ({', '.join(sorted(configs))}); "
                     f"name one as {spec_name}:CONFIG")


def _in_datasets_cache(name: str, config: str | None, split: str) -> CachedDataset | None:
    top = datasets_cache() / name.replace("/", "___")
    if not top.is_dir():
        return None
    configs = [p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")]
    chosen = _choose_config(name, configs, config, top)
    # CONFIG/VERSION/HASH/: the newest prepared copy that holds arrow files
    prepared = sorted((h for v in (top / chosen).iterdir() if v.is_dir() for h in v.iterdir()
                       if h.is_dir() and any(h.glob("*.arrow"))), key=lambda p: p.stat().st_mtime)
    if not prepared:
        return None
    folder = prepared[-1]
    base = name.split("/")[-1]
    files = sorted(str(p) for p in folder.glob("*.arrow")
                   if re.fullmatch(rf"{re.escape(base)}-{re.escape(split)}(-\d+-of-\d+)?\.arrow", p.name))
    if not files:
        splits = sorted({m.group(1) for p in folder.glob("*.arrow")
                         if (m := re.fullmatch(rf"{re.escape(base)}-([\w.]+?)(-\d+-of-\d+)?\.arrow", p.name))})
        raise InputError(f"--dataset {name}: no {split!r} split in {folder} (it has {', '.join(splits) or 'none'}); "
                         "choose one with --split")
    return CachedDataset(name, chosen, split, files, "datasets", str(folder))


def _in_hub_cache(name: str, config: str | None, split: str) -> CachedDataset | None:
    top = hub_cache() / ("datasets--" + name.replace("/", "--"))
    snapshots = top / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = top / "refs" / "main"
    revision = snapshots / ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    if revision is None or not revision.is_dir():
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not candidates:
            return None
        revision = candidates[-1]
    data = [p for p in revision.rglob("*") if p.name.endswith(DATA_SUFFIXES) and (p.is_file() or p.is_symlink())
            and not p.name.startswith(".") and p.name not in ("dataset_infos.json", "dataset_info.json")]
    if not data:
        return None
    rel = {p: p.relative_to(revision).parts for p in data}
    configs = sorted({parts[0] for parts in rel.values() if len(parts) > 1 and parts[0] != "data"})
    chosen = _choose_config(name, configs, config, revision) if configs else None
    picked = [p for p, parts in rel.items() if (chosen is None or parts[0] == chosen) and _names_split(parts, split)]
    if not picked:
        splits = sorted({s for parts in rel.values() for s in ("train", "validation", "test") if _names_split(parts, s)})
        raise InputError(f"--dataset {name}: no {split!r} split among the files of {revision} "
                         f"(it has {', '.join(splits) or 'files without a split in their names'}); choose one with --split")
    return CachedDataset(name, chosen, split, sorted(str(p) for p in picked), "hub", str(revision))


def _names_split(parts: tuple[str, ...], split: str) -> bool:
    """A file's path names ``split``: a folder of that name, or a file named SPLIT, SPLIT-..., SPLIT_..., SPLIT.*"""
    return split in parts[:-1] or re.match(rf"^{re.escape(split)}([-_.]|$)", parts[-1]) is not None
