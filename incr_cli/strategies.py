"""What makes the continual-learning strategies differ, outside the one training loop.

``strategy.name`` picks a preset (``incr_cli.recipe.PRESETS``): naive, replay, distill and
replay+distill differ only in recipe keys (``distill.alpha``, ``replay.ratio``), which
``train.build_loss_terms`` and the sampler already read. The two that need more live here:

- **ewc** (Elastic Weight Consolidation, Kirkpatrick et al., 2017). At the end of an ewc increment
  the diagonal empirical Fisher of the MLM loss is estimated on the NEW weights over the data just
  trained (``ewc.fisher_batches`` batches) and stored beside the version as ``fisher.safetensors``
  (listed and checksummed in its manifest like every file). The next ewc increment adds the term
  ``ewc.weight / 2 * sum_i F_i (theta_i - theta*_i)^2``, theta* being the parent's weights.
  A parent without a Fisher file (v0000, or a version trained by another strategy) gets one
  estimated at the start, on the parent's weights over its lineage's data; with no earlier data
  (the first increment) there is nothing to protect and the term is left out, with a logged reason.
  One anchor, one Fisher: the penalty protects what the parent learned last, as specified; the
  Fisher of older increments is not accumulated (that would be "online EWC").
- **joint** retrains from the lineage's root (v0000) on the union of every increment so far, with
  no teacher and no replay: the retention upper bound at the cost of retraining. The new version's
  parent is still the one it was planned from (the lineage continues), its manifest records
  ``init_from`` and, in ``retrained``, the earlier increments it saw again.

Fisher estimator: F_i = mean over batches b of (d L_b / d theta_i)^2, with L_b the mean MLM
cross-entropy over batch b's masked tokens against the true tokens (the "empirical" Fisher, with
one gradient per batch as common implementations do), dropout off, masks and batches seeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from incr_cli import device as devices
from incr_cli.data import BatchSampler, IncrementShards
from incr_cli.errors import IntegrityError
from incr_cli.heads import MaskedLMHead
from incr_cli.losses import ewc_penalty, mlm_loss_sum
from incr_cli.masking import mask_batch, stable_seed
from incr_cli.recipe import Recipe
from incr_cli.reporting import Quiet, Reporter
from incr_cli.workspace import Workspace

if TYPE_CHECKING:  # only the type is needed here
    from incr_cli.step import MicroOutputs

FISHER_FILE = "fisher.safetensors"


# ----------------------------------------------------------------------------- the data of an increment


def training_data(ws: Workspace, recipe: Recipe, parent: str) -> tuple[list[str], list[str], str | None, list[str]]:
    """-> (new, replay, init_from, retrained) of an increment from ``parent``.

    Every strategy but joint: new = the pending increments, replay = the parent's lineage (drawn
    from only when ``replay.ratio`` > 0), training starts from the parent (init_from None).
    joint: new = lineage + pending, no replay, training starts from the lineage's root, and the
    lineage's increments are ``retrained``. Nothing pending means nothing to train, for joint too.
    """
    pending, lineage = ws.pending(parent), ws.trained_on(parent)
    if recipe.strategy.name != "joint" or not pending:
        return pending, lineage, None, []
    return [*lineage, *pending], [], root_version(ws, parent), lineage


def root_version(ws: Workspace, version: str) -> str:
    """The first version of ``version``'s lineage (the one without a parent: normally v0000)."""
    root = ws.lineage(version)[0]
    if gone := ws.version_manifest(root).get("parent"):
        raise IntegrityError(f"{ws.version_dir(gone)}: missing, so {version}'s lineage has no root to retrain "
                             "from; restore it or train this line with another strategy")
    return root


def reset_weights(model: nn.Module, ws: Workspace, version: str, recipe: Recipe, device: torch.device) -> None:
    """Overwrite ``model``'s parameters, in place, with ``version``'s (joint: start again from the root).

    In place, so an optimizer already built over ``model`` keeps its parameters; its state must be empty.
    """
    from incr_cli import models

    with torch.random.fork_rng(devices=[]):  # loading must not move the dropout stream training uses
        source, _ = models.load_version(ws, version, recipe=recipe, device=str(device))
    weights = dict(source.named_parameters())
    own = dict(model.named_parameters())
    if weights.keys() != own.keys() or any(weights[n].shape != p.shape for n, p in own.items()):
        raise IntegrityError(f"{version} does not have the architecture of the parent's model, so a joint "
                             "increment cannot start from it; train this lineage with another strategy")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name])


# ----------------------------------------------------------------------------- the Fisher


