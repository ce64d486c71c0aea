"""incr: continual masked-language-model fine-tuning of BERT-family encoders.

The Python API (``incr_cli.init``, ``ingest``, ``train_increment``, ``evaluate``, ``promote``,
``rollback``, ``export``) lives in ``incr_cli.api`` and is read from there on first use, so that
``import incr_cli`` loads neither torch nor transformers.
"""

__version__ = "0.1.0"

# Version of the on-disk formats (workspace, manifests). A manifest with a newer format is refused.
FORMAT_VERSION = 1

_API = ("Increment", "evaluate", "export", "ingest", "init", "promote", "rollback", "train_increment")


def __getattr__(name: str):
    if name in _API:
        from incr_cli import api  # the API imports the store and config: read it only when asked for

        return getattr(api, name)
    raise AttributeError(f"module 'incr_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
