"""incr: continual masked-language-model fine-tuning of BERT-family encoders."""

__version__ = "0.1.0"

# Version of the on-disk formats (workspace, manifests). A manifest with a newer format is refused.
FORMAT_VERSION = 1
