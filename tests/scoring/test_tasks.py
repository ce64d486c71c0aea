"""Downstream tasks: the probe's scores against references, every bad task file, the cache, the task
gate on a version trained to damage the encoder, and reproducibility across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_train import SAMPLES, reset_faults
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import ProbeConfig, TaskConfig, build_recipe, load_recipe
from incr_cli.errors import InputError
from incr_cli.scoring import tasks as T

runner = CliRunner()
PROBE = ProbeConfig()


def lines(name: str, n: int) -> list[str]:
    return [x.strip()[:300] for x in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if x.strip()][:n]


def write_topics(path: Path, per_label: int = 60) -> Path:
    """A 3-class task: paragraphs of the three shipped corpora labelled by corpus, 10 per document."""
    with open(path, "w", encoding="utf-8") as f:
        for label, name in (("austen", "austen.txt"), ("fortunes", "fortunes.txt"), ("pydocs", "pydocs.txt")):
            for i, text in enumerate(lines(name, per_label)):
                f.write(json.dumps({"text": text, "label": label, "doc": f"{label}-{i // 10}"}) + "\n")
    return path


def write_pairs(path: Path, n: int = 60) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in lines("pydocs.txt", 400):
            words = text.split()
            if len(words) >= 20 and n > 0:
                f.write(json.dumps({"query": " ".join(words[:8]), "text": " ".join(words[8:40])}) + "\n")
                n -= 1
    return path


def task_args(path: Path, **extra: object) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in {"name": "topics", "path": str(path), "group_field": "doc", **extra}.items())
    return f"eval.tasks=[{{{body}}}]"


def incr(*args: object):
    reset_faults()
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- pure scores


def test_separable_embeddings_score_perfectly_and_noise_scores_near_chance():
    rng = np.random.default_rng(0)
    labels = [str(i % 3) for i in range(150)]
    centres = rng.normal(size=(3, 16)) * 5
    separable = np.stack([centres[int(lab)] + rng.normal(size=16) * 0.1 for lab in labels])
    assert T.classification_scores(separable, labels, None, PROBE)["accuracy"] == 1.0
    noise = T.classification_scores(rng.normal(size=(150, 16)), labels, None, PROBE)
    assert noise["accuracy"] < 0.55  # chance is 1/3
    lo, hi = noise["accuracy_ci"]
    assert lo <= noise["accuracy"] <= hi and hi - lo > 0.05


def test_group_aware_folds_never_split_a_group_and_do_not_depend_on_embeddings():
    labels = [str(i % 3) for i in range(120)]
    groups = [f"g{i // 4}" for i in range(120)]
    folds = T.probe_folds(labels, groups, PROBE)
    assert len(folds) == PROBE.folds
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
    again = T.probe_folds(labels, groups, PROBE)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    pred[pred == 3] = 0  # a class never predicted counts 0
    assert T.macro_f1(y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_retrieval_ranks_by_cosine_with_ties_broken_by_index():
    texts = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    s = T.retrieval_scores(queries, texts, [0, 0, 2, 1], PROBE)
    # ranks: 0, 1 (text 1 is closer), 0, 1 (all tie at 0: text 0 comes first)
    assert s["recall@1"] == 0.5 and s["recall@10"] == 1.0
    assert s["mrr"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)


def test_a_real_drop_is_outside_the_paired_interval_and_noise_is_not():
    rng = np.random.default_rng(2)
    before = (rng.random(1000) < 0.8).astype(float)
    worse = before.copy()
    worse[rng.choice(1000, 100, replace=False)] = 0
    assert T.paired_interval(before, worse, resamples=1000, seed=0)[1] < 0
    shuffled = before.copy()  # as many examples won as lost: a change that is noise
    ones, zeros = np.flatnonzero(before == 1), np.flatnonzero(before == 0)
    shuffled[rng.choice(ones, 15, replace=False)] = 0
    shuffled[rng.choice(zeros, 15, replace=False)] = 1
    lo, hi = T.paired_interval(before, shuffled, resamples=1000, seed=0)
    assert lo < 0 < hi


# ----------------------------------------------------------------------------- bad input


def spec(path: Path, **kw: object) -> TaskConfig:
    return TaskConfig(name="t", path=str(path), **kw)


BAD = {
    "missing": (None, "not found"),
    "empty": ("", "no rows"),
    "one class": ("".join(json.dumps({"text": f"x {i}", "label": "a"}) + "\n" for i in range(10)), "one class only"),
    "float labels": ("".join(json.dumps({"text": f"x {i}", "label": i / 2}) + "\n" for i in range(10)),
                     "expected a string or an integer"),
    "missing field": ("".join(json.dumps({"body": f"x {i}", "label": str(i % 2)}) + "\n" for i in range(10)),
                      "no text field 'text'; the first rows have 'body', 'label'"),
    "too few per class": ("".join(json.dumps({"text": f"x {i}", "label": "a" if i < 8 else "b"}) + "\n"
                                  for i in range(10)), "label 'b' has 2 examples, fewer than the 5 folds"),
    "text not a string": ("".join(json.dumps({"text": [i], "label": str(i % 2)}) + "\n" for i in range(10)),
                          "text 'text' is [0], expected a string"),
    "json array": (json.dumps([{"text": "x", "label": "a"}]), "a JSON array"),
    "too few groups": ("".join(json.dumps({"text": f"x {i}", "label": str(i % 2), "doc": str(i % 3)}) + "\n"
                               for i in range(12)), "too few for 5 group-aware folds"),
    "not json": ("{oops\n", "line 1 is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_task_file_is_one_clear_line(tmp_path, case):
    content, expected = BAD[case]
    path = tmp_path / "task.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        T.read_task(spec(path, **({"group_field": "doc"} if "groups" in case else {})), PROBE)
    message = str(err.value)
    assert expected in message and "\n" not in message and "task 't'" in message


def test_csv_task_and_invalid_utf8(tmp_path):
    path = tmp_path / "task.csv"
    path.write_text("id,text,label\n" + "".join(f'{i},"line {i}, quoted",{i % 2}\n' for i in range(12)), encoding="utf-8")
    data = T.read_task(spec(path), PROBE)
    assert data.texts[0] == "line 0, quoted" and set(data.labels) == {"0", "1"}
    path.write_bytes(b"text,label\nok,a\n\xff\xfe,b\n")
    with pytest.raises(InputError, match="invalid UTF-8 at line 3"):
        T.read_task(spec(path), PROBE)


def test_task_recipe_keys_are_checked_and_paths_are_relative_to_the_recipe_file(tmp_path):
    with pytest.raises(Exception, match=r"eval.tasks\[0\].lable_field: unknown key \(did you mean 'label_field'\?\)"):
        build_recipe({"eval": {"tasks": [{"name": "a", "path": "x", "lable_field": "y"}]}})
    with pytest.raises(Exception, match="names two tasks"):
        build_recipe({"eval": {"tasks": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}})
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("eval:\n  tasks:\n    - {name: a, path: ../tasks/a.jsonl}\n")
    recipe = load_recipe(tmp_path / "recipes" / "r.yaml")
    assert recipe.eval.tasks[0].path == str((tmp_path / "tasks" / "a.jsonl").resolve())


def test_a_bad_task_stops_train_increment_before_any_training(one_pending, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x", "label": "a"}) + "\n", encoding="utf-8")
    result = incr("train-increment", one_pending.root, "train.steps=2", task_args(tmp_path / "bad.jsonl"))
    assert result.exit_code == 2, result.output
    assert "the first rows have 'body', 'label'" in result.output
    assert one_pending.versions() == ["v0000"] and "training" not in result.output


# ----------------------------------------------------------------------------- through training, eval and probe


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tasks")
    return write_topics(folder / "topics.jsonl"), write_pairs(folder / "pairs.jsonl")


def test_training_records_task_scores_and_eval_and_status_show_them(one_pending, task_files):
    topics, pairs = task_files
    both = (f"eval.tasks=[{{name: topics, path: {topics}, group_field: doc}}, "
            f"{{name: pairs, path: {pairs}, kind: retrieval}}]")
    # a random-init tiny model moves a lot in 3 steps; this test is about the record, not the gate
    result = incr("train-increment", one_pending.root, "train.steps=3", "gate.task_max_drop=0.5", both)
    assert result.exit_code == 0, result.output
    metrics = json.loads((one_pending.version_dir("v0001") / "metrics.json").read_text())
    rec = metrics["tasks"]["tasks"]
    assert rec["topics"]["before"]["accuracy"] > 0.5 and rec["topics"]["after"]["classes"] == 3
    assert 0 < rec["pairs"]["after"]["mrr"] <= 1 and rec["pairs"]["metric"] == "mrr"
    assert metrics["task_seconds"] > 0 and "per_example" not in rec["topics"]["after"]
    assert {c["task"] for c in metrics["gate"]["checks"] if c["check"] == "task_max_drop"} == {"topics", "pairs"}

    ev = incr("eval", one_pending.root, both, "--json")
    assert ev.exit_code == 0, ev.output
    doc = json.loads(ev.stdout)
    assert doc["tasks"]["scores"]["v0001"]["topics"]["accuracy"] == rec["topics"]["after"]["accuracy"]
    assert doc["tasks"]["scores"]["v0000"]["topics"]["accuracy"] == rec["topics"]["before"]["accuracy"]
    assert doc["tasks"]["summary"]["topics"]["final_version"] == "v0001"
    assert doc["cache"]["misses"] == 0  # every task score came from what training recorded
    status = json.loads(incr("status", one_pending.root, "--json").stdout)
    assert status["versions"][1]["tasks"]["topics"] == rec["topics"]["after"]["accuracy"]
    assert incr("export", one_pending.root, one_pending.root.parent / "card").exit_code == 0
    card = (one_pending.root.parent / "card" / "README.md").read_text(encoding="utf-8")
    assert "## Downstream tasks" in card
    assert f"| v0001 | topics | classification | accuracy | {rec['topics']['after']['accuracy']:.2f} |" in card


def test_an_independent_probe_on_the_export_agrees(tiny_workspace, task_files, tmp_path):
    """scikit-learn on mean-pooled embeddings of the exported folder, written here without incr's code."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoTokenizer

    topics, _ = task_files
    probed = incr("probe", tiny_workspace.root, topics, "--group-field", "doc", "--json")
    assert probed.exit_code == 0, probed.output
    ours = json.loads(probed.stdout)["scores"]["v0000"]["accuracy"]
    assert incr("export", tiny_workspace.root, tmp_path / "out").exit_code == 0
    rows = [json.loads(x) for x in topics.read_text().splitlines()]
    tok, model = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    y = np.array([r["label"] for r in rows])
    correct = 0
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(emb, y, [r["doc"] for r in rows]):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=ProbeConfig().C, max_iter=1000)).fit(emb[train], y[train])
        correct += int((clf.predict(emb[test]) == y[test]).sum())
    assert abs(correct / len(rows) - ours) <= 0.02, (correct / len(rows), ours)
    assert ours > 0.5  # far above chance (1/3) even for a random tiny encoder: bag-of-tokens features