def fisher_diagonal(model: nn.Module, shards: list[IncrementShards], recipe: Recipe, tok_inputs: dict[str, Any], *,
                    device: torch.device, precision: str, batches: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the MLM loss of ``model`` on the train rows of ``shards``.

    -> {parameter name: (same shape as the parameter) float32 on ``device``}, for every parameter,
    frozen or not (the next increment may freeze differently). ``batches`` (default
    ``ewc.fisher_batches``) batches of ``train.batch_size`` rows, drawn like training's new rows
    (``train.seed``, ``data.sample``), masked by generators seeded from (train.seed, batch).
    The model's mode and requires_grad flags are restored; its ``.grad`` are left None.
    """
    batches = batches or recipe.ewc.fisher_batches
    sampler = BatchSampler(shards, [], n_new=recipe.train.batch_size, n_replay=0, seed=recipe.train.seed,
                           sample=recipe.data.sample)
    params = dict(model.named_parameters())
    flags, was_training = {n: p.requires_grad for n, p in params.items()}, model.training
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    head = MaskedLMHead(model)
    model.eval()  # no dropout: the Fisher of the model that will be used, not of a noisy copy
    generator = torch.Generator(device=device)
    pad_id = shards[0].pad_id
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for b in range(batches):
            ids = torch.from_numpy(sampler.next_batch().input_ids).to(device)  # (B, T)
            generator.manual_seed(stable_seed("ewc-fisher", recipe.train.seed, b))
            masked = mask_batch(ids, recipe.masking, special_ids=tok_inputs["special_ids"].to(device),
                                mask_token_id=tok_inputs["mask_token_id"], vocab_size=tok_inputs["vocab_size"],
                                generator=generator, word_starts=_on(tok_inputs.get("word_starts"), device))
            with torch.enable_grad(), devices.autocast(device, precision):
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


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


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


# ----------------------------------------------------------------------------- the EWC loss term


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


def ewc_terms(ws: Workspace, recipe: Recipe, plan: Any, model: nn.Module, shards: dict[str, IncrementShards],
              tok_inputs: dict[str, Any], *, device: torch.device, precision: str,
              reporter: Reporter | None = None) -> list[EwcPenalty]:
    """The EWC term of an increment (an empty list for other strategies or when there is nothing to protect).

    Call it while ``model`` still holds the parent's weights (before any resumed state is loaded):
    they are the anchor. ``plan`` is the IncrementPlan; ``shards`` holds its new and replay increments.
    """
    reporter = reporter or Quiet()
    if recipe.strategy.name != "ewc" or recipe.ewc.weight == 0:
        return []
    fisher = load_fisher(ws, plan.parent, device)
    if fisher is None:
        earlier = [shards[d] for d in plan.replay if len(shards[d].train)]
        if not earlier:
            reporter.log(f"ewc: no penalty in this increment: {plan.parent} has no {FISHER_FILE} and no earlier "
                         "training data to estimate one on (nothing to protect yet)")
            return []
        reporter.log(f"ewc: {plan.parent} has no {FISHER_FILE} (trained by another strategy or the base); "
                     f"estimating it on {', '.join(s.id for s in earlier)}")
        fisher = fisher_diagonal(model, earlier, recipe, tok_inputs, device=device, precision=precision)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        if name in fisher and fisher[name].shape != p.shape:
            raise IntegrityError(f"{plan.parent}/{FISHER_FILE}: {name} has shape {tuple(fisher[name].shape)}, the "
                                 f"model's is {tuple(p.shape)}; remove the file to have it estimated again")
    if not any(name in fisher for name in trainable):
        raise IntegrityError(f"{plan.parent}/{FISHER_FILE}: names none of the model's parameters (e.g. "
                             f"{next(iter(fisher), 'none')!r}); remove the file to have it estimated again")
    anchor = {n: p.detach().clone() for n, p in trainable.items() if n in fisher}
    kept = {n: fisher[n].to(device) for n in anchor}
    return [EwcPenalty(recipe.ewc.weight, anchor, kept)]


def version_files(recipe: Recipe, plan: Any, model: nn.Module, shards: dict[str, IncrementShards],
                  tok_inputs: dict[str, Any], *, device: torch.device, precision: str,
                  reporter: Reporter | None = None) -> dict[str, bytes]:
    """Extra files of the new version: ``fisher.safetensors`` after an ewc increment (the new weights'
    Fisher on the data just trained), nothing for the other strategies."""
    reporter = reporter or Quiet()
    if recipe.strategy.name != "ewc":
        return {}
    new = [shards[d] for d in plan.new if len(shards[d].train)]
    reporter.log(f"ewc: estimating the Fisher of the new weights on {', '.join(s.id for s in new)} "
                 f"({recipe.ewc.fisher_batches} batches)")
    fisher = fisher_diagonal(model, new, recipe, tok_inputs, device=device, precision=precision)
    about = {"increments": [s.id for s in new], "batches": recipe.ewc.fisher_batches,
             "batch_size": recipe.train.batch_size, "seed": recipe.train.seed,
             "estimator": "empirical diagonal Fisher: mean over batches of squared MLM-loss gradients"}
    return {FISHER_FILE: fisher_bytes(fisher, about)}


__all__ = ["FISHER_FILE", "EwcPenalty", "ewc_terms", "fisher_bytes", "fisher_diagonal", "load_fisher",
           "reset_weights", "root_version", "training_data", "version_files"]
