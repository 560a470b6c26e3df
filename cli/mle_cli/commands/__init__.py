"""The typer commands; thin wrappers over the library."""
