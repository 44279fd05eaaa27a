"""Streamed surgery writes: placeholder until the streaming writers land."""
from __future__ import annotations

from typing import Any


def can_stream(listing: Any, plan: Any) -> bool:
    return False


def write(listing: Any, plan: Any, output: Any) -> None:
    raise NotImplementedError
