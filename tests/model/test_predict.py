"""incr fill-mask: predictions per version, side by side, and its bad inputs."""

import json

from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.model.predict import fill_mask

runner = CliRunner()


def test_fill_mask_returns_top_k_per_text_and_version(tiny_workspace):
    results = fill_mask(tiny_workspace, ["v0000"], ["the [MASK] was here", "she [MASK] him"], top_k=3)
    assert list(results) == ["v0000"]
    assert [len(row) for row in results["v0000"]] == [3, 3]
    scores = [p.score for p in results["v0000"][0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6


def test_fill_mask_cli_json_and_errors(tiny_workspace):
    ok = runner.invoke(app, ["fill-mask", str(tiny_workspace.root), "a [MASK] day", "--json", "--top-k", "2"])
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)["v0000"][0]) == 2

    no_mask = runner.invoke(app, ["fill-mask", str(tiny_workspace.root), "no mask here"])
    assert no_mask.exit_code == 2 and "[MASK]" in no_mask.output

    unknown = runner.invoke(app, ["fill-mask", str(tiny_workspace.root), "a [MASK]", "--versions", "v0009"])
    assert unknown.exit_code == 2 and "v0000" in unknown.output
