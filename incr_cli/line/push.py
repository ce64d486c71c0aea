"""``incr push``: publish a version to the Hugging Face Hub as its export (weights, tokenizer,
sentence-transformers packaging, a model card naming the repository), through ``huggingface_hub``.

The export is built in a temporary folder and sent with ``HfApi.upload_folder`` in one commit; the
token comes from the usual places (``HF_TOKEN``, ``hf auth login``), the endpoint from
``HF_ENDPOINT``. Everything that can be known before the network is checked first: the version,
a license (a card saying ``unknown`` is not published without ``--license``), a token, offline
mode. ``huggingface_hub`` is imported only here, when a push is asked for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incr_cli.errors import UsageError, clip
from incr_cli.line.export import UNKNOWN_LICENSE, check_format, export_to
from incr_cli.store.workspace import Workspace

REPO_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass
class PushResult:
    repo_id: str
    version: str
    files: dict[str, int]  # relative path -> bytes
    dry_run: bool
    url: str | None = None  # the repository's page
    commit: str | None = None  # the commit's URL
    license: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "version": self.version, "files": self.files, "dry_run": self.dry_run,
                "bytes": sum(self.files.values()), "url": self.url, "commit": self.commit, "license": self.license}


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(set(p) - REPO_ID_CHARS for p in parts) or len(repo_id) > 96:
        raise UsageError(f"repository id {clip(repo_id)}: use NAME or OWNER/NAME (letters, digits, - _ .)")
    return repo_id


def push_version(ws: Workspace, version: str | None, repo_id: str, *, private: bool = False,
                 license_id: str | None = None, dry_run: bool = False) -> PushResult:
    """Export ``version`` (LATEST by default) and upload it to ``repo_id`` -> what was (or would be) sent."""
    check_repo_id(repo_id)
    name = ws.resolve_version(version)
    known = license_id or (ws.version_manifest(name).get("source") or {}).get("license")
    if not dry_run and (not known or known == UNKNOWN_LICENSE):
        raise UsageError(f"{name}: the base's license is unknown; pass --license ID (e.g. apache-2.0, mit) "
                         "for the model and its data before publishing")
    api = None if dry_run else _hub_api()
    with tempfile.TemporaryDirectory(prefix="incr-push-") as tmp:
        folder = Path(tmp) / "export"
        export_to(ws, name, folder, check_format("fp32", None, "safetensors"), repo_id, license_id)  # the card once
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        out = PushResult(repo_id, name, files, dry_run, license=known or UNKNOWN_LICENSE)
        if api is not None:
            out.url, out.commit = _upload(api, folder, repo_id, private, f"incr: {ws.root.name} {name}")
    return out


def _hub_api() -> Any:
    """An ``HfApi`` with a token, or a UsageError saying what is missing (before anything is built)."""
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError("incr push needs huggingface_hub: pip install huggingface_hub") from None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UsageError("HF_HUB_OFFLINE is set: incr push needs the network; unset it, or use --dry-run")
    token = huggingface_hub.get_token()
    if not token:
        raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    huggingface_hub.utils.disable_progress_bars()  # incr prints its own table; cron logs stay plain
    return huggingface_hub.HfApi(token=token)


def _upload(api: Any, folder: Path, repo_id: str, private: bool, message: str) -> tuple[str, str]:
    """Create the repository (if new) and send ``folder`` in one commit -> (repository URL, commit URL).
    A refusal or an unreachable Hub is a UsageError naming the endpoint and the reason."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except HfHubHTTPError as exc:
        raise UsageError(f"the Hub refused the push to {repo_id}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS: the HTTP client's own error types
        raise UsageError(f"cannot reach the Hub at {api.endpoint} ({type(exc).__name__}: {clip(str(exc), 200)}); "
                         "check the network, or use --dry-run") from None
    return str(repo), str(getattr(commit, "commit_url", commit))
