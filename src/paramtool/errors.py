"""Exceptions of the paramtool core.

The core raises these; only the CLI turns them into an ``error:`` line and an exit code.
"""
from __future__ import annotations


class ParamtoolError(Exception):
    """The input or the operation failed (exit 1). The message is one readable line."""

    exit_code = 1


class UsageError(ParamtoolError):
    """The command line is wrong (exit 2)."""

    exit_code = 2


class RefusedGlobal(ParamtoolError):
    """A pickle asked for a global that is not on the allowlist; nothing was run."""

    def __init__(self, name: str, where: str = "") -> None:
        self.name = name
        place = f" in {where}" if where else ""
        super().__init__(
            f"refused to load{place}: the pickle needs the global '{name}', which is not allowed "
            "(paramtool only loads tensors, containers and torch.nn module classes; it never runs code from a file)"
        )


class FormatError(ParamtoolError):
    """A file is not a valid checkpoint of the format it claims to be."""
