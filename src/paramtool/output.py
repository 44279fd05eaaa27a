"""Where output goes, decided once: a command's result as one JSON document or as text for people on stdout;
warnings, notes and the one ``error:`` line on stderr; the quiet end of a closed pipe.

Shared by the full command line (``cli``) and the fast path (``launch``). rich is imported only when something
is rendered for people (``--json`` runs never load it); every name from a file is escaped (``safe_name``)
before it is printed.
"""
from __future__ import annotations

import os
import sys
import threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Callable



_DISPLAY: list[Any] = []  # the progress display on stderr while it runs (rich allows one live display)
_LOCK = threading.Lock()
_SETTLED: list[bool] = []  # output began: a transfer finishing now (read ahead) no longer shows
TRANSFER_SHOWN = 16 << 20  # bytes received before a remote transfer's progress shows (a listing never shows it)


def progress_display() -> Any:
    """The progress display on stderr (rich, transient), started on first use; ``settle`` stops it. It leaves
    stdout and stderr alone: whatever is printed stops it first (``settle``), since a live display redraws
    over the lines below it."""
    with _LOCK:
        if not _DISPLAY:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[detail]}"), console=err_console(),
                           transient=True, redirect_stdout=False, redirect_stderr=False)
            bar.start()
            _DISPLAY.append(bar)
        return _DISPLAY[0]


def settle() -> None:
    """Stop the progress display, if one runs (before anything is printed, and at the end)."""
    with _LOCK:
        _SETTLED.append(True)
        while _DISPLAY:
            _DISPLAY.pop().stop()


def watch_transfers() -> None:
    """Show the bytes a remote source sends as they arrive (``blobio.watch_transfers``; a terminal's), once
    there are ``TRANSFER_SHOWN`` of them: the count received and its rate (the total is not known ahead: a
    selection, a read ahead)."""
    import time

    from .blobio import watch_transfers as watch

    seen: list[Any] = [0, None, 0.0, 0]  # bytes so far; the display's task, when it was shown and the bytes then
    counting = threading.Lock()
    _SETTLED.clear()  # (a command begins: nothing printed yet)

    def watcher(n: int) -> None:  # (on the threads that fetch parts)
        with counting:
            seen[0] += n
            if _SETTLED or seen[0] < TRANSFER_SHOWN:
                return
            bar = progress_display()
            if seen[1] is None:
                seen[1:] = [bar.add_task("received", total=None, detail=""), time.monotonic(), seen[0]]
            elapsed = time.monotonic() - seen[2]
            rate = f", {(seen[0] - seen[3]) / 2**20 / elapsed:,.0f} MiB/s" if elapsed > 0.1 else ""
            bar.update(seen[1], completed=seen[0], detail=f"{seen[0] / 2**20:,.0f} MiB{rate}")

    watch(watcher)


def safe_name(name: Any) -> str:
    """``render.safe_name``, imported when something is printed: ``render`` (and the ``ties`` and ``toc`` it
    imports, about 6 ms) is not on the path of ``show``, which prints a string it was handed."""
    from .render import safe_name as escape

    return escape(name)


def out_console() -> Any:
    """stdout: data only. Colour only on a terminal and never with NO_COLOR (rich honours both).

    Down a pipe, lines are not wrapped (``| grep`` sees whole lines) unless COLUMNS asks for a width."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 4096
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)


def err_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    settle()
    err_console().print(f"warning: {safe_name(message)}", style="yellow", markup=False)


def route_warnings() -> None:
    """Library warnings (torch's, numpy's) as one ``warning:`` line each, in our format."""
    import warnings

    warnings.showwarning = lambda message, *_: warn(str(message))


def emit_json(obj: Any) -> None:
    from .render import dumps

    settle()
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


class Sink:
    """One command's output: ``--json`` or not is decided here, once; commands hand over data."""

    def __init__(self, json_out: bool = False) -> None:
        self.json = json_out

    def result(self, found: Any, human: Callable[[Any], None] | None = None) -> None:
        """``found.as_json()`` (or ``found`` itself, a document) as one line of JSON, else ``human(console)``
        prints it for people."""
        if self.json or human is None:
            emit_json(found.as_json() if hasattr(found, "as_json") else found)
        else:
            settle()
            human(out_console())

    def values(self, shown: Any) -> None:
        """``show``'s result: a JSON document, or the text ``print(t)`` prints."""
        if self.json:
            emit_json(shown)
        else:
            settle()
            sys.stdout.write(shown + "\n")
            sys.stdout.flush()

    def warn(self, text: str) -> None:
        warn(text)

    def note(self, text: str) -> None:
        settle()
        err_console().print(safe_name(text), markup=False)


def error_line(message: str) -> None:
    """The one line a failure prints: ``error:`` and the message's first line, escaped."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    settle()
    sys.stderr.write(f"error: {safe_name(first)}\n")
    sys.stderr.flush()


def quiet_pipe() -> int:
    """A closed stdout (``| head``): nothing more is written to it, and the exit status is 141 (as SIGPIPE's)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 141


def each_source(sources: list[str] | None, one: Callable[[str | None], int | None], json_out: bool) -> int:
    """Run ``one(source)`` (which returns an exit status or None) for each source; the worst status. With several,
    a heading ``==> SOURCE <==`` (as ``head``) before each human-readable report, and a failing source is reported
    as ``error: SOURCE: …`` and the next one is read."""
    from .errors import ParamtoolError, UsageError, first_line

    items: list[str | None] = list(sources or [None])
    if sum(1 for s in items if s in (None, "-")) > 1 or (len(items) > 1 and None in items):
        raise UsageError("standard input ('-') can be read only once")
    worst = 0
    for i, source in enumerate(items):
        if len(items) > 1 and not json_out:
            settle()
            sys.stdout.write(("\n" if i else "") + f"==> {safe_name(source or '-')} <==\n")
            sys.stdout.flush()
        try:
            code = one(source) or 0
        except ParamtoolError as e:
            if len(items) == 1 or isinstance(e, UsageError):
                raise
            first = first_line(e)
            named = first if (source or "-") in first else f"{source or '-'}: {first}"  # say which source failed
            error_line(named)
            code = e.exit_code
        worst = max(worst, code)
    return worst
