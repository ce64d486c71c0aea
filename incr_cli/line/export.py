"""`incr export`: one version as a self-contained folder with a model card, for serving.

One path for every format: ``export_version`` checks the version (checksums, not pruned), loads it,
writes its weights with ``write_weights`` (where a new format is added: a name in ``EXPORT_DTYPES``,
``ONNX_FORMATS`` or ``QUANTIZATIONS`` and a branch there), then config, tokenizer and a Hub-format ``README.md``,
into a folder built beside OUT and renamed to it (``workspace.folder_beside``). OUT appears whole
or not at all, and is never overwritten. Export reads the workspace only: it takes no lock.

Formats: safetensors in fp32 (as trained), fp16 or bf16 (``--dtype``), loadable by ``transformers``;
or ``--format onnx``: two ONNX graphs in fp32, for serving with ONNX Runtime, no torch needed; or
``--quantize int8``: the same graphs with int8 weights (ONNX Runtime's dynamic quantisation: weights
int8 ahead of time, one scale per output channel, activations quantised per batch at run time, integer
matrix products), for CPU serving:
- ``model.onnx``: fill-mask; ``input_ids``, ``attention_mask`` (B, T) int64 -> ``logits`` (B, T, V);
- ``encoder.onnx``: features; the same inputs -> ``last_hidden_state`` (B, T, H) and ``sentence_embedding``
  (B, H), mean-pooled and L2-normalised as ``incr embed`` does by default (no vocabulary head run).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from incr_cli import __version__
from incr_cli.errors import UsageError
from incr_cli.faults import fault_point
from incr_cli.model.packaging import packaging_files
from incr_cli.scoring.probe import main_score, recorded_task_scores
from incr_cli.scoring.tasks import MAIN
from incr_cli.store.files import folder_beside, folder_bytes
from incr_cli.store.workspace import Workspace

EXPORT_DTYPES = ("fp32", "fp16", "bf16")
FILE_FORMATS = ("safetensors", "onnx")
QUANTIZATIONS = ("int8",)
ONNX_FORMATS = ("onnx-fp32", *QUANTIZATIONS)  # the format names that write ONNX graphs
ONNX_EXTRA_HINT = "install the onnx extra: pip install 'incr-cli[onnx]'"
FILL_MASK_GRAPH, ENCODER_GRAPH = "model.onnx", "encoder.onnx"
ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OPSET = 18


@dataclass
class ExportResult:
    out: Path
    version: str
    kind: str  # the format's name: fp32, fp16, bf16 (safetensors), onnx-fp32 or int8 (ONNX)
    bytes: int
    files: list[str]

    @property
    def format(self) -> str:
        return "onnx" if self.kind in ONNX_FORMATS else "safetensors"

    @property
    def dtype(self) -> str:
        return self.kind.removeprefix("onnx-")

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "version": self.version, "dtype": self.dtype, "format": self.format,
                "bytes": self.bytes, "files": self.files}


def convert_weights(model: Any, dtype: str) -> Any:
    """The model with its weights in the export format (fp32 as trained, or fp16/bf16 casts)."""
    import torch

    casts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return model.to(casts[dtype])


def check_format(dtype: str, quantize: str | None, file_format: str = "safetensors") -> str:
    """The format's name ("fp32", "fp16", "bf16", "onnx-fp32" or "int8"), or a UsageError for a bad
    combination or a missing extra (checked before anything is loaded or written)."""
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    if file_format not in FILE_FORMATS:
        raise UsageError(f"--format {file_format}: choose one of {', '.join(FILE_FORMATS)}")
    if quantize is None and file_format == "safetensors":
        return dtype
    if quantize is None:
        if dtype != "fp32":
            raise UsageError(f"--format onnx writes fp32 graphs: leave out --dtype {dtype}, or add --quantize int8")
        require_onnx()
        return "onnx-fp32"
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZATIONS)}")
    if dtype != "fp32":
        raise UsageError(f"--quantize {quantize} starts from the fp32 weights: leave out --dtype {dtype}")
    require_onnx()
    return quantize


def export_version(ws: Workspace, version: str | None, out: Path | str, *, dtype: str = "fp32",
                   quantize: str | None = None, file_format: str = "safetensors") -> ExportResult:
    """Write ``version`` (LATEST by default) to the new folder ``out`` -> what was written.
    ``quantize="int8"`` implies ONNX."""
    out = Path(out)
    return export_to(ws, version, out, check_format(dtype, quantize, file_format), str(out.resolve()))


def export_to(ws: Workspace, version: str | None, out: Path, fmt: str, where: str,
              license_id: str | None = None) -> ExportResult:
    """``export_version`` in a format already checked, its model card saying the model is at ``where``
    (the folder, or a Hub repo id for ``push``) under ``license_id`` (default: the base's)."""
    from incr_cli.model import weights as models

    if out.exists() or out.is_symlink():
        raise UsageError(f"{out}: already exists; export never overwrites: choose a new folder or remove it")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    name = ws.resolve_version(version)
    ws.require_weights(name)
    model, tokenizer = models.load_version(ws, name)  # checksums first
    card = model_card(ws, name, fmt, where, license_id)
    with folder_beside(out, "incr-export") as tmp:
        write_weights(model, tokenizer, tmp, fmt)
        if fmt not in ONNX_FORMATS:  # SentenceTransformer(out) loads it as the model it was
            for rel, data in packaging_files(ws.version_dir(name)).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        fault_point("export.write")
    return ExportResult(out, name, fmt, folder_bytes(out), sorted(p.name for p in out.iterdir()))


def write_weights(model: Any, tokenizer: Any, folder: Path, fmt: str) -> None:
    """Weights, config and tokenizer of ``model`` in format ``fmt`` into ``folder``."""
    from incr_cli.model.weights import quiet_transformers

    with quiet_transformers():
        if fmt in ONNX_FORMATS:
            write_onnx(model, folder, quantize=fmt if fmt in QUANTIZATIONS else None)
            model.config.save_pretrained(folder)
        else:
            convert_weights(model, fmt).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- ONNX


def require_onnx() -> Any:
    """The onnxruntime package (and torch's ONNX exporter's needs), or a UsageError naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"ONNX export needs ONNX Runtime ({e.name} is not installed): {ONNX_EXTRA_HINT}") from None
    return onnxruntime


def _graphs(model: Any) -> dict[str, Any]:
    """{file name: module} of the two graphs: (ids, mask) -> logits, and -> (hidden states, embedding)."""
    from torch import nn

    from incr_cli.scoring.embed import encoder_of, pool

    class FillMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder_of(model)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            return hidden, pool(hidden, attention_mask, "mean")  # (B, H)

    return {FILL_MASK_GRAPH: (FillMask(), ["logits"]), ENCODER_GRAPH: (Encoder(), ["last_hidden_state", "sentence_embedding"])}


def write_onnx(model: Any, folder: Path, *, quantize: str | None) -> list[Path]:
    """model.onnx and encoder.onnx of ``model`` (fp32, eval mode) in ``folder``: fp32 graphs as
    torch exports them, or with ``quantize="int8"`` their dynamically quantised versions. -> the files."""
    model = model.float().eval()
    with _quiet_exporter():
        return _write_graphs(model, folder, quantize)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress to stdout (which --json owns), warns and logs; none of it is for the user."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _write_graphs(model: Any, folder: Path, quantize: str | None) -> list[Path]:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # (B, T) examples, both axes dynamic in the graph; two tensors: one passed twice would tie the inputs
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    written = []
    with tempfile.TemporaryDirectory(prefix="incr-onnx-") as scratch:
        for name, (graph, outputs) in _graphs(model).items():
            target = folder / name
            raw = target if quantize is None else Path(scratch) / name
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(graph, example, str(raw), input_names=list(ONNX_INPUTS),
                              output_names=outputs, opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                              verbose=False)
            if quantize is not None:
                # One scale per output channel: on MiniLM the embeddings' cosine to fp32 went from 0.981
                # (one scale per tensor) to 0.997, for 0.1 MB more.
                quantize_dynamic(str(raw), str(target), weight_type=QuantType.QInt8, per_channel=True)
            written.append(target)
    return written


# ----------------------------------------------------------------------------- the model card


UNKNOWN_LICENSE = "unknown"


def model_card(ws: Workspace, version: str, fmt: str, where: str, license_id: str | None = None) -> str:
    """README.md in the Hub's format: YAML metadata, then use, lineage, data, scores, tasks, recipe.
    ``where`` is the folder or repository id the usage snippet loads from; ``license_id`` overrides
    the license recorded from the base's card."""
    manifest = ws.version_manifest(version)
    lineage = ws.lineage(version)
    source = manifest.get("source") or {}
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "fill-mask"}
    if source.get("kind") == "hub":
        meta["base_model"] = source.get("id")
    meta["tags"] = ["incr", "continual-learning", "masked-lm"]
    license_id = license_id or source.get("license") or UNKNOWN_LICENSE
    meta["license"] = license_id
    front = yaml.safe_dump(meta, sort_keys=False)
    if license_id == UNKNOWN_LICENSE:
        front += "# license unknown: the base's card names none; set it (and your data's terms) before publishing\n"
    packaged = bool(packaging_files(ws.version_dir(version))) and fmt not in ONNX_FORMATS
    use = (_ONNX_USE if fmt in ONNX_FORMATS else _HF_USE + (_ST_USE if packaged else "")).replace(_WHERE, where)
    parts = [f"---\n{front}---\n",
             f"# {ws.root.name} {version}\n",
             f"A masked-language model trained continually with incr {__version__}: {len(lineage) - 1} increment(s) "
             f"on top of {_describe(source)}. {_FORMATS.get(fmt, f'Weights exported as {fmt}.')}\n",
             "## Use\n", use,
             "## Lineage\n", _lineage_table(ws, lineage),
             "## Data increments\n", _data_table(ws, manifest.get("trained_on") or []),
             "## Held-out scores and forgetting\n", _scores_table(ws, lineage),
             "## Downstream tasks\n", _tasks_table(ws, lineage),
             "## Recipe\n", "```yaml\n" + yaml.safe_dump(manifest.get("recipe") or {}, sort_keys=False) + "```\n"]
    return "\n".join(parts)


