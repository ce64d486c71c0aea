"""EWC (Elastic Weight Consolidation, Kirkpatrick et al., 2017): MLM plus a penalty that keeps the
weights the parent's Fisher says matter close to the parent's.

At the end of an ewc increment the diagonal empirical Fisher of the MLM loss is estimated on the NEW
weights over the data just trained (``ewc.fisher_batches`` batches) and stored beside the version as
``fisher.safetensors`` (listed and checksummed in its manifest like every file). The next ewc
increment adds the term ``ewc.weight / 2 * sum_i F_i (theta_i - theta*_i)^2``, theta* being the
parent's weights. A parent without a Fisher file (v0000, or a version trained by another strategy)
gets one estimated at the start, on the parent's weights over its lineage's data; with no earlier
data (the first increment) there is nothing to protect and the term is left out, with a logged
reason. One anchor, one Fisher: the penalty protects what the parent learned last; the Fisher of
older increments is not accumulated (that would be "online EWC").

Fisher estimator: F_i = mean over batches b of (d L_b / d theta_i)^2, with L_b the mean MLM
cross-entropy over batch b's masked tokens against the true tokens (the "empirical" Fisher, with
one gradient per batch as common implementations do), dropout off, masks and batches seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from incr_cli.config.presets import PRESETS
from incr_cli.config.recipe import Recipe
from incr_cli.data.shards import BatchSampler, Draw, IncrementShards
from incr_cli.errors import IntegrityError
from incr_cli.methods.base import Strategy, StrategyInputs
from incr_cli.runtime.device import Placement
from incr_cli.store.workspace import Workspace
from incr_cli.training.losses import ewc_penalty, mlm_loss_sum
from incr_cli.training.masking import TokenIds, mask_batch, stable_seed
from incr_cli.training.terms import LossTerm, MicroOutputs

FISHER_FILE = "fisher.safetensors"


@dataclass
class EwcPenalty:
    """The EWC term: 1/2 * sum_i F_i (theta_i - theta*_i)^2 (the loop multiplies by ``weight`` = ewc.weight).

    ``anchor`` (theta*) and ``fisher`` hold the trainable parameters' tensors, on the training device.
    Computed alike on every rank and micro-batch, so each returns its share of the step's value.
    """

    weight: float
    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    name, needs_teacher, needs_hidden = "ewc", False, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        params = {n: p for n, p in out.model.named_parameters() if p.requires_grad and n in self.fisher}
        return ewc_penalty(params, self.anchor, self.fisher, 1.0) / (out.n_micro * out.world_size)


class Ewc(Strategy):
    """MLM plus the EWC penalty anchored at the parent's weights (see the module docstring)."""

    name, extra_loss_names = "ewc", ("ewc",)
    preset = PRESETS[name]

    def extra_terms(self, inputs: StrategyInputs) -> list[LossTerm]:
        recipe, parent, reporter = inputs.recipe, inputs.parent, inputs.reporter
        if recipe.ewc.weight == 0:
            return []
        fisher = load_fisher(inputs.ws, parent, inputs.place.device)
        if fisher is None:
            earlier = [inputs.shards[d] for d in inputs.replay if len(inputs.shards[d].train)]
            if not earlier:
                reporter.log(f"ewc: no penalty in this increment: {parent} has no {FISHER_FILE} and no earlier "
                             "training data to estimate one on (nothing to protect yet)")
                return []
            reporter.log(f"ewc: {parent} has no {FISHER_FILE} (trained by another strategy or the base); "
                         f"estimating it on {', '.join(s.id for s in earlier)}")
            fisher = fisher_diagonal(inputs.model, earlier, recipe, inputs.tok_inputs, place=inputs.place)
        trainable = {n: p for n, p in inputs.model.named_parameters() if p.requires_grad}
        _check_fisher(fisher, trainable, parent)
        anchor = {n: p.detach().clone() for n, p in trainable.items() if n in fisher}
        kept = {n: fisher[n].to(inputs.place.device) for n in anchor}
        return [EwcPenalty(recipe.ewc.weight, anchor, kept)]

    def version_files(self, inputs: StrategyInputs) -> dict[str, bytes]:
        """``fisher.safetensors``: the new weights' Fisher on the data just trained."""
        recipe = inputs.recipe
        new = [inputs.shards[d] for d in inputs.new if len(inputs.shards[d].train)]
        inputs.reporter.log(f"ewc: estimating the Fisher of the new weights on {', '.join(s.id for s in new)} "
                            f"({recipe.ewc.fisher_batches} batches)")
        fisher = fisher_diagonal(inputs.model, new, recipe, inputs.tok_inputs, place=inputs.place)
        about = {"increments": [s.id for s in new], "batches": recipe.ewc.fisher_batches,
                 "batch_size": recipe.train.batch_size, "seed": recipe.train.seed,
                 "estimator": "empirical diagonal Fisher: mean over batches of squared MLM-loss gradients"}
        return {FISHER_FILE: fisher_bytes(fisher, about)}


