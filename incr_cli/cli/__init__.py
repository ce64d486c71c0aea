"""The Typer CLI: thin commands that parse, call one library function and render the result.

Why the commands import the library inside their bodies: `incr --help`, `incr status` and the other
commands that load no model start without torch or transformers (tests/cli/test_startup.py)."""
