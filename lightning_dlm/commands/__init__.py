"""Subcommands of ``dlm`` beyond LightningCLI's fit/validate/test."""

from __future__ import annotations

from typing import List

from lightning_dlm.core.errors import DLMError, first_line


def parse_or_one_line(parser, args: List[str]):
    """``parser.parse_args(args)`` of a parser made with ``exit_on_error=False``; a bad command line
    becomes one ``DLMError`` line naming the subcommand (``--help`` still exits 0)."""
    try:
        return parser.parse_args(args)
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError and kin: one line
        first = first_line(err)
        raise DLMError(f"{parser.prog}: {first}: see {parser.prog} --help") from None