def test_task_gate_rejects_a_damaging_version_that_the_perplexity_gate_passes(two_increments, task_files):
    """A naive increment at a very high learning rate: held-out perplexity improves on both increments
    (the perplexity gate passes), the encoder's features for the task collapse: the task gate rejects it."""
    topics, _ = task_files
    args = ["train-increment", two_increments.root, "train.steps=20", "train.lr=0.05", "train.warmup_ratio=0",
            "strategy.name=naive", "gate.max_forgetting=0.5", task_args(topics)]
    result = incr(*args)
    assert result.exit_code == 3, result.output
    metrics = json.loads((two_increments.version_dir("v0002") / "metrics.json").read_text())
    ppl = [c for c in metrics["gate"]["checks"] if c["check"] == "max_forgetting"]
    task = [c for c in metrics["gate"]["checks"] if c["check"] == "task_max_drop"]
    assert ppl and all(c["passed"] for c in ppl)
    assert not task[0]["passed"] and task[0]["before"] - task[0]["after"] > 0.02 and task[0]["interval"][1] < 0
    line = [x for x in result.output.splitlines() if x.startswith("error:")][0]
    assert (f"task topics: accuracy {task[0]['before']:.4f} -> {task[0]['after']:.4f}" in line
            and "margin 0.02" in line and "LATEST stays v0001" in line)
    assert two_increments.latest() == "v0001"
    assert incr("promote", two_increments.root, "v0002", "--reason", "reviewed").exit_code == 0
    assert two_increments.latest() == "v0002"