_GRAPHS = ("`model.onnx` gives fill-mask logits, `encoder.onnx` hidden states and mean-pooled, L2-normalised "
           "embeddings.")
_FORMATS = {"onnx-fp32": f"Exported as fp32 ONNX graphs for serving with ONNX Runtime: {_GRAPHS}",
            "int8": f"Exported as ONNX graphs with int8 weights (ONNX Runtime dynamic quantisation) for CPU serving: "
                    f"{_GRAPHS}"}
_WHERE = "PATH/TO/THIS/FOLDER"  # replaced by the export's folder, or the repository id it is pushed to
_HF_USE = ("```python\nfrom transformers import pipeline\n\nfill = pipeline(\"fill-mask\", "
           "model=\"PATH/TO/THIS/FOLDER\")\n```\n")
_ST_USE = ("\nIt keeps its sentence-transformers packaging (pooling, normalisation):\n\n```python\n"
           "from sentence_transformers import SentenceTransformer\n\n"
           "embeddings = SentenceTransformer(\"PATH/TO/THIS/FOLDER\").encode([\"a sentence\"])\n```\n")
_ONNX_USE = """```python
import onnxruntime as ort
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
enc = tok(["the [MASK] of it"], padding=True, return_tensors="np")
inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
logits = ort.InferenceSession("PATH/TO/THIS/FOLDER/model.onnx").run(["logits"], inputs)[0]  # (B, T, vocab)
emb = ort.InferenceSession("PATH/TO/THIS/FOLDER/encoder.onnx").run(["sentence_embedding"], inputs)[0]  # (B, hidden)
```
"""


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


def _tasks_table(ws: Workspace, lineage: list[str]) -> str:
    """Per version of the lineage: its recorded downstream task scores (``eval.tasks``; probe.py)."""
    scores = recorded_task_scores(ws, lineage)
    rows = [[v, name, s.get("kind"), MAIN.get(s.get("kind", ""), "?"), _num(main_score(s)), s.get("examples")]
            for v in lineage for name, s in scores.get(v, {}).items()]
    if not rows:
        return "No downstream task was recorded (add tasks to the recipe's eval.tasks).\n"
    return ("Main score of each downstream task (classification: out-of-fold accuracy of a logistic-regression "
            "probe on frozen mean-pooled embeddings; retrieval: MRR of cosine search), as training recorded it.\n\n"
            + _table(["version", "task", "kind", "metric", "score", "examples"], rows))


def _num(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"
