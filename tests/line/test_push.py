"""`incr push` against a local stand-in of the Hub's upload endpoints (tests/helpers_hub.py) with
the real huggingface_hub client: what is sent, the card, and every refusal before the network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers_hub import HubStandIn

from incr_cli.store.workspace import Workspace


def _incr(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incr_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture
def hub_env(tmp_path):
    """The environment of a user with no token and no cached login (HF_HOME is empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


def test_push_sends_the_export_in_one_commit(tiny_workspace: Workspace, hub_env, tmp_path):
    with HubStandIn() as hub:
        env = {**hub_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token}
        run = _incr("push", tiny_workspace.root, "me/tiny-line", "--private", "--license", "mit", "--json", env=env)
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
    repo = hub.repos["me/tiny-line"]
    assert repo.private and repo.commits == [f"incr: {tiny_workspace.root.name} v0000"]
    assert doc["version"] == "v0000" and doc["license"] == "mit" and set(doc["files"]) == set(repo.files)
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests) or max(doc["files"].values()) <= (1 << 20)
    export = tmp_path / "export"
    assert _incr("export", tiny_workspace.root, export, env=hub_env).returncode == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert repo.files[name] == (export / name).read_bytes(), name
    card = repo.files["README.md"].decode()
    assert "license: mit" in card.split("---")[1] and 'model="me/tiny-line"' in card and "PATH/TO" not in card


def test_large_weights_go_through_lfs(tiny_workspace: Workspace, hub_env, monkeypatch):
    import helpers_hub

    monkeypatch.setattr(helpers_hub, "LFS_ABOVE", 1000)  # the tiny model's weights are ~1 MB
    with HubStandIn() as hub:
        env = {**hub_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token}
        assert _incr("push", tiny_workspace.root, "me/lfs", "--license", "mit", env=env).returncode == 0
    # the stand-in runs in this process, so the patched threshold applies to it
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests)
    assert len(hub.repos["me/lfs"].files["model.safetensors"]) > 1000


def test_dry_run_lists_the_files_and_sends_nothing(tiny_workspace: Workspace, hub_env):
    run = _incr("push", tiny_workspace.root, "me/tiny-line", "--dry-run", "--json",
                env={**hub_env, "HF_ENDPOINT": _closed_port()})
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["dry_run"] and {"model.safetensors", "README.md", "config.json"} <= set(doc["files"])
    assert doc["license"] == "unknown" and doc["url"] is None


@pytest.mark.parametrize("case", ["unknown license", "no token", "offline", "unreachable", "refused", "bad id"])
def test_push_refusals_are_one_line_and_exit_2(tiny_workspace: Workspace, hub_env, case):
    with HubStandIn() as hub:
        env = {**hub_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token}
        args = ["--license", "mit"]
        want = {"unknown license": "license is unknown; pass --license", "no token": "no Hugging Face token",
                "offline": "HF_HUB_OFFLINE is set", "unreachable": "cannot reach the Hub at",
                "refused": "the Hub refused the push to me/x", "bad id": "use NAME or OWNER/NAME"}[case]
        repo = "me/x"
        if case == "unknown license":
            args = []
        elif case == "no token":
            del env["HF_TOKEN"]
        elif case == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        elif case == "unreachable":
            env["HF_ENDPOINT"] = _closed_port()
        elif case == "refused":
            hub.refuse = 403
        else:
            repo = "me/x/y"
        run = _incr("push", tiny_workspace.root, repo, *args, env=env)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], run.stderr
    if case not in ("unreachable", "refused"):
        assert hub.requests == []  # refused before the network
    assert not hub.repos.get("me/x", None) or not hub.repos["me/x"].files
