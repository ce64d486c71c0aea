"""Compression by distillation: a student with fewer layers (and optionally a smaller hidden size),
initialised from the teacher's layers and trained against the line's LATEST, written as v0000 of a
new model line that takes future increments like any line.

Initialisation (DistilBERT's recipe): student layer j starts as teacher layer ``layer_map(L, K)[j]``
(every (L/K)-th layer from the first: layers 0, 2, 4 of 6); embeddings and the MLM head are the
teacher's. With a smaller hidden size every weight is the teacher's, cut to the student's shape
(the leading rows and columns; attention heads keep their size, so whole heads are kept).

Training runs the same step as ``train-increment`` (``step.train_step``) over the same loss terms:
MLM on the line's data + the KL to the teacher at masked positions (``distill.alpha``,
``distill.temperature``) + the hidden-state term (``distill.hidden_weight``, ``distill.hidden_loss``)
when student and teacher have the same hidden size. The data is every increment the teacher was
trained on; the budget is ``train.steps`` (or ``train.epochs`` over that data).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from incr_cli.config.recipe import Recipe, recipe_to_dict
from incr_cli.data.shards import IncrementShards, open_increment
from incr_cli.errors import UsageError
from incr_cli.model.packaging import packaging_files
from incr_cli.model.weights import load_version, quiet_transformers, save_version, software_versions
from incr_cli.progress import Quiet, Reporter
from incr_cli.runtime import device as devices
from incr_cli.runtime.device import Placement
from incr_cli.runtime.distributed import DistContext
from incr_cli.scoring.embed import encoder_speed
from incr_cli.store.files import folder_beside
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import tokenizer_inputs
from incr_cli.training.plan import TrainingData, budget
from incr_cli.training.terms import HiddenDistill, LogitDistill, MlmNew

_LAYER_RE = re.compile(r"(\.(?:layer|layers)\.)(\d+)(\.)")


# ----------------------------------------------------------------------------- the student


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer each student layer starts from: every (L/K)-th from the first (6 -> 3: 0, 2, 4)."""
    if not 1 <= student_layers <= teacher_layers:
        raise UsageError(f"--layers {student_layers}: choose 1 to {teacher_layers} (the teacher's layer count)")
    return [math.floor(j * teacher_layers / student_layers) for j in range(student_layers)]


def _config_keys(config: Any) -> tuple[str, str, str, str]:
    """(layers, hidden, heads, intermediate) attribute names: BERT/RoBERTa style, or DistilBERT's."""
    if hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size"):
        return "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"
    if hasattr(config, "n_layers") and hasattr(config, "dim"):
        return "n_layers", "dim", "n_heads", "hidden_dim"
    raise UsageError(f"{type(config).__name__}: incr compress knows BERT-, RoBERTa- and DistilBERT-style configs")