# ----------------------------------------------------------------------------- the Fisher


def fisher_diagonal(model: nn.Module, shards: list[IncrementShards], recipe: Recipe, tok_inputs: TokenIds, *,
                    place: Placement, batches: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the MLM loss of ``model`` on the train rows of ``shards``.

    -> {parameter name: (same shape as the parameter) float32 on ``place.device``}, for every parameter,
    frozen or not (the next increment may freeze differently). ``batches`` (default
    ``ewc.fisher_batches``) batches of ``train.batch_size`` rows, drawn like training's new rows
    (``train.seed``, ``data.sample``), masked by generators seeded from (train.seed, batch).
    The model's mode and requires_grad flags are restored; its ``.grad`` are left None.
    """
    from incr_cli.model.heads import MaskedLMHead  # transformers: only when a Fisher is estimated

    batches = batches or recipe.ewc.fisher_batches
    device = place.device
    sampler = BatchSampler(shards, [], Draw(recipe.train.batch_size, seed=recipe.train.seed, sample=recipe.data.sample))
    params = dict(model.named_parameters())
    flags, was_training = {n: p.requires_grad for n, p in params.items()}, model.training
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    head = MaskedLMHead(model)
    model.eval()  # no dropout: the Fisher of the model that will be used, not of a noisy copy
    generator = torch.Generator(device=device)
    pad_id, tokens = shards[0].pad_id, tok_inputs.to(device)
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for b in range(batches):
            ids = torch.from_numpy(sampler.next_batch().input_ids).to(device)  # (B, T)
            generator.manual_seed(stable_seed("ewc-fisher", recipe.train.seed, b))
            masked = mask_batch(ids, recipe.masking, tokens, generator=generator)
            with torch.enable_grad(), place.autocast():
                logits, _ = head(masked.input_ids, ids != pad_id, masked.positions)  # (N, V)
            loss = mlm_loss_sum(logits, masked.targets) / max(int(masked.targets.numel()), 1)
            loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.float().pow(2)
                        p.grad = None
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
    return {name: f / batches for name, f in fisher.items()}


def _grown_rows(fisher: dict[str, torch.Tensor], trainable: dict[str, nn.Parameter]) -> None:
    """In place: a Fisher of a parent whose vocabulary the student grew from (vocab.py) gets zero rows
    for the new tokens' rows (embeddings, output projection and bias): EWC holds only what the
    parent had."""
    for name, p in trainable.items():
        f = fisher.get(name)
        if f is not None and f.dim() == p.dim() and f.shape[0] < p.shape[0] and f.shape[1:] == p.shape[1:]:
            fisher[name] = torch.cat([f, f.new_zeros((p.shape[0] - f.shape[0], *f.shape[1:]))])


def _check_fisher(fisher: dict[str, torch.Tensor], trainable: dict[str, nn.Parameter], parent: str) -> None:
    """IntegrityError when a stored Fisher does not fit the model it is to anchor."""
    _grown_rows(fisher, trainable)
    for name, p in trainable.items():
        if name in fisher and fisher[name].shape != p.shape:
            raise IntegrityError(f"{parent}/{FISHER_FILE}: {name} has shape {tuple(fisher[name].shape)}, the "
                                 f"model's is {tuple(p.shape)}; remove the file to have it estimated again")
    if not any(name in fisher for name in trainable):
        raise IntegrityError(f"{parent}/{FISHER_FILE}: names none of the model's parameters (e.g. "
                             f"{next(iter(fisher), 'none')!r}); remove the file to have it estimated again")


def fisher_bytes(fisher: dict[str, torch.Tensor], about: dict[str, Any]) -> bytes:
    """The safetensors file of a Fisher estimate; ``about`` goes into its metadata (as JSON)."""
    from safetensors.torch import save

    tensors = {name: f.detach().to("cpu", torch.float32).contiguous() for name, f in fisher.items()}
    return save(tensors, metadata={"format": "1", "kind": "ewc-fisher", "about": json.dumps(about, sort_keys=True)})


def load_fisher(ws: Workspace, version: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
    """``version``'s stored Fisher (None when it has none). The file must be listed in the manifest;
    its checksum is verified with the folder's (``models.load_version`` / ``incr verify``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ws.version_dir(version) / FISHER_FILE
    if not path.is_file():
        return None
    if FISHER_FILE not in (ws.version_manifest(version).get("files") or {}):
        raise IntegrityError(f"{path}: not listed in {version}'s manifest, so it was not written by incr; remove it")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{path}: cannot be read ({exc}); run `incr verify {ws.root} --all`") from None
