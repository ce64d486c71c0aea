"""line: operating a model line: one increment end to end (``increment.py``), promote/rollback/history
(``lifecycle.py``), garbage collection (``retention.py``) and export.

Why ``export.py`` imports the model and embedding modules inside its functions: ``incr export`` and
``incr push`` refuse a bad format, repository id, token or offline setting before torch loads."""
