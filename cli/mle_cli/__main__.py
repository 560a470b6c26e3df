"""`python -m mle_cli` runs the `mle` command."""

from mle_cli.app import cli

cli()