def student_config(teacher_config: Any, layers: int, hidden: int | None) -> Any:
    """The teacher's config with ``layers`` layers and, when given, hidden size ``hidden`` (same head size;
    the feed-forward size scaled with it)."""
    k_layers, k_hidden, k_heads, k_inter = _config_keys(teacher_config)
    config = copy.deepcopy(teacher_config)
    setattr(config, k_layers, layers)
    if hidden is None or hidden == getattr(config, k_hidden):
        return config
    width, heads = getattr(config, k_hidden), getattr(config, k_heads)
    head_size = width // heads
    if not 0 < hidden < width or hidden % head_size:
        raise UsageError(f"--hidden {hidden}: choose a multiple of the head size {head_size} below the teacher's "
                         f"hidden size {width}")
    setattr(config, k_hidden, hidden)
    setattr(config, k_heads, hidden // head_size)
    setattr(config, k_inter, getattr(config, k_inter) * hidden // width)
    return config


def build_student(teacher: nn.Module, layers: int, hidden: int | None = None) -> tuple[nn.Module, list[int]]:
    """A masked-LM student initialised from ``teacher`` -> (student in eval mode, teacher layer of each layer)."""
    from transformers import AutoModelForMaskedLM

    k_layers = _config_keys(teacher.config)[0]
    picked = layer_map(getattr(teacher.config, k_layers), layers)
    config = student_config(teacher.config, layers, hidden)
    with torch.random.fork_rng(devices=[]):  # weights not copied below would come from here: none are
        torch.manual_seed(0)
        student = AutoModelForMaskedLM.from_config(config, attn_implementation=teacher.config._attn_implementation)
    source = teacher.state_dict()
    state = {}
    for name, tensor in student.state_dict().items():
        teacher_name = _LAYER_RE.sub(lambda m: f"{m.group(1)}{picked[int(m.group(2))]}{m.group(3)}", name)
        if teacher_name not in source:
            raise UsageError(f"cannot initialise the student's {name} from the teacher (no {teacher_name})")
        state[name] = source[teacher_name][tuple(slice(0, n) for n in tensor.shape)].clone()
    student.load_state_dict(state)
    return student.float().eval(), picked


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- distillation


def compress_terms(recipe: Recipe, same_width: bool) -> list[Any]:
    """MLM + logit KD + hidden-state distillation (only when the hidden sizes match)."""
    terms: list[Any] = [MlmNew()]
    if recipe.distill.alpha > 0:
        terms.append(LogitDistill(recipe.distill.alpha, recipe.distill.temperature))
    if recipe.distill.hidden_weight > 0 and same_width:
        terms.append(HiddenDistill(recipe.distill.hidden_weight, recipe.distill.hidden_loss))
    return terms


def _plan(ws: Workspace, teacher_version: str, recipe: Recipe) -> Any:
    """The plan of distilling on every increment the teacher saw, all of it as new data (no replay):
    the budget of ``train-increment`` (``plan.budget``) over that data."""
    data = ws.trained_on(teacher_version)
    if not data:
        raise UsageError(f"{teacher_version} has not been trained on any increment; there is no data to distil on: "
                         "ingest and train-increment first")
    return budget(ws, recipe, teacher_version, TrainingData(data, []))


@dataclass(frozen=True)
class _Distillation:
    """One compression, what its phases share: the teacher (version, model) and the student, the
    tokenizer they share, the data (every increment the teacher saw), the plan and where it runs."""
    ws: Workspace
    teacher_version: str
    teacher: nn.Module
    student: nn.Module
    tokenizer: Any
    shards: dict[str, IncrementShards]
    plan: Any  # training.plan.IncrementPlan
    recipe: Recipe
    place: Placement


def distil(job: _Distillation, reporter: Reporter) -> tuple[Any, Any, list]:
    """Train the student against the teacher for ``plan.steps`` steps -> (run, state, loss term names)."""
    from incr_cli.training.step import RunSpec, TrainState, build_run, log_line, train_step

    recipe, plan, device = job.recipe, job.plan, job.place.device
    width = _config_keys(job.student.config)[1]
    terms = compress_terms(recipe, getattr(job.student.config, width) == getattr(job.teacher.config, width))
    spec = RunSpec(recipe, plan, [job.shards[d] for d in plan.new], [], tokenizer_inputs(job.tokenizer, recipe), terms)
    torch.manual_seed(recipe.train.seed * 7919)  # dropout stream, as train-increment seeds it
    run, _ = build_run(job.student, spec, place=job.place, ctx=DistContext(0, 1, device), reporter=reporter,
                       teacher=job.teacher)
    state = TrainState(first_bad_step=torch.tensor(-1, device=device))
    clock, info = time.perf_counter(), ""
    with reporter.progress("distilling", total=plan.steps, unit="steps") as bar:
        while state.step < plan.steps:
            train_step(run, state, check_loss=True)
            if state.step % recipe.train.log_every == 0 or state.step == plan.steps:
                now = time.perf_counter()
                state.train_seconds += now - clock
                line = log_line(run, state, now - clock)
                clock = now
                state.log.append(line)
                info = f"loss {line['total']:.4f}"
            bar.advance(1, info)
    return run, state, run.term_names


# ----------------------------------------------------------------------------- measuring


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


# ----------------------------------------------------------------------------- the new line


@dataclass
class CompressResult:
    into: Path
    teacher: str
    metrics: dict[str, Any] = field(default_factory=dict)


def _copy_data(ws: Workspace, dest: Workspace) -> None:
    """Increments (immutable, checksummed: hard links where the filesystem allows) and the dedup index."""
    if ws.data.is_dir():
        def link_or_copy(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(ws.data, dest.data, copy_function=link_or_copy,
                        ignore=lambda folder, names: [n for n in names if n.startswith("index.sqlite")])
    if ws.index_path.exists():
        import sqlite3

        with sqlite3.connect(ws.index_path) as src, sqlite3.connect(dest.index_path) as dst:
            src.backup(dst)  # a consistent copy even while an ingest writes (no lock needed to read)


def write_line(ws: Workspace, into: Path, student: nn.Module, tokenizer: Any, manifest: dict[str, Any],
               metrics: dict[str, Any]) -> None:
    """``into`` as a new workspace whose v0000 (LATEST) is the student, with the line's recipe and data;
    built beside it and renamed into place, so it appears whole or not at all."""
    with folder_beside(into, "tmp") as tmp:
        new = Workspace(tmp)
        shutil.copy2(ws.recipe_path, new.recipe_path)
        _copy_data(ws, new)
        # the packaging's pooling holds for a student of the teacher's width (its dimension is named there)
        teacher = ws.version_dir(manifest["teacher"]["version"])
        width = json.loads((teacher / "config.json").read_text(encoding="utf-8")).get("hidden_size")
        packaging = packaging_files(teacher) if student.config.hidden_size == width else {}
        save_version(new, "v0000", student, tokenizer, manifest,
                     {**packaging, "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode()})
        new.move_latest("v0000", command="compress", reason=f"student distilled from {ws.root}")
        shutil.rmtree(new.staging, ignore_errors=True)  # its verify cache names the temporary paths


def check_destination(into: Path) -> None:
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise UsageError(f"--into {into}: exists and is not empty; choose a new folder for the student's line")
    if not into.parent.is_dir():
        raise UsageError(f"--into {into}: the folder {into.parent} does not exist")
    if into.exists():
        into.rmdir()  # an empty folder: the finished line is renamed onto its name


@dataclass(frozen=True)
class StudentShape:
    """The student's size: ``layers`` encoder layers and, when given, a smaller ``hidden`` size."""
    layers: int
    hidden: int | None = None


def compress(ws: Workspace, into: Path, recipe: Recipe, *, shape: StudentShape, version: str | None = None,
             reporter: Reporter | None = None) -> CompressResult:
    """Distil ``version`` (LATEST) of ``ws`` into a student of ``shape``, written as v0000 of the new line
    ``into`` (see the module docstring). -> CompressResult with the metrics written."""
    reporter = reporter or Quiet()
    into = Path(into)
    check_destination(into)
    teacher_version = ws.resolve_version(version)
    plan = _plan(ws, teacher_version, recipe)
    place = Placement.resolve(recipe.runtime.device, recipe.runtime.precision)
    devices.configure_threads(recipe.runtime.num_threads)
    teacher, tokenizer = load_version(ws, teacher_version, recipe=recipe, device=str(place.device))
    student, picked = build_student(teacher, shape.layers, shape.hidden)
    shards = {d: open_increment(ws, d) for d in plan.new}
    reporter.log(f"distilling {teacher_version} ({parameter_count(teacher):,} parameters) into {shape.layers} layers "
                 f"from its layers {picked} ({parameter_count(student):,} parameters): {plan.steps} steps on "
                 f"{', '.join(plan.new)}, {place.device} {place.precision}")
    job = _Distillation(ws, teacher_version, teacher, student, tokenizer, shards, plan, recipe, place)
    run, state, terms = distil(job, reporter)
    student.eval()
    metrics = _measure(job)
    metrics.update(steps=state.step, tokens=state.tokens, train_seconds=round(state.train_seconds, 3),
                   loss_terms=terms, student_layers_from_teacher=picked, train_log=state.log,
                   device=str(place.device), precision=place.precision)
    manifest = {"version": "v0000", "parent": None,
                "source": {"kind": "compressed", "teacher": str(ws.root.resolve()), "version": teacher_version,
                           "from_layers": picked},
                "teacher": {"workspace": str(ws.root.resolve()), "version": teacher_version,
                            "weights_sha256": ws.version_manifest(teacher_version)["files"]
                            .get("model.safetensors", {}).get("sha256")},
                "head_initialised": False, "trained_on": list(plan.new), "new": [], "replay": [],
                "status": "base", "promoted": True, "recipe": recipe_to_dict(recipe),
                "seeds": {"train": recipe.train.seed}, "software": software_versions(), "device": str(place.device),
                "precision": place.precision, "steps": state.step}
    write_line(ws, into, student, tokenizer, manifest, metrics)
    return CompressResult(into, teacher_version, metrics)


def _measure(job: _Distillation) -> dict[str, Any]:
    """Parameters, weights on disk, encoder tokens/s and held-out scores of teacher and student."""
    import tempfile

    from incr_cli.scoring.score import held_out_scores

    ws, teacher, student, shards, recipe = job.ws, job.teacher, job.student, job.shards, job.recipe
    increments = list(shards)
    scores = {"teacher": held_out_scores(teacher, job.tokenizer, ws, increments, recipe, job.place),
              "student": held_out_scores(student, job.tokenizer, ws, increments, recipe, job.place)}
    rows = [torch.from_numpy(shards[d].heldout[: recipe.eval.max_sequences].astype("int64")) for d in increments]
    ids = torch.cat([r for r in rows if r.ndim == 2 and len(r)]) if any(len(r) for r in rows) else None
    speed = {} if ids is None else encoder_speed({"teacher": teacher, "student": student}, ids,
                                                 int(shards[increments[0]].pad_id),
                                                 batch_size=recipe.eval.batch_size, device=job.place.device)
    with tempfile.TemporaryDirectory(prefix="incr-size-") as tmp, quiet_transformers():
        student.save_pretrained(tmp)
        student_bytes = weights_bytes(Path(tmp))
    k = _config_keys(student.config)
    teacher_version = job.teacher_version
    return {"kind": "compression", "teacher": {
                "workspace": str(ws.root.resolve()), "version": teacher_version, "parameters": parameter_count(teacher),
                "layers": getattr(teacher.config, k[0]), "hidden": getattr(teacher.config, k[1]),
                "weights_bytes": weights_bytes(ws.version_dir(teacher_version)),
                "tokens_per_second": speed.get("teacher")},
            "student": {"parameters": parameter_count(student), "layers": getattr(student.config, k[0]),
                        "hidden": getattr(student.config, k[1]), "weights_bytes": student_bytes,
                        "tokens_per_second": speed.get("student")},
            "speedup": (speed["student"] / speed["teacher"]) if speed.get("teacher") else None,
            "speed_rows": 0 if ids is None else int(ids.shape[0]), "eval": scores}


__all__ = ["compress", "StudentShape", "build_student", "layer_map", "student_config", "CompressResult"]
