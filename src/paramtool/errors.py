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
    """A pickle names a global that runs code or reaches the system when loaded the ordinary way; nothing ran."""

    def __init__(self, name: str, where: str = "") -> None:
        self.name = name
        place = f" in {where}" if where else ""
        super().__init__(
            f"refused to load{place}: the pickle names the global '{name}', which runs code or reaches the system "
            "when the file is loaded the ordinary way: this file is built to run code (paramtool ran nothing)"
        )


class FormatError(ParamtoolError):
    """A file is not a valid checkpoint of the format it claims to be."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's first non-empty line (its type's name when it has none), cut at ``limit`` characters:
    a library's multi-line message as part of one ``error:`` line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
