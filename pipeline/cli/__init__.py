"""The `pipeline` command: :mod:`pipeline.cli.commands` (one subcommand per stage, plus tools) and
:mod:`pipeline.cli.options` (options generated from the config models). ``python -m pipeline.cli`` runs it."""

from pipeline.cli.commands import app, main

__all__ = ["app", "main"]
