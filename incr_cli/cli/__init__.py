"""The Typer CLI: thin commands that parse, call one library function and render the result."""
