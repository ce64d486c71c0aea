"""`make stream` on a tiny scale: every line trains the seven later domains, joint retrains all eight
from v0000, the report's figures follow from the raw matrices, and the committed results/stream.md is
what the report renders from the committed results/stream.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from incr_cli.store.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import _stream_report as report  # noqa: E402
import stream  # noqa: E402

LINES = "default,naive,split=increment,merge.choose"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("stream")
    out, work = root / "results", root / "work"
    assert stream.main(["--quick", "--lines", LINES, "--no-tasks", "--out-dir", str(out), "--work-dir", str(work),
                        "--quiet"]) == 0
    return json.loads((out / "stream.json").read_text(encoding="utf-8")), work


def test_every_line_trains_the_stream_and_joint_retrains_it_from_v0000(quick_run):
    doc, work = quick_run
    domains = [d for d, _, _ in stream.DOMAINS]
    assert doc["domains"] == domains and len(domains) >= 8
    raw = doc["seeds_raw"][0]
    for name in LINES.split(","):
        line = raw["lines"][name]
        assert len(line["increments"]) == len(domains) - 1, name
        assert len(line["perplexity"]) == len(domains) and all(len(r) == len(domains) for r in line["perplexity"])
    joint = Workspace.open(work / "seed0" / "joint")
    last = joint.version_manifest(joint.latest())
    assert last["init_from"] == "v0000" and last["trained_on"] == joint.increments()
    assert last["steps"] == raw["total_steps"] == raw["first_steps"] + raw["steps"] * (len(domains) - 1)
    naive = Workspace.open(work / "seed0" / "naive")
    assert naive.version_manifest(naive.latest())["recipe"]["strategy"]["name"] == "naive"
    # the split rule reached the sampler: one share per earlier increment at the last night
    rows = raw["lines"]["split=increment"]["increments"][-1]["replay_rows"]
    assert len(rows) == len(domains) - 1 and max(rows.values()) == pytest.approx(min(rows.values()))
    merged = raw["lines"]["merge.choose"]["increments"][-1]["merge"]
    assert merged["chosen"] and set(merged["objective"]) == {"1", "0.9", "0.8", "0.7", "0.6", "0.5"}


def test_the_summary_follows_from_the_raw_matrices(quick_run):
    doc, _ = quick_run
    s = doc["summary"]
    final = {name: doc["seeds_raw"][0]["lines"][name]["perplexity"][-1] for name in s}
    assert s["default"]["final"] == pytest.approx(final["default"])
    ratio = report.geomean(final["default"]) / report.geomean(final["joint"])
    assert s["default"]["geomean_vs_joint"] == pytest.approx(ratio)
    assert s["default"]["newest_vs_naive"] == pytest.approx(final["default"][-1] / final["naive"][-1])
    earlier = [a / b for a, b in zip(final["default"][:-1], final["joint"][:-1])]
    assert s["default"]["worst_earlier_vs_joint"] == pytest.approx(max(earlier))


def test_committed_stream_table_is_rendered_from_the_committed_json():
    doc = json.loads((ROOT / "results" / "stream.json").read_text(encoding="utf-8"))
    assert (ROOT / "results" / "stream.md").read_text(encoding="utf-8") == report.markdown(doc)
    assert not doc["settings"]["quick"] and len(doc["domains"]) >= 8
