"""`make experiment` on a tiny scale: the protocol runs for every strategy, writes the table, plot and
JSON, keeps what each strategy needs (Fisher files, joint's init_from), and reruns identically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from incr_cli.store.workspace import Workspace

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import experiment  # noqa: E402

STEPS = "2"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("experiment")
    out, work = root / "results", root / "work"
    assert experiment.main(["--quick", "--steps", STEPS, "--seeds", "1", "--out-dir", str(out), "--work-dir", str(work),
                            "--quiet"]) == 0
    return out, work


def numbers(doc: dict, strategy: str) -> dict:
    """A strategy's scores and summaries (everything but wall times)."""
    return {k: v for k, v in doc["strategies"][strategy].items() if k != "train_seconds"}


def test_quick_experiment_writes_table_plot_and_json(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    assert list(doc["strategies"]) == experiment.STRATEGIES
    for name, result in doc["strategies"].items():
        assert len(result["versions"]) == 4 and result["learned_at"] == [1, 2, 3], name
        for metric in ("perplexity", "accuracy"):
            matrix = result[metric]["matrix"]
            assert len(matrix) == 4 and all(len(row) == 3 and None not in row for row in matrix), name
            assert result[metric]["final_average"] is not None
            assert result[metric]["average_forgetting"] is not None and result[metric]["bwt"] is not None
        assert len(result["train_seconds"]) == 2
    shared = [doc["strategies"][s]["perplexity"]["matrix"][:2] for s in experiment.STRATEGIES]
    assert all(rows == shared[0] for rows in shared)  # v0000 and v0001 are the same for everyone
    table = (out / "experiment.md").read_text(encoding="utf-8")
    for name in experiment.STRATEGIES:
        assert f"| {name} |" in table
    assert "final avg ppl" in table and f"{STEPS} steps per increment" in table
    assert (out / "experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_strategy_trained_as_it_should(quick_run):
    _, work = quick_run
    ewc = Workspace.open(work / "ewc")
    assert all("fisher.safetensors" in ewc.version_manifest(v)["files"] for v in ("v0002", "v0003"))
    joint = Workspace.open(work / "joint")
    last = joint.version_manifest("v0003")
    assert last["init_from"] == "v0000" and last["trained_on"] == joint.increments() and last["steps"] == 3 * int(STEPS)
    naive = Workspace.open(work / "naive")
    assert naive.version_manifest("v0003")["steps"] == int(STEPS)
    assert naive.version_manifest("v0003")["recipe"]["strategy"]["name"] == "naive"


def test_rerun_gives_the_same_numbers(quick_run, tmp_path):
    out, _ = quick_run
    again = tmp_path / "again"
    assert experiment.main(["--quick", "--steps", STEPS, "--seeds", "1", "--out-dir", str(again), "--strategies",
                            "naive,ewc", "--quiet"]) == 0
    first = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    second = json.loads((again / "experiment.json").read_text(encoding="utf-8"))
    for name in ("naive", "ewc"):
        assert numbers(second, name) == numbers(first, name), name


def test_seeds_give_mean_and_sample_spread(quick_run):
    """--seeds K: each summary is the mean and sample std over the seeds' values; one seed has std 0."""
    out, _ = quick_run
    one = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    first = one["strategies"]["naive"]
    fake = {"naive": {**first, "perplexity": {**first["perplexity"], "final_average": 3.0}}}
    real = {"naive": {**first, "perplexity": {**first["perplexity"], "final_average": 1.0}}}
    stats = experiment.spread([real, fake])["naive"]["perplexity.final_average"]
    assert stats == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "values": [1.0, 3.0]}
    assert one["spread"]["naive"]["perplexity.final_average"]["std"] == 0.0
    assert one["settings"]["seeds"] == [0]


def test_ablation_quick_writes_its_table(tmp_path):
    """scripts/ablation.py on a tiny scratch model: one shift, naive and the default, ratios to naive."""
    import ablation

    out = tmp_path / "ablation.md"
    assert ablation.main(["--quick", "--steps", "2", "--first-steps", "2", "--shifts", "austen:pydocs",
                          "--candidates", "naive,distill on replay,on top", "--recipe", "recipes/demo-minilm.yaml",
                          "--out", str(out), "--quiet"]) == 0
    table = out.read_text(encoding="utf-8")
    assert "## austen -> pydocs" in table and "| naive | " in table and "| distill on replay | " in table
    assert "recipes/demo-minilm.yaml (batch 8, seq 64," in table  # the recipe, with --quick's batch
    doc = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert set(doc["shifts"]["austen->pydocs"]) == {"naive", "distill on replay", "on top"}
    rows = {name: r["rows"] for name, r in doc["shifts"]["austen->pydocs"].items()}
    assert rows == {"naive": [8, 0], "distill on replay": [8, 2], "on top": [11, 3]}  # teacher on the replayed rows
