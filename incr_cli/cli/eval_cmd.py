"""`incr eval`: every version on every data increment: perplexity, accuracy, forgetting, transfer, a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from incr_cli.cli.output import JsonOpt, Output, OverridesArg, guarded
from incr_cli.config.recipe import load_recipe
from incr_cli.store.files import check_writable
from incr_cli.store.workspace import Workspace


def eval_cmd(
    workspace: Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)],
    overrides: OverridesArg = None,
    versions: Annotated[str, typer.Option(
        "--versions", help="promoted (every base or promoted version), all (rejected ones too), latest, "
                           "or a comma list such as v0001,v0003.")] = "promoted",
    data: Annotated[str | None, typer.Option(
        "--data", help="all, or a comma list of increments (d0002 or d0002-NAME). Default: all, or none "
                       "when --text is given.", show_default=False)] = None,
    text: Annotated[list[Path] | None, typer.Option(
        "--text", help="Also score this text file (read and packed like ingest, not stored); repeatable.",
        show_default=False)] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Also write the JSON results to this file.",
                                                  show_default=False)] = None,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Write a PNG: perplexity heatmap and one line per increment (needs the plot extra).",
        show_default=False)] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe file (default: WORKSPACE/recipe.yaml).",
                                                show_default=False)] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: runtime.device).",
                                               show_default=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Score every cell again (the cache is still updated).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Score versions (rows) on the held-out split of every increment (columns).

    Per cell: masked-LM loss, perplexity, top-1 and top-5 accuracy of the masked tokens, with masks
    fixed per increment (eval.seed, eval.max_sequences), so every version sees identical inputs.
    Then, over the lineage of LATEST: final average, forgetting, backward and forward transfer.
    With downstream tasks in the recipe (eval.tasks), a versions x tasks table of their scores too.
    Results are cached in WORKSPACE/eval/cache (a repeated eval of unchanged versions loads no model)
    and every run is kept as WORKSPACE/eval/<UTC time>.json (a read-only workspace: scored and printed,
    nothing kept). Eval takes no lock and never writes into version or data folders.
    """
    from incr_cli import api
    from incr_cli.scoring import render as eval_report

    out = Output(json_out)
    ws = Workspace.open(workspace)
    _check_outputs(out_file, plot_file)  # before minutes of scoring
    result = api.evaluate(ws.root, versions=versions, data=data, texts=text or [], overrides=overrides or [],
                          recipe=recipe, device=device, use_cache=not no_cache, out=out_file, reporter=out)
    if plot_file is not None:
        eval_report.plot(result, plot_file)
    _show(out, result, ws, result.saved, plot_file)


def _show(out: Output, result: Any, ws: Workspace, kept: Path | None, plot_file: Path | None) -> None:
    if kept is None:
        out.warn(f"{ws.root} is read-only: the scores are printed, not cached or saved under eval/ "
                 "(--out FILE keeps them elsewhere)")
    if out.json_mode:
        out.emit_json(result.to_json())
        return
    from incr_cli.scoring import render as eval_report

    eval_report.render(result, out)
    cells = result.cache_hits + result.cache_misses
    out.log(f"{cells} cells ({result.cache_hits} from the cache) in {result.seconds:.1f}s; "
            + (f"results in {kept}" if kept is not None else "results not kept")
            + (f"; plot in {plot_file}" if plot_file is not None else ""))


def _check_outputs(out_file: Path | None, plot_file: Path | None) -> None:
    """Fail before minutes of scoring, not after: the output paths are writable, matplotlib is there."""
    from incr_cli.scoring import render as eval_report

    for option, path in (("--out", out_file), ("--plot", plot_file)):
        if path is not None:
            check_writable(path, option)
    if plot_file is not None:
        eval_report.require_matplotlib()


def probe_cmd(
    workspace: Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)],
    task_file: Annotated[Path, typer.Argument(help="Labelled task file: JSON Lines or CSV/TSV with a header.",
                                              show_default=False)],
    kind: Annotated[str, typer.Option("--kind", help="classification (text + label) or retrieval (query + text).")]
    = "classification",
    versions: Annotated[str, typer.Option("--versions", help="As incr eval: promoted, all, latest or v0001,v0003.")]
    = "promoted",
    text_field: Annotated[str | None, typer.Option("--text-field", help="Field of the text (default: text).",
                                                   show_default=False)] = None,
    label_field: Annotated[str | None, typer.Option("--label-field", help="Field of the label (default: label).",
                                                    show_default=False)] = None,
    group_field: Annotated[str | None, typer.Option("--group-field", help="Field that keeps rows in one fold "
                                                    "(e.g. the source document).", show_default=False)] = None,
    query_field: Annotated[str | None, typer.Option("--query-field", help="Field of the query (retrieval; "
                                                    "default: query).", show_default=False)] = None,
    overrides: OverridesArg = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Score again (the cache is still updated).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Score versions on an ad-hoc downstream task file, as a recipe task (eval.tasks) would be.

    Classification: a logistic-regression probe on the version's frozen, pooled embeddings, scored out
    of fold (probe.folds, seeded, group-aware with --group-field); accuracy and macro-F1 with 95%
    bootstrap intervals. Retrieval: recall@1, recall@10 and MRR of cosine search over every relevant
    text. Scores are cached in WORKSPACE/eval/tasks; the probe takes no lock and writes nothing else.
    """
    from incr_cli.runtime.device import Placement, configure_threads
    from incr_cli.scoring import probe
    from incr_cli.scoring.evaluate import select_versions

    out = Output(json_out)
    ws = Workspace.open(workspace)
    resolved = load_recipe(ws.recipe_path, overrides or [])
    fields = {"text_field": text_field, "label_field": label_field, "group_field": group_field,
              "query_field": query_field}
    data = probe.probe_file(task_file, kind, fields, resolved)
    chosen = select_versions(ws, versions)
    configure_threads(resolved.runtime.num_threads)
    place = Placement.resolve(resolved.runtime.device, resolved.runtime.precision)
    book = probe.TaskBook(ws, resolved, place, enabled=not no_cache)
    scores = probe.score_versions(book, chosen, [data], reporter=out)
    doc = {"workspace": str(ws.root), "task": data.identity(), "settings": book.settings,
           "scores": {v: probe.shown(s[data.name]) for v, s in scores.items() if data.name in s},
           "cache": {"hits": book.hits, "misses": book.misses}}
    if json_out:
        out.emit_json(doc)
        return
    from incr_cli.scoring.render import task_cell

    out.table(f"{data.name} ({kind}, {data.identity()['examples']:,} examples) on {ws.root}", ["version", data.name],
              [[v, task_cell(s)] for v, s in doc["scores"].items()])


def register(app: typer.Typer) -> None:
    """Add `incr eval` and `incr probe`."""
    app.command("eval")(guarded(eval_cmd))
    app.command("probe")(guarded(probe_cmd))
