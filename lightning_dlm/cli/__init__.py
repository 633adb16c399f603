"""The ``dlm`` command line (:mod:`.main`: the subcommand table and ``main``)."""

from lightning_dlm.cli.main import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]
