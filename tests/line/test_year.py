"""A year in miniature: 30 nightly increments on a tiny model with retention.keep_last 3, gc after
every night, two rollbacks and one manual promotion of a version the gate rejected. Disk stays
bounded, `verify --all` stays clean, and the eval table still lists every version."""

from __future__ import annotations

import json

import pytest

from incr_cli.config.recipe import load_recipe
from incr_cli.store.files import folder_bytes
from tests.helpers_reliability import cli
from tests.helpers_train import tagged_rows, write_increment

NIGHT = ["train.steps=1", "train.batch_size=4", "eval.max_sequences=4", "runtime.num_threads=1",
         "runtime.save_every=0"]
NIGHTS, KEEP = 30, 3


@pytest.mark.slow
def test_a_year_in_miniature(tiny_workspace):
    ws = tiny_workspace
    ws.recipe_path.write_text(ws.recipe_path.read_text().replace("keep_last: null", f"keep_last: {KEEP}"))
    T = load_recipe(ws.recipe_path).model.max_seq_len
    with_weights = []
    for night in range(NIGHTS):
        write_increment(ws, f"night{night:02d}", tagged_rows(100 + night, 8, T), tagged_rows(200 + night, 4, T))
        strict = ["gate.min_improvement=0.99"] if night == 9 else []
        trained = cli("train-increment", ws.root, *NIGHT, *strict)
        assert trained.exit_code == (3 if strict else 0), trained.output
        if strict:  # reviewed by a person: promoted after all
            assert cli("promote", ws.root, ws.versions()[-1], "--reason", "reviewed").exit_code == 0
        if night in (14, 22):  # misbehaves in production
            assert cli("rollback", ws.root, "--reason", "bad answers").exit_code == 0
        assert cli("gc", ws.root).exit_code == 0
        with_weights.append([v for v in ws.versions() if ws.pruned(v) is None])
        assert len(with_weights[-1]) <= 2 * KEEP  # the newest KEEP and the last KEEP rollback targets
    assert ws.versions() == [f"v{i:04d}" for i in range(NIGHTS + 1)]
    one_version = folder_bytes(ws.version_dir(ws.latest()))
    assert folder_bytes(ws.checkpoints) < 2 * KEEP * one_version + NIGHTS * 20_000  # weights + kept metadata
    commands = [m["command"] for m in json.loads(cli("history", ws.root, "--json").stdout)["moves"]]
    assert commands.count("rollback") == 2 and commands.count("promote") == 1
    assert cli("verify", ws.root, "--all").exit_code == 0
    table = cli("eval", ws.root, "--versions", "all", *NIGHT)
    assert table.exit_code == 0, table.output
    for version in ws.versions():
        assert version in table.stdout, version
    assert "(pruned" in table.stdout or "pruned)" in table.stdout
