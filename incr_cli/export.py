"""`incr export`: one version as a self-contained Hugging Face folder with a model card.

One path for every format: ``export_version`` checks the version (checksums, not pruned), loads it,
converts the weights with ``convert_weights`` (where a new format is added: a name in
``EXPORT_DTYPES`` and a branch there), writes weights, config, tokenizer and a Hub-format
``README.md`` into a temporary folder beside OUT, fsyncs it and renames it to OUT. OUT appears whole
or not at all, and is never overwritten. Export reads the workspace only: it takes no lock.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from incr_cli import __version__
from incr_cli.errors import UsageError
from incr_cli.faults import fault_point
from incr_cli.workspace import Workspace, folder_bytes, fsync_dir, fsync_tree

EXPORT_DTYPES = ("fp32", "fp16", "bf16")
_LEFTOVER = ".{name}.incr-export-"  # the temporary folder of an export killed halfway


@dataclass
class ExportResult:
    out: Path
    version: str
    dtype: str
    bytes: int
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "version": self.version, "dtype": self.dtype, "bytes": self.bytes,
                "files": self.files}


def convert_weights(model: Any, dtype: str) -> Any:
    """The model with its weights in the export format (fp32 as trained, or fp16/bf16 casts)."""
    import torch

    casts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return model.to(casts[dtype])


def export_version(ws: Workspace, version: str | None, out: Path | str, *, dtype: str = "fp32") -> ExportResult:
    """Write ``version`` (LATEST by default) to the new folder ``out`` -> what was written."""
    from incr_cli import models

    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out}: already exists; export never overwrites: choose a new folder or remove it")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    name = ws.resolve_version(version)
    ws.require_weights(name)
    model, tokenizer = models.load_version(ws, name)  # checksums first
    model = convert_weights(model, dtype)
    card = model_card(ws, name, dtype)
    for stale in out.parent.glob(_LEFTOVER.format(name=out.name) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{_LEFTOVER.format(name=out.name)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with models.quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        fault_point("export.write")
        fsync_tree(tmp)
        os.rename(tmp, out)  # an OUT created meanwhile makes this fail: nothing is overwritten
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, name, dtype, folder_bytes(out), sorted(p.name for p in out.iterdir()))


# ----------------------------------------------------------------------------- the model card


def model_card(ws: Workspace, version: str, dtype: str) -> str:
    """README.md in the Hub's format: YAML metadata, then lineage, data, recipe, scores, forgetting."""
    manifest = ws.version_manifest(version)
    lineage = ws.lineage(version)
    source = manifest.get("source") or {}
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "fill-mask"}
    if source.get("kind") == "hub":
        meta["base_model"] = source.get("id")
    meta["tags"] = ["incr", "continual-learning", "masked-lm"]
    front = yaml.safe_dump(meta, sort_keys=False) + "license:  # fill in: the license of the base model and your data\n"
    parts = [f"---\n{front}---\n",
             f"# {ws.root.name} {version}\n",
             f"A masked-language model trained continually with incr {__version__}: {len(lineage) - 1} increment(s) "
             f"on top of {_describe(source)}. Weights exported as {dtype}.\n",
             "## Use\n", "```python\nfrom transformers import pipeline\n\nfill = pipeline(\"fill-mask\", "
             "model=\"PATH/TO/THIS/FOLDER\")\n```\n",
             "## Lineage\n", _lineage_table(ws, lineage),
             "## Data increments\n", _data_table(ws, manifest.get("trained_on") or []),
             "## Held-out scores and forgetting\n", _scores_table(ws, lineage),
             "## Recipe\n", "```yaml\n" + yaml.safe_dump(manifest.get("recipe") or {}, sort_keys=False) + "```\n"]
    return "\n".join(parts)


def _describe(source: dict[str, Any]) -> str:
    kind = source.get("kind")
    if kind == "hub":
        return f"`{source.get('id')}`"
    if kind == "package":
        return f"`{source.get('spec')}` (package {source.get('package')} {source.get('package_version') or ''})".rstrip()
    if kind == "scratch":
        return f"a randomly initialised `{source.get('spec')}` model"
    return f"a local model ({source.get('spec', 'unknown')})"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _metrics(ws: Workspace, version: str) -> dict[str, Any]:
    try:
        return json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _lineage_table(ws: Workspace, lineage: list[str]) -> str:
    rows = []
    for v in lineage:
        m = ws.version_manifest(v)
        rows.append([v, m.get("parent"), m.get("status"), ", ".join(m.get("new") or []) or None, m.get("steps"),
                     m.get("created")])
    return _table(["version", "parent", "status", "new increments", "steps", "created"], rows)


def _data_table(ws: Workspace, increments: list[str]) -> str:
    rows = []
    for inc in increments:
        m = ws.increment_manifest(inc)
        docs, tokens = m.get("documents") or {}, m.get("tokens") or {}
        rows.append([inc, docs.get("kept"), tokens.get("train"), tokens.get("heldout"), m.get("created")])
    return _table(["increment", "documents", "train tokens", "held-out tokens", "ingested"], rows)


def _scores_table(ws: Workspace, lineage: list[str]) -> str:
    """Per trained version: held-out perplexity after training on each increment, and forgetting."""
    rows = []
    for v in lineage:
        metrics = _metrics(ws, v)
        after, forgetting = (metrics.get("eval") or {}).get("after") or {}, metrics.get("forgetting") or {}
        for inc, scores in after.items():
            change = forgetting.get(inc)
            rows.append([v, inc, _num(scores.get("perplexity")), _pct(scores.get("accuracy")),
                         None if change is None else f"{change:+.2%}"])
    if not rows:
        return "No increment trained yet: the base model's scores are not recorded.\n"
    return ("Perplexity and top-1 accuracy of masked tokens on each increment's held-out split, right after "
            "the version was trained; forgetting is the relative perplexity change on an earlier increment "
            "during that version's training.\n\n"
            + _table(["version", "increment", "perplexity", "accuracy", "forgetting"], rows))


def _num(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"