def test_the_task_gate_can_be_turned_off_per_task(two_increments, task_files):
    topics, _ = task_files
    result = incr("train-increment", two_increments.root, "train.steps=20", "train.lr=0.05", "train.warmup_ratio=0",
                  "strategy.name=naive", task_args(topics, gate="false"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((two_increments.version_dir("v0002") / "metrics.json").read_text())
    assert not [c for c in metrics["gate"]["checks"] if c["check"] == "task_max_drop"]
    assert metrics["tasks"]["tasks"]["topics"]["change"] < -0.02  # still scored and recorded


def test_scores_are_bit_for_bit_reproducible_across_processes(tiny_workspace, task_files):
    topics, pairs = task_files
    outs = []
    for _ in range(2):
        for path, extra in ((topics, ["--group-field", "doc"]), (pairs, ["--kind", "retrieval"])):
            proc = subprocess.run([sys.executable, "-m", "incr_cli", "probe", str(tiny_workspace.root), str(path),
                                   *extra, "--no-cache", "--json"],
                                  capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=300)
            assert proc.returncode == 0, proc.stderr
            scores = json.loads(proc.stdout)["scores"]["v0000"]
            assert scores.pop("seconds") > 0  # the one field that is a clock, not a score
            outs.append(scores)
    assert outs[0] == outs[2] and outs[1] == outs[3]


def test_a_workspace_that_cannot_keep_scores_still_scores(tiny_workspace, task_files):
    topics, _ = task_files
    tiny_workspace.eval_dir.mkdir(exist_ok=True)
    (tiny_workspace.eval_dir / "tasks").write_text("not a folder")  # every cache write fails
    result = incr("probe", tiny_workspace.root, topics, "--group-field", "doc", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scores"]["v0000"]["accuracy"] > 0.5


def test_probe_names_a_bad_kind_and_a_missing_file(tiny_workspace, tmp_path):
    result = incr("probe", tiny_workspace.root, tmp_path / "nope.jsonl")
    assert result.exit_code == 2 and "not found" in result.output
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "b"}\n')
    result = incr("probe", tiny_workspace.root, tmp_path / "t.jsonl", "--kind", "regression")
    assert result.exit_code == 2 and "--kind 'regression': use one of classification, retrieval" in result.output


def test_a_task_the_tokenizer_cannot_read_warns_with_the_share(tiny_workspace, tmp_path):
    path = tmp_path / "zh.jsonl"
    path.write_text("".join(json.dumps({"text": "\u6c49\u5b57\u6587\u672c \u2603\u2604 " * 3, "label": str(i % 2)},
                                       ensure_ascii=False) + "\n" for i in range(20)), encoding="utf-8")
    result = incr("probe", tiny_workspace.root, path)
    assert result.exit_code == 0, result.output
    assert "warning: task 'zh': " in result.output and "of its tokens are unknown ([UNK])" in result.output
