"""Vocabulary growth in training and evaluation (issue 15, parts 3-5): the student grows to the
newest tokenizer revision with new rows at the mean of their pieces, distillation compares over the
teacher's vocabulary, scores stay comparable across vocabularies, and the version folder loads with
transformers. Tiny BERT (WordPiece), RoBERTa (byte-level BPE) and XLM-R (Unigram) models, shipped sample text."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_arch import tokenizer_for, write_family_dir
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import load_recipe
from incr_cli.data.ingest import IngestOptions, ingest
from incr_cli.line.increment import train_increment
from incr_cli.model import vocab
from incr_cli.model.weights import init_workspace
from incr_cli.scoring.evaluate import EvalGrid, evaluate
from incr_cli.store.workspace import Workspace
from incr_cli.training.terms import LogitDistill, MicroOutputs, Normalisers
from tests.helpers_reliability import assert_only_complete_versions, cli, leftovers, run_incr
from tests.helpers_train import REPO, assert_fill_mask_agrees, assert_same_weights, excerpt, weights

runner = CliRunner()
TINY = ["model.max_seq_len=32", "train.steps=2", "train.batch_size=4", "eval.max_sequences=32",
        "drift.max_sequences=4", "runtime.num_threads=1", "runtime.save_every=1"]
NEW_WORDS = 12


# ----------------------------------------------------------------------------- growing a model


def _growth(size: int, added: list[tuple[int, list[int]]]) -> vocab.Growth:
    """A Growth to ``size`` ids; only its length is read from the tokenizer here."""
    revision = vocab.Revision("new", ["old", "new"], "test", size)
    return vocab.Growth(revision, list(range(size)), added[0][0],
                        [{"id": i, "piece_ids": pieces} for i, pieces in added])


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_as_the_mean_of_their_pieces(tied):
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=40,
                                             tie_word_embeddings=tied))
    with torch.no_grad():
        model.get_output_embeddings().bias.copy_(torch.randn(50))  # the bias the projection adds
    emb0 = model.get_input_embeddings().weight.detach().clone()
    dec0 = model.get_output_embeddings().weight.detach().clone()
    bias0 = model.get_output_embeddings().bias.detach().clone()
    # 51 is made of 50 (itself new) and 7: pieces added earlier in the same growth come first
    vocab.grow_embeddings(model, _growth(52, [(50, [3, 4, 9]), (51, [50, 7])]))
    emb, dec = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    bias = model.get_output_embeddings().bias
    assert emb.shape[0] == dec.shape[0] == bias.shape[0] == model.config.vocab_size == 52
    assert torch.equal(emb[:50], emb0) and torch.equal(dec[:50], dec0) and torch.equal(bias[:50], bias0)
    torch.testing.assert_close(emb[50], emb0[[3, 4, 9]].mean(0))
    torch.testing.assert_close(emb[51], torch.stack([emb[50], emb0[7]]).mean(0))
    torch.testing.assert_close(dec[50], dec0[[3, 4, 9]].mean(0))
    torch.testing.assert_close(bias[50], bias0[[3, 4, 9]].mean())
    assert (dec.data_ptr() == emb.data_ptr()) == tied  # tying survives the resize


def test_distillation_is_over_the_teachers_vocabulary_with_the_student_renormalised():
    """The pinned definition: KD = T^2 * KL(p_t || q_s) over the teacher's V ids, where q_s is the
    student's softmax over all its V + k ids renormalised over those V (the new ids' mass removed)."""
    torch.manual_seed(0)
    n, v, k, t = 5, 11, 3, 2.0
    student = torch.randn(n, v + k, requires_grad=True)
    teacher = torch.randn(n, v + k)  # a grown teacher: its logits of the new ids are never used
    norm = Normalisers(new_targets=n, replay_targets=1, masked_targets=n, tokens=n)
    out = MicroOutputs(student, torch.zeros(n, dtype=torch.long), n, torch.ones(1, 4), norm, None, 0, 1, 1,
                       teacher_logits=teacher)
    loss = LogitDistill(1.0, t, shared_vocab=v)(out)

    full = F.softmax(student / t, dim=-1)  # (n, V + k)
    renormalised = full[:, :v] / full[:, :v].sum(-1, keepdim=True)
    p_teacher = F.softmax(teacher[:, :v] / t, dim=-1)
    expected = t * t * (p_teacher * (p_teacher.log() - renormalised.log())).sum() / n
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.count_nonzero(student.grad[:, v:]) == 0  # learning the new ids is the MLM terms' job
    same_vocab = LogitDistill(1.0, t)(MicroOutputs(student[:, :v], out.targets, n, out.attention_mask, norm, None,
                                                   0, 1, 1, teacher_logits=teacher[:, :v]))
    torch.testing.assert_close(loss, same_vocab)  # without growth: the plain term


# ----------------------------------------------------------------------------- a grown line end to end


def _grown_line(tmp_path: Path, family: str, first: tuple[str, ...] = ()) -> tuple[Workspace, list[str]]:
    """v0001 trained on an Austen excerpt (recipe overrides ``first``); d0002 (Python docs) ingested
    with NEW_WORDS new tokens."""
    base = "scratch:tiny" if family == "bert" else str(write_family_dir(tmp_path / "base", family))
    root = tmp_path / "ws"
    init_workspace(root, base, load_recipe(REPO / "recipes" / "cpu-tiny.yaml", TINY))
    ws = Workspace.open(root)
    texts = tmp_path / "texts"
    texts.mkdir()
    recipe = load_recipe(ws.recipe_path)
    with ws.lock("test"):
        first_inc = ingest(ws, [str(excerpt("austen.txt", slice(0, 120), texts))], recipe=recipe).increment
        train_increment(ws, load_recipe(ws.recipe_path, list(first)))
        second = ingest(ws, [str(excerpt("pydocs.txt", slice(0, 300), texts))], recipe=recipe,
                        options=IngestOptions(extend_vocab=NEW_WORDS)).increment
    return ws, [first_inc, second]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_a_grown_line_trains_scores_comparably_and_loads_with_transformers(tmp_path, family):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    ws, (austen, pydocs) = _grown_line(tmp_path, family)
    old_size = len(tokenizer_for(family))
    with ws.lock("train-increment"):
        result = train_increment(ws, load_recipe(ws.recipe_path))
    assert result.promoted and ws.latest() == "v0002"
    metrics = result.metrics
    assert {"mlm_new", "mlm_replay", "distill"} <= set(metrics["loss"])  # replay and KD ran on the grown student
    assert metrics["head"]["kind"] != "full"  # the masked-only head with the larger vocabulary
    grown = metrics["vocab"]
    assert grown["parent_size"] == old_size and grown["size"] == old_size + NEW_WORDS == grown["tokens_added"] + old_size
    manifest = ws.version_manifest("v0002")
    assert manifest["tokenizer"]["revision"] == 1 and manifest["vocab_growth"]["tokens_added"] == NEW_WORDS
    assert manifest["tokenizer"]["lineage"] == ws.increment_manifest(pydocs)["vocab"]["lineage"]
    assert ws.version_manifest("v0001")["tokenizer"]["revision"] == 0

    before, after, shared = (metrics["eval"][k] for k in ("before", "after", "after_shared_vocab"))
    assert before[austen]["coverage"] == after[austen]["coverage"] == 1.0  # old ids: every position
    assert 0 < before[pydocs]["coverage"] < 1 and after[pydocs]["coverage"] == 1.0
    assert shared[pydocs]["coverage"] == before[pydocs]["coverage"]  # the gate compares the same positions
    assert all(math.isfinite(s["loss"]) for s in (*before.values(), *after.values(), *shared.values()))

    scores = evaluate(ws, EvalGrid(ws.versions(), [austen, pydocs]), load_recipe(ws.recipe_path))
    assert scores.scores["v0001"][pydocs]["coverage"] == before[pydocs]["coverage"]  # the same cell as training's
    assert scores.scores["v0001"][pydocs]["loss"] == pytest.approx(before[pydocs]["loss"])
    assert scores.scores["v0002"][austen]["coverage"] == 1.0
    assert scores.summaries["perplexity"].to_dict([austen, pydocs])  # forgetting etc. computed
    assert runner.invoke(app, ["verify", str(ws.root), "--all"]).exit_code == 0
    shown = runner.invoke(app, ["eval", str(ws.root)])  # cached cells: nothing scored again
    assert shown.exit_code == 0 and f"({before[pydocs]['coverage']:.0%})" in shown.output, shown.output

    folder = str(ws.version_dir("v0002"))
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForMaskedLM.from_pretrained(folder)
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == old_size + NEW_WORDS
    word = vocab.surface(grown["added"][0]["token"])
    ids = tok(f"a {word}", add_special_tokens=False)["input_ids"]
    assert ids[-1] == grown["added"][0]["id"]  # the new word is one token
    fill = pipeline("fill-mask", model=folder, tokenizer=folder, device="cpu")
    # the pipeline runs the grown model: its top 3 are the model's own, over all old + new ids
    assert_fill_mask_agrees(fill, f"The {fill.tokenizer.mask_token} of {word} is here.")
    assert fill.model.get_output_embeddings().weight.shape[0] == old_size + NEW_WORDS


@pytest.mark.slow
def test_ewc_holds_only_the_parents_rows_and_joint_refuses_a_grown_vocabulary(tmp_path):
    ws, _ = _grown_line(tmp_path, "bert", first=("strategy.name=ewc",))
    assert (ws.version_dir("v0001") / "fisher.safetensors").is_file()
    joint = runner.invoke(app, ["train-increment", str(ws.root), "strategy.name=joint"])
    assert joint.exit_code == 2 and "architecture" in joint.output and ws.versions() == ["v0000", "v0001"]
    ewc = runner.invoke(app, ["train-increment", str(ws.root), "strategy.name=ewc"])
    assert ewc.exit_code == 0, ewc.output
    assert "ewc" in ws.version_manifest("v0002")["recipe"]["strategy"]["name"]
    assert json.loads((ws.version_dir("v0002") / "metrics.json").read_text())["vocab"]["tokens_added"] == NEW_WORDS


@pytest.mark.slow
def test_kill_9_during_a_resizing_train_then_rerun_equals_uninterrupted(tmp_path):
    ws, _ = _grown_line(tmp_path / "a", "bert")
    killed = Workspace(ws.root).copy_to(tmp_path / "killed")
    args = ["train.steps=4", "runtime.save_every=2"]
    assert cli("train-increment", ws.root, *args).exit_code == 0  # the uninterrupted reference

    proc = run_incr("train-increment", killed.root, *args, fault="train.step@3:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert assert_only_complete_versions(killed)["latest"] == "v0001"
    again = cli("train-increment", killed.root, *args)
    assert again.exit_code == 0, again.output
    assert "resuming from step 2 of 4" in again.output
    assert_same_weights(weights(killed, "v0002"), weights(ws, "v0002"))
    assert not leftovers(killed)


@pytest.mark.slow
def test_kill_9_during_an_extending_ingest_then_rerun_equals_uninterrupted(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root, "scratch:tiny", load_recipe(REPO / "recipes" / "cpu-tiny.yaml", TINY))
    ws = Workspace.open(root)
    reference = ws.copy_to(tmp_path / "reference")
    path = excerpt("pydocs.txt", slice(0, 300), tmp_path)
    assert cli("ingest", reference.root, path, "--extend-vocab", "5").exit_code == 0

    proc = run_incr("ingest", ws.root, path, "--extend-vocab", "5", fault="ingest.before_rename:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ws.increments() == []  # no half-written increment, no revision
    again = cli("ingest", ws.root, path, "--extend-vocab", "5", "--json")
    assert again.exit_code == 0, again.output
    inc = json.loads(again.stdout)["increment"]
    assert ws.verify_increment(inc)["files"] == reference.verify_increment(inc)["files"]  # byte-identical
    assert not list(ws.staging.glob("tmp-*"))
