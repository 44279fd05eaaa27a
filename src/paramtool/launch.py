"""The program's entry point: the ``--json`` forms scripts call in loops are answered before typer is imported.

``inspect``, ``ties`` and ``schemes`` with ``--json`` (listing: Python's own start-up should be the only fixed
cost), ``stats SOURCE --json`` and ``diff A B --json`` (which compute with numpy where the bytes are
mapped, so typer's and rich's import would be a quarter of a 1 GiB run), and ``show SOURCE NAME`` with or
without ``--json`` (printed with numpy as torch prints it, ``printing``: torch's import is the whole cost). A
command line made only of what these forms take (SOURCE, ``--json``, ``--layer``/``-l``, ``--depth``, ``--key``)
is run here with no typer, click or rich imported; anything else (help, other options, other commands, a usage error, ``stats`` with
its progress bar on a terminal) goes to the full CLI unchanged, which then answers it exactly as before.
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
    if len(positionals) > 1 and command not in ("diff", "show"):  # several sources: one document each, the worst status
        if command == "stats" and sys.stderr.isatty():
            raise _Slow
        return max(_run_one(command, p, opts) for p in positionals)  # (max over all: each one runs)
    return _run1(command, positionals, opts)


def _run_one(command: str, source: str, opts: dict[str, list[str]]) -> int:
    """One of several sources; a failure is its own ``error:`` line naming the source (as ``cli._each_source``)."""
    from .errors import ParamtoolError, UsageError, first_line
    from .render import safe_name

    try:
        return _run1(command, [source], opts)
    except UsageError:
        raise
    except ParamtoolError as e:
        first = first_line(e)
        sys.stderr.write(f"error: {safe_name(first if source in first else f'{source}: {first}')}\n")
        return e.exit_code


def _run1(command: str, positionals: list[str], opts: dict[str, list[str]]) -> int:
    code = 0
    key = (opts.get("--key") or [None])[0]
    layers = opts.get("--layer", []) + opts.get("-l", [])
    if command == "schemes":
        from .schemes import schemes_table

        doc: Any = {"schemes": schemes_table()}
    elif command == "diff":
        doc, code = _diff(positionals, key)
    elif command == "show":
        return _show(positionals[0], positionals[1], key, "--json" in opts)
    else:
        from . import sources

        if command == "stats" and sys.stderr.isatty():
            raise _Slow  # a terminal gets the full CLI's progress bar
        src = sources.resolve(positionals[0] if positionals else None)
        if src.directory and command != "stats":  # config.json's ties and warnings are the full CLI's to report
            raise _Slow
        if command == "stats":
            return _emit(_stats(src, key, layers))
        toc = sources.read_toc(src, key)
        if command == "ties":
            from .ties import find_ties

            doc = {"source": src.label, "groups": [g.as_json() for g in find_ties(toc.tensors, toc.meta_ties)]}
        else:
            from .render import inspect_json
            from .select import select, tree_paths

            names = [t.name for t in toc.tensors]  # positions count the tree's children (a model's ReLU too)
            chosen = set(select(names, layers, "all", shown=tree_paths(names, toc.modules) if layers else None))
            doc = inspect_json(toc, [t for t in toc.tensors if t.name in chosen])
    return _emit(doc, code)


def _emit(doc: Any, code: int = 0) -> int:
    from .render import dumps

    sys.stdout.write(dumps(doc) + "\n")
    sys.stdout.flush()
    return code


def _stats(src: Any, key: str | None, layers: list[str]) -> Any:
    """``stats SOURCE --json``, as the full CLI computes it (``cli.stats``), without its progress bar."""
    from . import sources
    from . import stats as st
    from .formats.pins import verify
    from .select import select

    if src.directory and layers:
        raise _Slow  # config.json's tied names (lm_head) are selected, and said so, by the full CLI
    ckpt = sources.load_lazy(src, key)
    positional = any(s.startswith("[") for s in layers)  # counted in the tree inspect shows
    names = select(list(ckpt.names), layers, "all", shown=sources.tree_paths_of(src, ckpt) if positional else None)
    done = st.stats_many(ckpt.tensor, names, None, False, raw_of=st.raw_reader(ckpt))
    verify()  # numbers of the file as it was, or none
    doc = {"source": src.label, "tensors": [r.as_json() for r in done.results]}
    if src.directory:  # a LoRA adapter directory: what each pair adds to its base tensor (as cli.stats)
        from .lora import update_norms

        updates = update_norms(src, ckpt)
        if updates is not None:
            doc["adapter_updates"] = updates
    return doc


def _show(source: str, name: str, key: str | None, json_out: bool) -> int:
    """``show SOURCE NAME [--json]`` without torch (``printing``), where the tensor's bytes are at hand in a dtype
    printed exactly as torch prints it; anything else (other dtypes, views, a config-tied name to note, an error
    to word with suggestions) is the full CLI's."""
    from . import printing, sources
    from .errors import ParamtoolError
    from .formats.pins import verify
    from .select import resolve_name

    try:
        src = sources.resolve(source)
        ckpt = sources.load_lazy(src, key)
        shown = sources.tree_paths_of(src, ckpt) if name.startswith("[") else None
        stored = resolve_name(name, list(ckpt.names), shown=shown)
        if src.directory and stored in sources.describe(src, ckpt).config_ties:
            raise _Slow
        info = next((i for i in ckpt.infos() if i.name == stored), None)
        raw = ckpt.raw_bytes(stored) if info is not None and printing.supports(info.dtype) else None
    except ParamtoolError:
        raise _Slow from None  # (its error line, and its exit status, come from the full CLI)
    if raw is None:
        raise _Slow
    if json_out:
        doc = printing.values_json(name, raw, info.dtype, info.shape)
        verify()  # the values of the file as it was, or none
        return _emit(doc)
    text = printing.tensor_text(raw, info.dtype, info.shape)
    verify()
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def _diff(paths: list[str], key: str | None) -> tuple[Any, int]:
    """``diff A B --json`` as the full CLI computes it (``cli.diff``): 0 equal, 1 different; errors exit 2."""
    from . import compare, fsops, sources
    from .errors import ParamtoolError
    from .formats.pins import verify

    fsops.FAILURE[0] = 2  # (a bus error too)
    try:
        a, b = sources.resolve(paths[0]), sources.resolve(paths[1])  # (directories too: values only, as cli.diff)
        result = compare.diff(sources.load_lazy(a, key), sources.load_lazy(b, key))
        verify()
    except ParamtoolError as e:
        e.exit_code = 2  # diff follows cmp: any error is 2
        raise
    return result.as_json(), 0 if result.equal else 1


def _fast(argv: list[str]) -> int | None:
    """The exit status of a fast form, or None to hand the command line to the full CLI."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    from .errors import ParamtoolError, UsageError

    try:
        return _run(*parsed)
    except (UsageError, _Slow):
        return None  # usage errors are worded (and exit 2) by the full CLI
    except ParamtoolError as e:
        from .formats.pins import cause
        from .render import safe_name

        first = str(cause(e)).strip().splitlines()[0] if str(e).strip() else "failed"
        sys.stderr.write(f"error: {safe_name(first)}\n")
        return e.exit_code
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception:
        if os.environ.get("PARAMTOOL_DEBUG") == "1":
            raise
        return None  # a bug here: let the full CLI run it and report it its way
    return 0


def main() -> None:
    from .fsops import install_signal_handlers

    install_signal_handlers()  # the same handling as the full CLI's (a closed pipe: quiet 141), before any output
    code = _fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .cli import main as full

    full()
