"""line: operating a model line: one increment end to end (``increment.py``), promote/rollback/history
(``lifecycle.py``), garbage collection (``retention.py``) and export."""
