"""The program's entry point: the ``--json`` forms scripts call in loops are answered before typer is imported.

``inspect``, ``ties`` and ``schemes`` with ``--json`` (listing: Python's own start-up should be the only fixed
cost), ``stats SOURCE --json`` and ``diff A B --json`` (which compute with numpy where the bytes are
mapped, so typer's and rich's import would be a quarter of a 1 GiB run), and ``show SOURCE NAME`` with or
without ``--json`` (printed with numpy as torch prints it, ``printing``: torch's import is the whole cost). A
command line made only of what these forms take (SOURCE, ``--json``, ``--layer``/``-l``, ``--depth``, ``--key``)
is recognised here and handed to the same query (``queries``) and output sink (``output``) as the full CLI's,
with no typer, click or rich imported; anything else (help, other options, other commands, a usage error,
``stats`` with its progress bar on a terminal) goes to the full CLI unchanged, which then answers it.
"""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

# command -> the options that take a value (--json is the flag every fast form requires)
_FAST = {"inspect": {"--layer", "-l", "--depth", "--key"}, "ties": {"--key"}, "schemes": set(),
         "stats": {"--layer", "-l", "--key"}, "diff": {"--key"}, "show": {"--key"}}
_POSITIONALS = {"schemes": 0, "diff": 2, "show": 2}  # how many the command takes (others: SOURCE…, or none: stdin)
_TEXT = {"show"}  # the forms answered here with or without --json


def _parse(argv: list[str]) -> tuple[str, list[str], dict[str, list[str]]] | None:
    """(command, positional arguments, options) when argv is a fast form, else None."""
    if not argv or argv[0] not in _FAST or ("--json" not in argv and argv[0] not in _TEXT):
        return None
    command, takes = argv[0], _FAST[argv[0]]
    positionals: list[str] = []
    opts: dict[str, list[str]] = {}
    rest = argv[1:]
    json_flag = False
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        if arg == "--json":
            json_flag = True
        elif name in takes and eq and name.startswith("--"):
            opts.setdefault(name, []).append(value)
        elif arg in takes and i + 1 < len(rest):
            opts.setdefault(arg, []).append(rest[i + 1])
            i += 1
        elif (not arg.startswith("-") or arg == "-") and len(positionals) < _POSITIONALS.get(command, 1 << 30):
            positionals.append(arg)
        else:
            return None  # anything else: the full CLI decides
        i += 1
    if (not json_flag and command not in _TEXT) or any(len(v) > 1 for k, v in opts.items() if k in ("--depth", "--key")):
        return None
    if json_flag:
        opts["--json"] = []
    if "--depth" in opts and not (opts["--depth"][0].isdigit()):
        return None  # the full CLI reports the usage error
    if command in ("diff", "show") and (len(positionals) != 2 or "-" in positionals[:1]):
        return None  # (standard input is read once: a diff or show of it is the full CLI's from the start)
    if len(positionals) > 1 and command not in ("diff", "show") and not all(os.path.isfile(p) and not p.endswith(".index.json")
                                                              for p in positionals):
        return None  # several sources: files only here (stdin, directories, specs: the full CLI)
    return command, positionals, opts


class _Slow(Exception):
    """This command line needs the full CLI after all."""


def _run(command: str, positionals: list[str], opts: dict[str, list[str]]) -> int:
    """Dispatch to the command's query (``queries``), its result to the sink (``output``), as the full CLI does."""
    from .blob import is_remote
    from .output import Sink, each_source

    out = Sink("--json" in opts)
    if sys.stderr.isatty() and (command == "stats" or any(is_remote(p) for p in positionals)):
        raise _Slow  # a terminal gets the full CLI's progress bars (stats; the bytes a remote source sends)
    if len(positionals) > 1 and command not in ("diff", "show"):  # several sources: one document each, the worst status
        return each_source(positionals, lambda one: _run1(command, [one], opts, out), True)
    return _run1(command, positionals, opts, out)


def _run1(command: str, positionals: list[str], opts: dict[str, list[str]], out: Any) -> int:
    from . import queries

    key = (opts.get("--key") or [None])[0]
    layers = opts.get("--layer", []) + opts.get("-l", [])
    if command == "schemes":
        out.result(queries.schemes())
        return 0
    if command == "diff":
        result = queries.diff(positionals[0], positionals[1], key)
        out.result(result)
        return 0 if result.equal else 1
    from . import sources

    src = sources.resolve(positionals[0] if positionals else None)
    if command == "show":
        out.values(queries.show(src, key, positionals[1], "--json" in opts, out))
    elif src.directory and (command != "stats" or layers):  # (model directories: the full CLI's, as before)
        raise _Slow
    elif command == "stats":
        out.result(queries.stats(src, key, layers, out))
    elif command == "ties":
        out.result(queries.ties(src, key, False, out))
    else:
        out.result(queries.inspect(src, key, layers, out))
    return 0


def _fast(argv: list[str]) -> int | None:
    """The exit status of a fast form, or None to hand the command line to the full CLI."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    from .errors import ParamtoolError, UsageError
    from .output import error_line, quiet_pipe, route_warnings

    route_warnings()  # (as the full CLI)
    try:
        return _run(*parsed)
    except (UsageError, _Slow):
        return None  # usage errors are worded (and exit 2) by the full CLI
    except ParamtoolError as e:
        from .formats.pins import cause

        error_line(str(cause(e)))
        return e.exit_code
    except BrokenPipeError:
        return quiet_pipe()
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception:
        if os.environ.get("PARAMTOOL_DEBUG") == "1":
            raise
        return None  # a bug here: let the full CLI run it and report it its way


def main() -> None:
    from .fsops import install_signal_handlers

    install_signal_handlers()  # the same handling as the full CLI's (a closed pipe: quiet 141), before any output
    code = _fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .cli import main as full

    full()
