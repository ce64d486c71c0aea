"""Recipes: the typed, frozen schema, YAML loading, ``key=value`` overrides and validation.

A recipe is loaded once, at the edge, into frozen dataclasses. Every problem in a file (unknown
key, wrong type, value out of range) is collected and raised together as one ``RecipeError`` whose
lines name the dotted key path, with a "did you mean" for typos.

Layers, lowest first: schema defaults < the YAML file < command-line overrides < strategy preset.
A strategy preset (``strategy.name``) fixes the keys that define it (``naive`` sets
``distill.alpha=0`` and ``replay.ratio=0``); ``incr recipe show`` says what it set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from incr_cli.config.presets import PRESETS
from incr_cli.errors import RecipeError, clip, shown

# What a recipe (a file or an override) may hold. A real one is sections of keys with short values,
# four levels deep and a few hundred values at most; far past that it is a mistake or an attack:
# 20,000 nested lists overflow Python's stack, nine levels of nine YAML aliases ("billion laughs")
# expand to 387 million values. Each limit is refused with the key path where it was crossed.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 10_000  # every key and value, each alias counted as the whole value it names
MAX_YAML_SCALAR_CHARS = 4096


class RecipeTooBig(Exception):
    """A recipe past one of the limits above: ``where`` is the key path inside the YAML text
    ("train.freeze[0]", "" for the whole text), ``what`` the limit crossed."""

    def __init__(self, where: str, what: str):
        self.where, self.what = where, what
        super().__init__(self.problem())

    def problem(self, prefix: str = "") -> str:
        """The problem line, with the key path under ``prefix`` (an override's key)."""
        where = self.where
        if prefix:
            where = f"{prefix}{'' if not where or where.startswith('[') else '.'}{where}"
        return f"{clip(where) or 'the recipe'}: {self.what}"


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats (``1e-4`` is a number, not the string PyYAML 1.1 makes of it),
    within the limits above (aliases counted as what they expand to)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._path: list[Any] = []  # the key or index of each node from the top to the one being composed
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (depth, values), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            if len(self._path) > MAX_YAML_DEPTH:  # before PyYAML recurses further
                raise RecipeTooBig(self._where(), f"nested more than {MAX_YAML_DEPTH} levels deep (the limit)")
            alias = self.check_event(yaml.AliasEvent)
            node = super().compose_node(parent, index)
            if alias and id(node) not in self._measured:
                raise RecipeTooBig(self._where(), "an alias inside the value it names would expand without end")
            self._check(node)
            return node
        finally:
            self._path.pop()

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # The scanner tracks a possible key per open bracket and rescans them all on every token:
        # 1,000 open brackets cost seconds before the composer could refuse them, so refuse them here.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise RecipeTooBig(self._where(), f"nested more than {MAX_YAML_DEPTH} levels deep (the limit)")
        super().fetch_flow_collection_start(token_class)

    def _check(self, node: Any) -> None:
        if id(node) not in self._measured:
            if isinstance(node, yaml.ScalarNode):
                if len(node.value) > MAX_YAML_SCALAR_CHARS:
                    raise RecipeTooBig(self._where(), f"a value of {len(node.value):,} characters "
                                                      f"(the limit is {MAX_YAML_SCALAR_CHARS:,})")
                self._measured[id(node)] = (1, 1)
            else:
                pairs = node.value if isinstance(node, yaml.MappingNode) else [(c,) for c in node.value]
                sizes = [self._measured[id(c)] for pair in pairs for c in pair]
                self._measured[id(node)] = (1 + max((d for d, _ in sizes), default=0), 1 + sum(v for _, v in sizes))
        depth, values = self._measured[id(node)]
        if len(self._path) - 1 + depth > MAX_YAML_DEPTH:
            raise RecipeTooBig(self._where(), f"nested more than {MAX_YAML_DEPTH} levels deep with its aliases "
                                              "(the limit)")
        if values > MAX_YAML_VALUES:
            raise RecipeTooBig(self._where(), f"{values:,} keys and values with its aliases expanded "
                                              f"(the limit is {MAX_YAML_VALUES:,})")

    def _where(self) -> str:
        """The dotted key path of the node being composed, e.g. ``train.freeze[0]``."""
        text = ""
        for step in self._path[1:]:
            text += f"[{step}]" if isinstance(step, int) else f".{step}" if step is not None else ".<key>"
        return text.lstrip(".")

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            # PyYAML's own constructors fail this way on e.g. `2001-13-45` or `!!bool maybe`
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {shown(node.value)} as {node.tag} "
                                                    f"({clip(str(exc))})", node.start_mark) from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """YAML ``text`` as Python values; ``yaml.YAMLError`` when it is not YAML, ``RecipeTooBig`` past the limits."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


@dataclass(frozen=True)
class Open:
    """An open end of a knob's range: the bound itself is not allowed (``lo=Open(0.0)``: above 0)."""

    at: float


