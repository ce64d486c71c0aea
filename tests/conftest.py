"""Shared fixtures: the cpu-tiny recipe, a ready workspace, the shipped samples, a local model dir.

Everything is built offline from a config; no test touches the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from incr_cli.config.recipe import Recipe, load_recipe
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "cpu-tiny.yaml"


@pytest.fixture(autouse=True)
def _cpu_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """`runtime.precision: auto` resolves as on a CPU without bf16 matrix units in every test, so no
    test's result depends on this machine's CPU; tests/runtime/test_precision.py stubs both answers."""
    from incr_cli.runtime import device

    monkeypatch.setattr(device, "cpu_has_bf16_matmul", lambda: False)


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches a tracking server named by this machine's environment (promote and rollback
    talk to MLflow whenever $MLFLOW_TRACKING_URI is set); tests that track set their own store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def tiny_recipe_path() -> Path:
    """recipes/cpu-tiny.yaml."""
    return TINY_RECIPE


@pytest.fixture(scope="session")
def tiny_recipe(tiny_recipe_path: Path) -> Recipe:
    return load_recipe(tiny_recipe_path)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The shipped text excerpts (austen.txt, fortunes.txt, pydocs.txt)."""
    return REPO / "samples"


@pytest.fixture(scope="session")
def _tiny_workspace_template(tmp_path_factory: pytest.TempPathFactory, tiny_recipe: Recipe) -> Path:
    from incr_cli.model.weights import init_workspace

    root = tmp_path_factory.mktemp("template") / "ws"
    init_workspace(root, "scratch:tiny", tiny_recipe)
    return root


@pytest.fixture
def tiny_workspace(tmp_path: Path, _tiny_workspace_template: Path) -> Workspace:
    """A fresh workspace (copy of one initialised from scratch:tiny with cpu-tiny): LATEST = v0000."""
    return Workspace(_tiny_workspace_template).copy_to(tmp_path / "ws")


def write_tiny_model_dir(folder: Path, *, with_head: bool = True, pickle: bool = False, seed: int = 0,
                         dropout: float = 0.1) -> Path:
    """A local Hugging Face-layout dir: a tiny BERT (MLM head or bare encoder) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from incr_cli.model.weights import scratch_tokenizer

    tokenizer = scratch_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config) if with_head else BertModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pickle:  # the legacy format: same weights in a torch pickle, no safetensors
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A local model dir with a tiny BertForMaskedLM (hidden 32, 2 layers) and the scratch tokenizer."""
    return write_tiny_model_dir(tmp_path / "tiny-model")


@pytest.fixture(scope="session")
def workspace_copy(tmp_path_factory: pytest.TempPathFactory):
    """``workspace_copy(kind, dest)``: a fresh copy at ``dest`` of a workspace built once per session
    (``helpers_train.template``): "one_pending", "two_increments" or "two_increments_no_dropout"."""
    from tests.helpers_train import template

    def copy(kind: str, dest: Path) -> Workspace:
        return Workspace(template(tmp_path_factory, kind)).copy_to(dest)

    return copy


@pytest.fixture
def one_pending(tmp_path: Path, workspace_copy) -> Workspace:
    """scratch:tiny at v0000 with one ingested, pending increment (a copy of a cached template)."""
    return workspace_copy("one_pending", tmp_path / "ws")


@pytest.fixture
def two_increments(tmp_path: Path, workspace_copy) -> Workspace:
    """v0001 trained on a first increment, a second one pending (a copy of a cached template)."""
    return workspace_copy("two_increments", tmp_path / "ws")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per reason a test was skipped, with the count: what a plain CPU machine leaves out
    (CUDA, root for the tmpfs of the full-disk tests, ...) is printed, not just a number."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"skipped {count}: {reason}")
