"""`incr train-increment`: train the pending data into a new version (distillation + replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.config.recipe import recipe_to_dict, recipe_to_yaml
from incr_cli.errors import GateRejected
from incr_cli.progress import Quiet
from incr_cli.scoring.continual import gate_line
from incr_cli.scoring.render import fmt


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("train-increment")(train_increment_cmd)


@guarded
def train_increment_cmd(
    workspace: Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)],
    overrides: OverridesArg = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe file (default: WORKSPACE/recipe.yaml).")] = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Version to train from (default: LATEST).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the resolved recipe; train nothing.")] = False,
    track: Annotated[str | None, typer.Option("--track", help="Dashboards, comma-separated: tensorboard, mlflow "
                                              "(sets tracking.sinks; '' turns them off).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train the increments not yet in the parent's lineage into a new version vNNNN.

    The parent (LATEST by default) is the frozen teacher; the student starts from it and trains on
    the new data mixed with replay of earlier increments. The new version is evaluated before and
    after on every increment's held-out split and gated: promoted (LATEST moves, exit 0) or kept as
    rejected (exit 3). Nothing pending: "nothing to train", exit 0. Rerunning after a crash or
    Ctrl-C resumes from the saved state. Under torchrun it trains data-parallel; rank 0 writes.
    With --track (or tracking.sinks) the run also goes to TensorBoard and/or MLflow.
    """
    from incr_cli import api
    from incr_cli.runtime import distributed

    main = distributed.env_rank() == 0  # under torchrun every rank trains; rank 0 writes and talks
    out = Output(json_out)
    sinks = [] if track is None else [f"tracking.sinks=[{', '.join(t.strip() for t in track.split(',') if t.strip())}]"]
    result = api.train_increment(workspace, overrides=[*(overrides or []), *sinks], recipe=recipe, parent=parent,
                                 dry_run=dry_run, reporter=out if main else Quiet())
    if not main:
        return
    if dry_run:
        _render_plan(out, result.plan, result.recipe, json_out)
    elif result.nothing_to_train:
        if json_out:
            out.emit_json({"version": None, "parent": result.parent, "nothing_to_train": True,
                           "message": result.message})
        else:
            out.log(result.message)
    else:
        if result.metrics:
            _render_metrics(out, result.metrics, json_out)
        if not result.promoted:
            raise GateRejected(result.message)  # the version is written and kept as rejected: exit 3
        if not json_out:
            out.log(result.message)


def _render_plan(out: Output, plan: Any, recipe: Any, json_out: bool) -> None:
    if json_out:
        out.emit_json({"plan": plan.to_dict(), "nothing_to_train": plan.nothing_to_train,
                       "recipe": recipe_to_dict(recipe)})
        return
    rows = [["parent", plan.parent], ["new", ", ".join(plan.new) or "none (nothing to train)"],
            ["replay", (", ".join(plan.replay) or "none") + ("" if plan.replay_per_batch or not plan.replay
                                                            else " (not replayed: replay.ratio gives 0 rows)")]]
    if plan.init_from:
        rows.append(["starts from", f"{plan.init_from}'s weights (joint: retrains {', '.join(plan.retrained) or 'nothing'})"])
    if not plan.nothing_to_train:
        rows += [["batch", f"{plan.new_per_batch} new + {plan.replay_per_batch} replay sequences"
                  + (f" per rank x {plan.world_size}" if plan.world_size > 1 else "")],
                 ["new sequences", f"{plan.new_sequences:,}"],
                 ["steps", f"{plan.steps:,}"], ["tokens", f"at most {plan.tokens:,}"]]
        if plan.replay_rows:
            least = min(plan.replay_rows, key=plan.replay_rows.__getitem__)
            rows.append(["replayed rows", f"{sum(plan.replay_rows.values()):,.0f} expected over {len(plan.replay_rows)} "
                                          f"increments, fewest {plan.replay_rows[least]:,.1f} ({least})"])
    out.table("train-increment plan (dry run)", ["", ""], rows)
    out.console.print(recipe_to_yaml(recipe), markup=False, highlight=False)


def _render_metrics(out: Output, metrics: dict[str, Any], json_out: bool) -> None:
    if json_out:
        out.emit_json(metrics)
        return
    before, after = metrics["eval"]["before"], metrics["eval"]["after"]
    shared = metrics["eval"].get("after_shared_vocab") or {}
    new = set(metrics["data"]["new"])
    rows = []
    for inc in [*metrics["data"].get("earlier", metrics["data"]["replay"]), *metrics["data"]["new"]]:
        if inc not in after:
            rows.append([inc, "new" if inc in new else "earlier", "-", "-", "-", "no held-out data"])
            continue
        b, a = before.get(inc, {}), shared.get(inc, after[inc])  # like with like after vocabulary growth
        change = (a["perplexity"] / b["perplexity"] - 1) if b.get("perplexity") and a.get("perplexity") else None
        rows.append([inc, "new" if inc in new else "earlier",
                     fmt("perplexity", b.get("perplexity")), fmt("perplexity", a.get("perplexity")),
                     "-" if change is None else f"{change:+.1%} ({a['perplexity'] - b['perplexity']:+.2f})",
                     f"{fmt('accuracy', b.get('accuracy'))} -> {fmt('accuracy', a.get('accuracy'))}"])
    out.table(f"{metrics['version']} vs {metrics['parent']}: held-out perplexity; change = after / before - 1 "
              "(in perplexity points); + = worse", ["increment", "data", "before", "after", "change", "accuracy"], rows)
    for inc, s in shared.items():
        out.log(f"{inc}: compared on the {s.get('coverage') or 0:.0%} of masked positions whose target {metrics['parent']} "
                f"has too (the vocabulary grew); on every position {fmt('perplexity', after[inc]['perplexity'])}, "
                f"accuracy {fmt('accuracy', after[inc]['accuracy'])}")
    gate = metrics["gate"]
    for check in gate["checks"]:
        out.log(f"gate {gate_line(check)}")
    tps = metrics.get("tokens_per_second")
    out.log(f"{metrics['steps']} steps, {metrics['tokens']:,} tokens in {metrics['train_seconds']:.1f} s"
            + (f" ({tps:,.0f} tokens/s)" if tps else "") + f" on {metrics['device']} ({metrics['precision']}), "
            f"{metrics['trainable_parameters']:,} trainable parameters; last logged training loss "
            f"{_loss(metrics['loss']['total'])} (mixed new + replay batches, every term; held-out scores are above)")


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