def knob(default: Any, help: str, *, lo: float | Open | None = None, hi: float | Open | None = None,
         choices: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> Any:
    """A recipe key: its default, a one-line meaning (used by the reference in docs/recipes.md) and its range
    (bounds included unless given as ``Open``). ``choices`` may be a function, called when the key is checked."""
    meta = {"help": help, "lo": lo.at if isinstance(lo, Open) else lo, "hi": hi.at if isinstance(hi, Open) else hi,
            "lo_open": isinstance(lo, Open), "hi_open": isinstance(hi, Open),
            "choices": choices if callable(choices) else tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choices(meta: dict) -> tuple[str, ...] | None:
    choices = meta["choices"]
    return tuple(choices()) if callable(choices) else choices


def strategy_presets() -> dict[str, dict[str, Any]]:
    """{strategy name: the recipe keys its preset fixes} (``presets.PRESETS``, a copy)."""
    return {name: dict(preset) for name, preset in PRESETS.items()}


@dataclass(frozen=True)
class ModelConfig:
    max_seq_len: int = knob(128, "Length of the packed token sequences (ingest and training).", lo=8, hi=8192)
    trust_remote_code: bool = knob(False, "Allow a hub model's own Python code to run. Off unless you trust the source.")
    attn_implementation: str = knob("auto", "Attention kernel: auto (the fastest the model supports), sdpa (falls back to eager where unsupported) or eager.", choices=["auto", "sdpa", "eager"])


@dataclass(frozen=True)
class DataConfig:
    heldout_fraction: float = knob(0.05, "Share of each increment's documents held out for evaluation (by document hash).", lo=0.0, hi=0.5)
    heldout_min_docs: int = knob(8, "At least this many documents are held out per increment (when it has twice as many).", lo=0)
    min_doc_chars: int = knob(1, "Documents shorter than this (after cleaning) are skipped.", lo=1)
    max_doc_chars: int = knob(200_000, "Documents longer than this are cut to this many characters (counted in the manifest).", lo=16)
    sample: Optional[int] = knob(None, "Train on k randomly drawn new sequences instead of all of them (seeded).", lo=1)
    unknown_warn: float = knob(0.01, "Ingest warns when more than this share of an increment's tokens are unknown ([UNK]) or its characters map to no token.", lo=0.0, hi=1.0)
    unknown_max: float = knob(0.2, "Ingest refuses (exit 2) above this share of unknown tokens or dropped characters, unless --allow-unknown.", lo=0.0, hi=1.0)
    batch_docs: int = knob(1000, "Documents ingest cleans, deduplicates and tokenizes at a time: with the tokenizer, what ingest holds in memory, whatever the corpus size (docs/performance.md measures both). The written increment does not depend on it.", lo=1, hi=1_000_000)


@dataclass(frozen=True)
class VocabConfig:
    max_new_tokens: int = knob(0, "Ingest adds up to this many of the increment's most frequent words that the tokenizer splits into several pieces (or maps to [UNK]) as new tokens; 0 = off; `--extend-vocab N` sets it.", lo=0)
    min_frequency: int = knob(5, "A word must occur at least this many times in the increment's training documents to be added.", lo=1)
    min_pieces: int = knob(2, "A word must be cut into at least this many pieces (or be [UNK]) to be added.", lo=2)


@dataclass(frozen=True)
class MaskingConfig:
    probability: float = knob(0.15, "Share of (non-special) tokens masked per sequence.", lo=Open(0.0), hi=1.0)
    per_sequence: Optional[int] = knob(None, "Mask exactly this many tokens per sequence instead (like max_predictions_per_seq).", lo=1)
    mask_token_ratio: float = knob(0.8, "Of the chosen positions, share replaced by [MASK].", lo=0.0, hi=1.0)
    random_token_ratio: float = knob(0.1, "Of the chosen positions, share replaced by a random token (the rest keep theirs).", lo=0.0, hi=1.0)
    whole_word: bool = knob(False, "Mask all sub-word pieces of a chosen word together; Chinese words come from jieba at ingest (extra `zh`).")


@dataclass(frozen=True)
class TrainConfig:
    steps: Optional[int] = knob(None, "Optimizer steps for one increment; when unset, `epochs` over the new data decides.", lo=1)
    epochs: float = knob(1.0, "Passes over the new data when `steps` is unset.", lo=Open(0.0))
    max_tokens: Optional[int] = knob(None, "Cap on tokens processed in one increment (new + replay).", lo=1)
    batch_size: int = knob(32, "New sequences per micro-batch, the replayed ones coming on top (`replay.on_top`, the default); with `replay.on_top=false`, new + replayed.", lo=1)
    grad_accum: int = knob(1, "Micro-batches per optimizer step.", lo=1)
    lr: float = knob(5e-5, "Peak learning rate (AdamW).", lo=Open(0.0), hi=1.0)
    weight_decay: float = knob(0.01, "AdamW weight decay (never applied to biases and LayerNorm).", lo=0.0)
    warmup_ratio: float = knob(0.06, "Share of the steps spent in linear warm-up.", lo=0.0, hi=1.0)
    schedule: str = knob("wsd", "Decay after warm-up, in every increment (each re-warms and re-decays): cosine, linear, constant, or wsd (the peak rate until the last `decay_ratio` of the steps, then a linear decay).", choices=["cosine", "linear", "constant", "wsd"])
    decay_ratio: float = knob(0.2, "wsd: share of the steps, at the end, spent decaying linearly to `min_lr_ratio`.", lo=Open(0.0), hi=1.0)
    min_lr_ratio: float = knob(0.0, "Final learning rate as a share of `lr`.", lo=0.0, hi=1.0)
    max_grad_norm: float = knob(1.0, "Gradient clipping norm (0 = off).", lo=0.0)
    adam_beta1: float = knob(0.9, "AdamW beta1.", lo=0.0, hi=Open(1.0))
    adam_beta2: float = knob(0.999, "AdamW beta2.", lo=0.0, hi=Open(1.0))
    freeze: list[str] = knob([], "Regular expressions; parameters whose name matches one are frozen.")
    freeze_lower_layers: int = knob(0, "Freeze the embeddings and this many lowest encoder layers (0 = none).", lo=0)
    seed: int = knob(0, "Seed of sampling, masking and dropout.", lo=0)
    log_every: int = knob(10, "Steps between lines of train_log.jsonl (losses are read from the device only then).", lo=1)


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = knob(1.0, "Weight of the KL term between the frozen parent (teacher) and the student at the masked positions of `rows` (1.0 = replay.ratio / (1 - replay.ratio) at the default ratio 0.5: a replayed token weighs what a new one does; 0.33 at ratio 0.25, the default before the long-line measurements of make stream; 0.5 before that).", lo=0.0)
    temperature: float = knob(2.0, "Softmax temperature T of distillation (the term is scaled by T^2).", lo=Open(0.0))
    hidden_weight: float = knob(0.0, "Weight of the hidden-state term between student and teacher (0 = off).", lo=0.0)
    hidden_loss: str = knob("mse", "Distance of the hidden-state term.", choices=["mse", "cosine"])
    rows: str = knob("replay", "Rows the KL term distils on: replay (the replayed rows only, so the new text is learned "
                   "as a plain fine-tune would; no replay rows = no KL term), new (the new rows only) or all (every "
                   "row, the behaviour before the defaults changed: it holds the new rows to the teacher too).",
                   choices=["replay", "new", "all"])


@dataclass(frozen=True)
class ReplayConfig:
    ratio: float = knob(0.5, "Share of each batch drawn from earlier increments of the lineage (0.25 before make stream's eight-domain line showed 0.5 with the wsd schedule ending every domain below a joint retrain; for a weak shift less suffices).", lo=0.0, hi=Open(1.0))
    on_top: bool = knob(True, "Add the replayed rows to `train.batch_size` new rows (round(batch_size * ratio / (1 - ratio)) of them, still `ratio` of the larger batch) instead of taking them out of it: every step learns from as many new rows as a plain fine-tune does, at 1 / (1 - ratio) the student compute per step (false: the replayed rows take `ratio` of the batch, the behaviour before the second change of the defaults, which learned the Python docs to 1.15x the plain fine-tune's perplexity).")
    split: str = knob("size", "How the replayed rows are split over the earlier increments of the lineage: size (each row drawn uniformly from all earlier rows, so an increment gets its share of the rows and a small or old one fades as the line grows) or increment (every earlier increment the same share, 1/K, whatever its size). train-increment warns when an increment would get no replayed row.", choices=["size", "increment"])
    weight: float = knob(1.0, "Weight of the MLM loss on replayed sequences, each term being a mean over its own masked tokens: 1.0 = ratio / (1 - ratio) at the default ratio 0.5, so a replayed token weighs what a new one does (0.33 at ratio 0.25). Change it with `ratio`.", lo=0.0)


@dataclass(frozen=True)
class MergeConfig:
    weight: float = knob(1.0, "Average the trained weights with the parent's before the version is scored and written: theta = weight * trained + (1 - weight) * parent (WiSE-FT); 1 = no averaging. With `choose`: the lowest weight tried.", lo=Open(0.0), hi=1.0)
    choose: bool = knob(False, "Choose the weight on held-out data: of 1.0, 0.9, ... down to `weight`, the one with the lowest mean of the new increments' held-out loss and the earlier increments' (half each), scored on held-out sequences past the first eval.max_sequences (so the scores eval and the gate report stay unseen); metrics.json records every candidate (`merge`).")
    sequences: int = knob(64, "Held-out sequences per increment of the gate's sample that `choose` scores each weight on.", lo=1)


@dataclass(frozen=True)
class GateConfig:
    max_forgetting: Optional[float] = knob(None, "Largest allowed relative perplexity increase on any earlier increment (0.1 = +10%).", lo=0.0)
    min_improvement: Optional[float] = knob(None, "Smallest required relative perplexity decrease on the new data (0.05 = -5%).", lo=-1.0, hi=1.0)
    task_max_drop: float = knob(0.02, "Largest allowed drop of a task's main score (classification: accuracy; retrieval: MRR) from the parent's, in points of that score (0.02 = 2 points); a drop is rejected only when it is also outside the paired 95% bootstrap interval (noise). Per task: `max_drop`, `gate: false`.", lo=0.0, hi=1.0)
    tasks: bool = knob(True, "Gate on the recipe's downstream tasks (false: score them, never reject on them).")
    max_embedding_drift: Optional[float] = knob(None, "Largest allowed embedding drift (1 - mean cosine of a held-out sequence's parent and new embeddings) on any increment of the lineage (0.05 = cosine >= 0.95).", lo=0.0, hi=2.0)


TASK_KINDS = ("classification", "retrieval")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TaskConfig:
    """A downstream task a version is judged by (``eval.tasks``; ``incr_cli/tasks.py`` reads its file)."""

    name: str = knob("", "Name of the task in tables, metrics.json and the gate (letters, digits, `_.-`).")
    path: str = knob("", "Labelled file, JSON Lines or CSV/TSV with a header; relative to the recipe file that names it.")
    kind: str = knob("classification", "classification: a linear probe on frozen embeddings predicts the label; "
                     "retrieval: each query's relevant text is searched among all of them by cosine.", choices=TASK_KINDS)
    text_field: str = knob("text", "Field of the text (classification) or of the relevant text (retrieval).")
    label_field: str = knob("label", "Field of the label (classification; strings or integers).")
    group_field: Optional[str] = knob(None, "Field whose value keeps rows together in one fold (e.g. the source document).")
    query_field: str = knob("query", "Field of the query (retrieval).")
    gate: bool = knob(True, "The task gate protects this task (see `gate.task_max_drop`).")
    max_drop: Optional[float] = knob(None, "This task's margin instead of `gate.task_max_drop`.", lo=0.0, hi=1.0)


TASK_REQUIRED = ("name", "path")


@dataclass(frozen=True)
class ProbeConfig:
    folds: int = knob(5, "Folds of the seeded, group-aware, stratified cross-validation of a classification probe.", lo=2, hi=20)
    C: float = knob(0.1, "Inverse L2 regularisation of the logistic-regression probe (scikit-learn's C), on standardised embeddings; 0.1: on MiniLM-L6 and the Python-docs task as accurate as 1.0 or better and faster to fit (results/probe-pydocs.md).", lo=Open(0.0))
    max_iter: int = knob(1000, "Iterations of the probe's solver (lbfgs).", lo=10)
    max_examples: int = knob(4000, "Rows of a task file scored (a seeded sample when there are more; for retrieval, pairs).", lo=2)
    batch_size: int = knob(64, "Texts per embedding batch.", lo=1)
    max_length: int = knob(128, "Tokens per text embedded (longer texts are cut; the share cut is reported).", lo=8, hi=8192)
    pooling: str = knob("mean", "Pooling of the last hidden layer into a text embedding.", choices=["mean", "cls"])
    seed: int = knob(0, "Seed of the folds, the sample and the bootstrap.", lo=0)
    bootstrap: int = knob(1000, "Seeded bootstrap resamples of the examples behind each confidence interval (95%).", lo=100)


@dataclass(frozen=True)
class EvalConfig:
    max_sequences: int = knob(256, "Held-out sequences scored per increment (the first ones, so results are comparable).", lo=1)
    batch_size: int = knob(64, "Sequences per evaluation batch.", lo=1)
    seed: int = knob(1234, "Seed of the evaluation masks (combined with the increment id, never the version).", lo=0)
    tasks: list[TaskConfig] = knob([], "Downstream tasks every version is scored on (a list of mappings with the `eval.tasks[]` keys below); the task gate protects each.")
    gate_sequences: Optional[int] = knob(256, "Budget of held-out sequences train-increment scores for the gate: every increment while they fit, then the new ones, the newest earlier ones (half the budget, at least one) and a fixed seeded sample of older ones (the other half, at least one), recorded in metrics.json; null = all. `incr eval` scores everything.", lo=1)


@dataclass(frozen=True)
class DriftConfig:
    max_sequences: int = knob(128, "Held-out sequences per lineage increment embedded with the parent and the new version to measure embedding drift (the first ones; 0 = off).", lo=0)
    pooling: str = knob("mean", "Pooling of those embeddings (as `incr embed --pooling`).", choices=["mean", "cls"])


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = knob("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    precision: str = knob("auto", "auto picks bf16 autocast on CUDA with bf16 and on CPUs with bf16 matrix instructions (AMX / AVX512-BF16), else fp32; weights, optimizer and losses stay fp32; metrics.json records the choice and why.",
                          choices=["auto", "fp32", "bf16"])
    compile: bool = knob(False, "Wrap the student in torch.compile.")
    save_every: int = knob(200, "Steps between resumable-state saves (0 = only on interruption).", lo=0)
    num_threads: Optional[int] = knob(None, "CPU threads for torch (default: all cores, no oversubscription).", lo=1)
    collective_timeout: float = knob(1800.0, "Seconds a torchrun rank waits for the others at a collective before it gives up with a clear error (a rank died, hung or was stopped); longer than rank 0's evaluation and version write.", lo=1.0)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = knob("replay+distill", "Continual-learning strategy preset (see `incr recipe show`).",
                     choices=lambda: list(strategy_presets()))


@dataclass(frozen=True)
class EwcConfig:
    weight: float = knob(1.0e5, "Strength lambda of the EWC penalty lambda/2 * sum F_i (theta_i - theta*_i)^2 (the empirical Fisher of MLM is small: 1e5 makes the penalty of the order of the MLM loss).", lo=0.0)
    fisher_batches: int = knob(16, "Batches of the parent's data used to estimate the diagonal Fisher.", lo=1)


@dataclass(frozen=True)
class TrackingConfig:
    # No key names a place (a recipe never directs writes outside the workspace): TensorBoard writes
    # WORKSPACE/tensorboard, MLflow goes to $MLFLOW_TRACKING_URI, else WORKSPACE/mlflow.db.
    sinks: list[str] = knob([], "Dashboards each increment is sent to (each an optional extra: pip install incr-cli[tensorboard,mlflow]); `--track` sets it.",
                            choices=["tensorboard", "mlflow"])
    mlflow_experiment: str = knob("incr", "MLflow experiment holding one run per increment.")
    registered_model: Optional[str] = knob(None, "Register each promoted version in MLflow's model registry under this name, alias `current` (null = no registration).")
    flush_timeout: float = knob(60.0, "Seconds the command waits at its end for the sinks to finish sending (they never hold up training).", lo=0.0)


@dataclass(frozen=True)
class RetentionConfig:
    keep_last: Optional[int] = knob(None, "`incr gc` keeps the weights of this many newest versions and of the last this many LATEST versions (rollback targets); null = gc needs --keep-last.", lo=1)


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ewc: EwcConfig = field(default_factory=EwcConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}  # type: ignore[misc]


@dataclass(frozen=True)
class KeyInfo:
    path: str  # dotted, e.g. "train.lr"
    type_name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None
    range: str


def iter_keys() -> Iterator[KeyInfo]:
    """Every recipe key with its type, default and meaning, in schema order (the reference in docs/recipes.md)."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            yield KeyInfo(f"{section}.{f.name}", _type_name(hints[f.name]), default, f.metadata["help"],
                          _choices(f.metadata), _range_text(f.metadata))
            if hints[f.name] == list[TaskConfig]:
                yield from _task_keys(f"{section}.{f.name}[]")


def _task_keys(prefix: str) -> Iterator[KeyInfo]:
    hints = typing.get_type_hints(TaskConfig)
    for f in dataclasses.fields(TaskConfig):
        required = " Required." if f.name in TASK_REQUIRED else ""
        yield KeyInfo(f"{prefix}.{f.name}", _type_name(hints[f.name]), None if required else f.default,
                      f.metadata["help"] + required, _choices(f.metadata), _range_text(f.metadata))


def _type_name(tp: Any) -> str:
    if tp == list[TaskConfig]:
        return "list of tasks"
    inner, optional = _unwrap_optional(tp)
    name = {int: "int", float: "float", bool: "bool", str: "str"}.get(inner) or str(inner).replace("typing.", "")
    return f"{name} or null" if optional else name


def _range_text(meta: dict) -> str:
    if choices := _choices(meta):
        return ", ".join(choices)
    lo, hi = meta["lo"], meta["hi"]
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta['lo_open'] else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if meta['hi_open'] else '<='} {hi:g}")
    return ", ".join(parts)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _check_value(path: str, value: Any, tp: Any, meta: dict) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``tp`` (int -> float allowed) and check its range; return (value, problem)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        return (None, None) if optional else (None, f"{path}: must not be null")
    if inner == list[TaskConfig]:
        return _check_tasks(path, value)
    if typing.get_origin(inner) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, f"{path}: expected a list of strings, got {shown(value)}"
        choices = _choices(meta)
        unknown = [v for v in value if choices and v not in choices]
        if unknown:
            hint = _did_you_mean(unknown[0], choices)
            return None, f"{path}: {shown(unknown[0])} is not one of {', '.join(choices)}{hint}"
        return list(dict.fromkeys(value)), None
    if inner is bool:
        if not isinstance(value, bool):
            return None, f"{path}: expected true or false, got {shown(value)}"
        return value, None
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"{path}: expected an integer, got {shown(value)}"
    elif inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"{path}: expected a number, got {shown(value)}"
        value = float(value)
        if not math.isfinite(value):
            return None, f"{path}: must be a finite number, got {shown(value)}"
    elif inner is str:
        if not isinstance(value, str):
            return None, f"{path}: expected a string, got {shown(value)}"
        choices = _choices(meta)
        if choices and value not in choices:
            return None, f"{path}: {shown(value)} is not one of {', '.join(choices)}{_did_you_mean(value, choices)}"
        return value, None
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        return None, f"{path}: {shown(value)} is out of range (must be {_range_text(meta)})"
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        return None, f"{path}: {shown(value)} is out of range (must be {_range_text(meta)})"
    return value, None


def _check_tasks(path: str, value: Any) -> tuple[Any, str | None]:
    """``eval.tasks``: a list of mappings -> (list of TaskConfig, the first problem or None)."""
    if not isinstance(value, list):
        return None, f"{path}: expected a list of tasks (mappings with name, path, kind...), got {shown(value)}"
    tasks, names = [], set()
    fields = {f.name: f for f in dataclasses.fields(TaskConfig)}
    hints = typing.get_type_hints(TaskConfig)
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            return None, f"{where}: expected a mapping with name, path and kind, got {shown(item)}"
        values = {}
        for key, raw in item.items():
            key = _text(key)
            if key not in fields:
                return None, f"{where}.{clip(key)}: unknown key{_did_you_mean(key, list(fields))}"
            coerced, problem = _check_value(f"{where}.{key}", raw, hints[key], fields[key].metadata)
            if problem:
                return None, problem
            values[key] = coerced
        missing = [k for k in TASK_REQUIRED if not values.get(k)]
        if missing:
            return None, f"{where}: needs {' and '.join(missing)} (e.g. name: sections, path: tasks/sections.jsonl)"
        if not TASK_NAME.match(values["name"]):
            return None, f"{where}.name: {shown(values['name'])} must be letters, digits, '_', '.' or '-' (64 at most)"
        if values["name"] in names:
            return None, f"{where}.name: {shown(values['name'])} names two tasks; give each its own"
        names.add(values["name"])
        tasks.append(TaskConfig(**values))
    return tasks, None


def resolve_task_paths(recipe: Recipe, base: Path) -> Recipe:
    """Task paths relative to ``base`` (the recipe file's folder, or the current one) made absolute, so
    that the workspace's copy of the recipe names the same files wherever the command runs."""
    tasks = [dataclasses.replace(t, path=str((base / Path(t.path).expanduser()).resolve()))
             for t in recipe.eval.tasks]
    if tasks == recipe.eval.tasks:
        return recipe
    return dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, tasks=tasks))


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _text(key: Any) -> str:
    """A YAML key as text: a string as it is, anything else (a number, a date) by a bounded repr."""
    return key if isinstance(key, str) else shown(key)


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``["train.lr=1e-4", ...]`` -> ({"train.lr": 0.0001}, problems). Values are typed like YAML scalars."""
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for i, item in enumerate(overrides):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            problems.append(f"override {shown(item)}: expected section.key=value{_override_hint(overrides, i)}")
            continue
        try:
            parsed[key] = safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key] = raw
        except RecipeTooBig as exc:
            problems.append(exc.problem(key))
    return parsed, problems


def _override_hint(overrides: Sequence[str], i: int) -> str:
    """What a malformed override probably meant: ``steps=5`` -> train.steps=5; ``train.steps 5`` (two
    words) -> train.steps=5."""
    key, sep, raw = overrides[i].partition("=")
    key = key.strip()
    if sep and "." not in key:
        owners = [name for name, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        return f" (did you mean {shown(f'{owners[0]}.{key}={raw}')}?)" if len(owners) == 1 else ""
    if not sep and "." in key and i + 1 < len(overrides) and "=" not in overrides[i + 1]:
        return f" (did you mean {shown(f'{key}={overrides[i + 1]}')}? no space around =)"
    return ""


def _problem_source(source: str, from_file: bool, from_overrides: bool) -> str:
    """Where the problems are: the file, the command line's overrides, or both."""
    if from_overrides and not from_file:
        return "command-line overrides"
    return f"{source} and the command-line overrides" if from_overrides else source


def _flatten_sections(data: dict) -> tuple[dict[str, Any], list[str]]:
    """A recipe file's sections -> ({"section.key": value}, problems with the sections themselves)."""
    flat: dict[str, Any] = {}
    problems: list[str] = []
    for section, body in data.items():
        if section not in SECTIONS:
            problems.append(f"{clip(_text(section))}: unknown section{_did_you_mean(_text(section), list(SECTIONS))}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: expected a mapping of keys, got {shown(body)}")
            continue
        for key, value in body.items():
            flat[f"{section}.{_text(key)}"] = value
    return flat, problems


def build_recipe(data: dict | None, source: str = "<recipe>", overrides: Sequence[str] = ()) -> Recipe:
    """Validate a nested dict (plus overrides) into a ``Recipe``; raise ``RecipeError`` listing every problem."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(source, [f"the top level must be a mapping of sections, got {type(data).__name__}"])
    flat, problems = _flatten_sections(data)
    file_problems = len(problems)
    parsed, override_problems = parse_overrides(overrides)
    problems += override_problems
    flat.update(parsed)
    blamed = {"file": file_problems > 0, "override": bool(override_problems)}  # where the problems are

    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for path, value in flat.items():
        section, _, key = path.partition(".")
        where = "override" if path in parsed else "file"
        prefix = "override " if where == "override" else ""
        cls = SECTIONS.get(section)
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if cls is None:
            problem = f"{prefix}{clip(path)}: unknown section {shown(section)}{_did_you_mean(section, list(SECTIONS))}"
        elif key not in fields:
            problem = f"{prefix}{clip(path)}: unknown key{_did_you_mean(key, list(fields))}"
        else:
            coerced, problem = _check_value(clip(path), value, typing.get_type_hints(cls)[key], fields[key].metadata)
            if not problem:
                values[section][key] = coerced
        if problem:
            problems.append(problem)
            blamed[where] = True

    strategy = values["strategy"].get("name", StrategyConfig.name)
    for path, forced in strategy_presets().get(strategy, {}).items():
        section, _, key = path.partition(".")
        values[section][key] = forced

    m, before_checks = values["masking"], len(problems)
    if m.get("mask_token_ratio", 0.8) + m.get("random_token_ratio", 0.1) > 1.0 + 1e-9:
        problems.append("masking.mask_token_ratio + masking.random_token_ratio: must add up to at most 1")
    if values["gate"].get("max_embedding_drift") is not None and values["drift"].get("max_sequences", 1) == 0:
        problems.append("gate.max_embedding_drift: needs drift.max_sequences > 0 (drift is not measured at 0)")
    if problems:
        blamed["file"] |= len(problems) > before_checks  # a rule across keys: told against the recipe
        raise RecipeError(_problem_source(source, blamed["file"], blamed["override"]), problems)
    return Recipe(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})


def load_recipe(path: Path | str | None, overrides: Sequence[str] = ()) -> Recipe:
    """Load a YAML recipe file (or only defaults when ``path`` is None) plus overrides."""
    if path is None:
        return resolve_task_paths(build_recipe({}, "command line" if overrides else "<defaults>", overrides), Path.cwd())
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:  # bounded: /dev/zero or a 2 GB file is refused, not read whole
            raw = f.read(MAX_RECIPE_BYTES + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(source, ["file not found: check the path"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(source, [f"cannot read: {clip(str(exc))}"]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [f"larger than {MAX_RECIPE_BYTES >> 20} MiB (the limit): is it a recipe?"])
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a ReaderError has no `problem`
        raise RecipeError(source, [f"invalid YAML{where}: {clip(problem)}"]) from None
    except RecipeTooBig as exc:
        raise RecipeError(source, [exc.problem()]) from None
    return resolve_task_paths(build_recipe(data, source, overrides), path.absolute().parent)


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)


def preset_settings(recipe: Recipe) -> dict[str, Any]:
    """The keys the recipe's strategy preset fixed (for `incr recipe show`)."""
    return strategy_presets()[recipe.strategy.name]
