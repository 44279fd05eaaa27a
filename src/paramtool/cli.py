"""The command line: parse, call the core, render, and map errors to exit codes. No tensor logic here."""
from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Optional

import typer
from typer.exceptions import TyperException

from . import queries, render
from .errors import ParamtoolError, UsageError
from .fsops import FAILURE as _FAILURE  # the exit status of a failure the core did not map: 1, 2 for diff
from .output import (Sink, each_source, err_console, error_line, progress_display, quiet_pipe, route_warnings, settle,
                     warn, watch_transfers)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .plan import Plan
    from .sources import Source

EPILOG_HINT = "Exit status: 0 done, 1 input or operation failed, 2 bad command line."


class _Group(typer.core.TyperGroup):
    """Every failure becomes one ``error:`` line on stderr; a closed pipe ends quietly."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D401 - click's signature
        kwargs["standalone_mode"] = False
        _FAILURE[0] = 1  # (diff and check raise it to 2 for their run only)
        for command in self.commands.values():
            command.epilog = _verbatim_examples(command.epilog)
        route_warnings()  # library warnings: one line, our format
        from .formats import pins
        from .fsops import release_locks

        pins.reset()  # one command's inputs and locks (a process may run several: the tests do)
        try:
            code = super().main(*args, **kwargs)
        except TyperException as e:  # typer's own command-line errors (usage errors are exit 2)
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `paramtool`: the help, on stderr
                sys.stderr.write(e.format_message() + "\n")
                sys.exit(2)
            _fail(e.format_message(), e.exit_code)
        except typer.Abort:
            _fail("interrupted", 130)
        except ParamtoolError as e:
            _fail(str(pins.cause(e)), e.exit_code)
        except BrokenPipeError:
            sys.exit(quiet_pipe())
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as e:  # not mapped by the core: a file it names, else the output stream (disk full)
            _fail(f"{e.filename}: {e.strerror or e}" if e.filename else f"cannot write the output: {e.strerror or e}",
                  _FAILURE[0])
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # a bug, or a library's BaseException (torch's CheckpointException): one line
            if os.environ.get("PARAMTOOL_DEBUG") == "1":
                raise
            if pins.cause(e) is not e:  # a reader tripped over an input that changed under it
                _fail(str(pins.cause(e)), _FAILURE[0])
            _fail(f"internal error: {type(e).__name__}: {e}", _FAILURE[0])
        finally:
            release_locks()
        sys.exit(code or 0)


def _verbatim_examples(epilog: Optional[str]) -> Optional[str]:
    """Mark each example of a help epilog (a paragraph that is a command line) as not to be re-wrapped (click's
    ``\b``): one line each, whatever the terminal's width, so a pasted line runs one whole command."""
    if not epilog:
        return epilog
    paragraphs = epilog.split("\n\n")
    return "\n\n".join("\b\n" + p if p.lstrip().startswith(("paramtool ", "cat ")) else p for p in paragraphs)


def _fail(message: str, code: int) -> None:
    if os.environ.get("PARAMTOOL_DEBUG") == "1" and sys.exc_info()[0] is not None and code != 2:
        import traceback

        traceback.print_exc()
    error_line(message)
    sys.exit(code)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"paramtool {__version__}\n")
        raise typer.Exit(0)


app = typer.Typer(
    cls=_Group,
    name="paramtool",
    help="Inspect, reinitialize, tie-check and edit the parameters of PyTorch checkpoints.\n\n"
    "SOURCE is a checkpoint file (.pt/.pth/.bin/.ckpt or .safetensors), '-' for stdin, nn:EXPR, "
    "FILE.py:FUNC, a sharded checkpoint (directory or *.index.json), a torch.distributed.checkpoint directory, "
    "or a model directory (config.json beside one weights file).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by several commands, declared once.
SourceArg = Annotated[
    Optional[str],
    typer.Argument(help="Checkpoint file, '-' (stdin), nn:EXPR, FILE.py:FUNC, or a sharded/DCP/model directory. "
                   "Omitted: read stdin when it is not a terminal.", show_default=False),
]
SourcesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Checkpoints (as for SOURCE), each in turn: with --json one document per line (JSON lines); "
                   "the exit status is the worst. None: read stdin when it is not a terminal.", show_default=False),
]
SourceThenNameArg = Annotated[str, typer.Argument(help="Checkpoint (as for inspect); with only one argument, stdin is read.",
                                                  show_default=False)]  # SOURCE NAME, or NAME of stdin
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout (no colour, no wrapping).")]
LayerOpt = Annotated[
    Optional[list[str]],
    typer.Option("--layer", "-l", help="Select by module path, tensor name, glob (h.*.mlp) or position ([0][1][0]: children "
                 "as the tree lists them, sorted with numbers as numbers: [0][0][2] on GPT-2 is transformer.h.2). Repeatable.",
                 show_default=False),
]
KeyOpt = Annotated[
    Optional[str],
    typer.Option("--key", help="Use this sub-tree of a training checkpoint (e.g. model, state_dict, optimizer).",
                 show_default=False),
]


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_version)] = False) -> None:
    """Inspect, reinitialize, tie-check and edit the parameters of PyTorch checkpoints."""


def _stdin_is_terminal() -> bool:
    from .sources import stdin_is_terminal

    return stdin_is_terminal()


def _exit(code: int) -> None:
    """End with ``code`` unless it is 0 (several sources: the worst status, ``output.each_source``)."""
    if code:
        raise typer.Exit(code)


# positions and config.json's tied names, with notes on stderr (``queries``): the write commands take them too
_config_aliases = queries.config_aliases
_positions = queries.positions


def _note_aliases(used: list[str], aliases: dict[str, str]) -> None:
    queries.note_aliases(used, aliases, Sink())


def _config_layers(src: Source, ckpt: Checkpoint, layers: Optional[list[str]], flag: str = "--layer") -> list[str]:
    return queries.config_layers(src, ckpt, layers, Sink(), flag)


def _selected(names: list[str], layers: Optional[list[str]], param: str = "all",
              shown: Optional[list[str]] = None) -> list[str]:
    from .select import select

    return select(names, list(layers or []), param, shown=shown)


@app.command(epilog="Examples:\n\n  paramtool inspect model.pt --layer 0 --depth 2\n\n  paramtool inspect a.pt b.safetensors --json\n\n" + EPILOG_HINT)
def inspect(
    source: SourcesArg = None,
    json_out: JsonOpt = False,
    layer: LayerOpt = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=0, help="Show modules this deep; deeper ones are summarised.",
                                                 show_default=False)] = None,
    key: KeyOpt = None,
    expand: Annotated[bool, typer.Option("--expand", help="Show every block: without it, consecutive identical blocks "
                                         "(h.0 ... h.11) are shown once under one '12 ×' line. --json is never collapsed.")] = False,
) -> None:
    """Show the parameter tree: modules, tensor names, shapes, dtypes, counts, bytes and ties.

    Reading a file's table of contents never loads tensor data (nor imports torch). Names are in numeric
    order (h.2 before h.10); consecutive identical blocks are collapsed unless --expand.
    """
    out = Sink(json_out)
    _exit(each_source(source, lambda one: _inspect_one(one, out, layer, depth, key, expand), json_out))


def _inspect_one(source: Optional[str], out: Sink, layer: Optional[list[str]], depth: Optional[int],
                 key: Optional[str], expand: bool) -> None:
    from . import sources

    found = queries.inspect(sources.resolve(source), key, layer, out)
    out.result(found, lambda console: _print_inspection(console, found, depth, expand))


def _print_inspection(console: Any, found: queries.Inspection, depth: Optional[int], expand: bool) -> None:
    toc, tensors = found.toc, found.tensors
    if toc.values is not None:  # a --key sub-tree without tensors (hyper_parameters, args): its values
        console.print(render.values_tree(toc))
        return
    console.print(render.inspect_tree(toc, tensors, depth, expand))
    for line in render.extras_lines(toc):
        console.print(line)
    for line in render.config_tie_lines(toc):
        console.print(line)
    for line in render.adapter_lines(found.adapter) if found.adapter else []:
        console.print(line)
    for line in render.quantization_lines(toc, tensors):  # GGUF: the stored type of each tensor
        console.print(line)


@app.command(epilog="Examples:\n\n  paramtool show model.pt 2.bias\n\n" + EPILOG_HINT)
def show(
    source: SourceThenNameArg,
    name: Annotated[Optional[str], typer.Argument(help="Tensor name, e.g. 0.weight.", show_default=False)] = None,
    json_out: JsonOpt = False,
    key: KeyOpt = None,
) -> None:
    """Print a tensor's values as print(t) would, elided when large."""
    from . import sources

    if name is None:  # `cat m.pt | paramtool show 0.bias`
        if _stdin_is_terminal():
            raise UsageError("missing NAME (usage: paramtool show SOURCE NAME)")
        source, name = "-", source
    out = Sink(json_out)
    out.values(queries.show(sources.resolve(source), key, name, json_out, out))


TargetArg = Annotated[Optional[str], typer.Argument(help="Output path (same as -o).", show_default=False)]
OutOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write here ('-' for stdout). Naming the input counts as --in-place.",
                                                show_default=False)]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Replace the input file (atomically).")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Output format: pt or safetensors (default: from -o's extension, else the input's).",
                                                  show_default=False)]
DropExtraOpt = Annotated[bool, typer.Option("--drop-extra", help="Writing safetensors: drop non-tensor entries instead of failing.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Only report what would change; write nothing.")]
MaxShardOpt = Annotated[Optional[str], typer.Option("--max-shard-size", help="Write a directory of shards of at most this size (500MB, 5GB, 2GiB), named and indexed as transformers does.",
                                                    show_default=False)]
PlanJsonOpt = Annotated[bool, typer.Option("--json", help="With --dry-run: the plan as JSON.")]


def _opt(flag: str, kind: type, text: str) -> Any:
    return Annotated[Optional[kind], typer.Option(flag, help=text, show_default=False)]


# Scheme options, declared once: init and resize take the same ones (``_takes_scheme_options``).
_SCHEME_OPTIONS = {
    "mean": _opt("--mean", float, "normal, trunc_normal: mean."),
    "std": _opt("--std", float, "normal, trunc_normal, sparse: standard deviation."),
    "low": _opt("--low", float, "uniform, trunc_normal, masked_uniform: lower bound."),
    "high": _opt("--high", float, "uniform, trunc_normal, masked_uniform: upper bound."),
    "value": _opt("--value", float, "constant: the value (required)."),
    "gain": _opt("--gain", float, "xavier*, orthogonal: gain."),
    "negative_slope": _opt("--negative-slope", float, "kaiming*: negative slope of the rectifier."),
    "mode": _opt("--mode", str, "kaiming*: fan_in or fan_out."),
    "nonlinearity": _opt("--nonlinearity", str, "kaiming*: relu or leaky_relu."),
    "threshold": _opt("--threshold", float, "masked_uniform: values with |v| below this become 0."),
    "sparsity": _opt("--sparsity", float, "sparse: fraction of zeros per column (required)."),
    "groups": _opt("--groups", int, "dirac: number of groups."),
}
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Reproducible values: they depend only on the seed, scheme, options and the tensor's name, shape and dtype.",
                                                show_default=False)]


def _takes_scheme_options(command: Any) -> Any:
    """``command`` with the scheme options (``_SCHEME_OPTIONS``) on its command line, right after --scheme, handed to
    it as one ``scheme_options`` dict of those actually given."""
    import functools
    import inspect

    signature = inspect.signature(command, eval_str=True)  # (typer reads the annotations as objects)
    params = [p for p in signature.parameters.values() if p.name != "scheme_options"]
    at = next(i for i, p in enumerate(params) if p.name == "scheme") + 1
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=kind)
             for name, kind in _SCHEME_OPTIONS.items()]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in _SCHEME_OPTIONS}
        return command(**kwargs, scheme_options={k: v for k, v in given.items() if v is not None})

    run.__signature__ = signature.replace(parameters=params[:at] + added + params[at:])
    run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
    return run


def _resolve_for_write(source: Optional[str], output: Optional[str], in_place: bool, dry_run: bool) -> Any:
    """``sources.resolve(source)`` for a command that writes, once it holds the lock of what it will write
    (the input with ``--in-place``, else ``-o``'s existing target): taken before anything is read, so
    concurrent writes of one target serialize and each reads what the one before committed."""
    from . import fsops, sources

    target = source if in_place else output
    if not dry_run and target is not None and target != "-" and not target.startswith(("nn:", "s3://", "hf://", "http")):
        fsops.lock_for_write(target)
    return sources.resolve(source)


def _finish(src: Source, listing: Checkpoint, plan: Plan, dry_run: bool, json_out: bool, output: Optional[str], in_place: bool,
            fmt: Optional[str], drop_extra: bool, max_shard_size: Optional[str] = None,
            convert: bool = False) -> None:
    """Report a dry run, or carry out the plan on ``listing`` (what it was planned on) and write the result
    (``convert``: in another format; else an archive stays one)."""
    from . import writer

    if json_out and not dry_run:
        raise UsageError("--json describes a --dry-run plan; without --dry-run the output is a checkpoint")
    if getattr(src, "directory", None):  # a model directory: what its config.json ties goes in the report
        from .formats.modeldir import note_config_ties
        from .sources import describe

        note_config_ties(plan.report, describe(src, listing))
    from .remote_io import stage

    output, in_place, commit = stage(output, in_place, src)  # a bucket: written locally, then uploaded (``remote.stage``)
    if dry_run:
        _dry_run(plan.report, json_out)
        return
    target = writer.plan_output(src, output, in_place, fmt, max_shard_size, convert)
    target.layout.check_plan(plan)  # (an archive takes only new values)
    for w in plan.report.warnings:
        warn(w)
    seen = len(plan.report.warnings)
    from .executor import execute

    execute(src, listing, plan, target, drop_extra)
    for w in plan.report.warnings[seen:]:  # found while writing (e.g. values that overflow a cast)
        warn(w)
    _summary(plan.report, commit(target.label), target.format)


def _summary(report: Any, target: str, fmt: str) -> None:
    console = err_console()
    names = ", ".join(render.safe_name(n) for n in report.changed[:8]) + (" ..." if len(report.changed) > 8 else "")
    if report.action == "convert":
        console.print(f"wrote {render.safe_name(target)} ({fmt})", markup=False)
    else:
        console.print(f"wrote {render.safe_name(target)} ({fmt}): {report.action} on {len(report.changed)} tensor(s): {names}",
                      markup=False)
    if report.zeroed:
        console.print(f"  zeroed: {', '.join(render.safe_name(n) for n in report.zeroed)}", markup=False)
    for name, others in report.with_ties.items():
        console.print(f"  tied: {', '.join(render.safe_name(n) for n in others)} changed with {render.safe_name(name)}",
                      markup=False)
    if report.untied:
        console.print(f"  untied first: {', '.join(render.safe_name(n) for n in report.untied)}", markup=False)


def _dry_run(report: Any, json_out: bool) -> None:
    out = Sink(json_out)
    for w in report.warnings:
        out.warn(w)
    out.result(report, lambda console: _print_plan(console, report))


def _print_plan(console: Any, report: Any) -> None:
    console.print(f"would apply {report.action} to {len(report.changed)} tensor(s):", markup=False)
    renamed = report.renamed or {}
    for n in report.changed:
        ties = report.with_ties.get(n)
        to = f" -> {render.safe_name(renamed[n])}" if n in renamed else ""
        console.print(f"  {render.safe_name(n)}{to}" + (f"  (with {', '.join(map(render.safe_name, ties))})" if ties else ""),
                      markup=False)
    for n in report.zeroed:
        console.print(f"  {render.safe_name(n)}  (zeroed)", markup=False)
    for n, why in report.skipped.items():
        console.print(f"  skip {render.safe_name(n)}: {why}", markup=False)


@app.command(epilog="Examples:\n\n  paramtool init model.pt --scheme xavier --layer 0 -o out.pt\n\n"
             "  cat a.pt | paramtool init --scheme normal --std 0.01 --zero-bias | paramtool inspect -\n\n" + EPILOG_HINT)
@_takes_scheme_options
def init(
    source: SourceArg = None,
    scheme: Annotated[str, typer.Option("--scheme", "-s", help="Initializer (see `paramtool schemes`).", show_default=False)] = ...,
    layer: LayerOpt = None,
    param: Annotated[str, typer.Option("--param", help="weight, bias or all: narrow by the last part of the name.")] = "weight",
    types: Annotated[Optional[list[str]], typer.Option("--type", help="Only tensors of modules of this class (Linear, Conv2d, Embedding; "
                                                      "as type(m) == nn.Linear), where classes are known: nn:, FILE.py:FUNC, "
                                                      "pickled models. Repeatable.", show_default=False)] = None,
    zero_bias: Annotated[bool, typer.Option("--zero-bias", help="Also zero the biases of the selected modules.")] = False,
    untie: Annotated[bool, typer.Option("--untie", help="Give selected tied names their own copy first, so only they change.")] = False,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
    scheme_options: Optional[dict[str, Any]] = None,
) -> None:
    """Reinitialize the selected tensors with a named scheme and write the result.

    Without -o or --in-place the checkpoint goes to stdout when stdout is not a terminal.
    """
    from . import ops, sources

    given = scheme_options or {}
    from .schemes import get_scheme, resolve_options

    resolve_options(get_scheme(scheme), given)  # a wrong option is a usage error before any loading
    src = _resolve_for_write(source, output, in_place, dry_run)
    listing = sources.open_for_plan(src, key)
    plan = ops.plan_init(listing, scheme, given, _config_layers(src, listing, layer), param, zero_bias, untie, seed,
                         list(types or []))
    _finish(src, listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra, max_shard_size=max_shard_size)


@app.command(name="set", epilog='Examples:\n\n  paramtool set model.pt "0.weight[:] += 1" "0.weight[0, 0] = 42" -o out.pt\n\n'
             '  paramtool set model.pt "2.bias = 0" --in-place\n\n' + EPILOG_HINT)
def set_(
    args: Annotated[list[str], typer.Argument(help="SOURCE then one or more EDITs: NAME[INDEX] OP VALUE with OP one of = += -= *= /=. "
                                              "SOURCE may be omitted when stdin is a pipe.", show_default=False)],
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Edit values directly, applied in order; tied names change together."""
    from . import ops, sources

    source: Optional[str] = args[0]
    edits = args[1:]
    if "=" in args[0] and not os.path.exists(args[0]) and not _stdin_is_terminal():
        source, edits = None, args
    if not edits:
        raise UsageError("give at least one EDIT, e.g. \"0.weight[0, 0] = 42\"")
    src = _resolve_for_write(source, output, in_place, dry_run)
    listing = sources.open_for_plan(src, key)
    from .select import resolve_leading_name

    aliases = _config_aliases(src, listing)
    shown = _positions(src, listing, edits)
    positioned = [resolve_leading_name(e, list(listing.names), shown=shown) for e in edits]
    _note_aliases([a for e in positioned for a in aliases if e.lstrip().startswith(a)], aliases)
    resolved = [resolve_leading_name(e, list(listing.names), aliases) for e in positioned]
    plan = ops.plan_set(listing, resolved)
    _finish(src, listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra, max_shard_size=max_shard_size)


@app.command(epilog="Examples:\n\n  paramtool schemes --json\n\n" + EPILOG_HINT)
def schemes(json_out: JsonOpt = False) -> None:
    """List the initializers, their options and defaults."""
    doc = queries.schemes()
    Sink(json_out).result(doc, lambda console: console.print(render.schemes_table(doc["schemes"])))


@app.command(epilog="Examples:\n\n  paramtool ties model.pt --json\n\n" + EPILOG_HINT)
def ties(
    source: SourcesArg = None,
    json_out: JsonOpt = False,
    values: Annotated[bool, typer.Option("--values", help="Also report distinct tensors with identical bytes (reads tensor data).")] = False,
    key: KeyOpt = None,
) -> None:
    """List tied tensors: groups of names that share storage (alias) or bytes (overlapping views)."""
    out = Sink(json_out)
    _exit(each_source(source, lambda one: _ties_one(one, out, values, key), json_out))


def _ties_one(source: Optional[str], out: Sink, values: bool, key: Optional[str]) -> None:
    from . import sources

    found = queries.ties(sources.resolve(source), key, values, out)
    out.result(found, lambda console: _print_lines(console, render.ties_lines(found.toc, found.groups)))


def _print_lines(console: Any, lines: list) -> None:
    for line in lines:
        console.print(line)


@app.command(epilog="Examples:\n\n  paramtool stats model.pt --layer 0 --hist\n\n" + EPILOG_HINT)
def stats(
    source: SourcesArg = None,
    layer: LayerOpt = None,
    hist: Annotated[bool, typer.Option("--hist", help="Draw each tensor's distribution in the terminal.")] = False,
    hist_png: Annotated[Optional[str], typer.Option("--hist-png", help="Also write the histograms as a PNG (needs matplotlib).",
                                                    show_default=False)] = None,
    bins: Annotated[int, typer.Option("--bins", min=2, max=200, help="Histogram bins.")] = 20,
    json_out: JsonOpt = False,
    key: KeyOpt = None,
) -> None:
    """Per-tensor mean, std, min, max, fraction of zeros, L2 norm and NaN/Inf counts, with module totals.

    stats exits 0 whatever the values are: `paramtool check` is the gate that fails on NaN/Inf."""
    if hist_png and source and len(source) > 1:
        raise UsageError("--hist-png draws one checkpoint: give one SOURCE")
    out = Sink(json_out)
    _exit(each_source(source, lambda one: _stats_one(one, out, layer, hist, hist_png, bins, key), json_out))


def _stats_one(source: Optional[str], out: Sink, layer: Optional[list[str]], hist: bool, hist_png: Optional[str],
               bins: int, key: Optional[str]) -> None:
    from . import sources
    from . import stats as st

    found = queries.stats(sources.resolve(source), key, layer, out, bins if hist else None, bool(hist_png),
                          lambda total: _progress(total, "stats"))
    if hist_png:
        st.histogram_png([(n, found.png[n]) for n in found.names], hist_png)
    out.result(found, lambda console: _print_stats(console, found))


def _print_stats(console: Any, found: queries.Stats) -> None:
    from . import stats as st

    console.print(render.stats_table(found.results))
    for line in render.update_lines(found.updates) if found.updates else []:
        console.print(line)
    for n, h in found.hists.items():
        console.print(f"\n{render.safe_name(n)}", style="bold", markup=False)
        for line in st.histogram_lines(h):
            console.print(line, markup=False, highlight=False)


@app.command(epilog="Examples:\n\n  paramtool check model.safetensors\n\n"
             "  paramtool check ckpt/*.pt --json --ignore mixed-dtype\n\n"
             "Exit status: 0 no findings, 1 findings, 2 error (with several sources: the worst).")
def check(
    source: SourcesArg = None,
    json_out: JsonOpt = False,
    outlier_factor: Annotated[float, typer.Option("--outlier-factor", min=1.0, help="outlier: a tensor whose std or RMS is more than this many times "
                                                  "the median of the same tensor in the other repeated blocks (or less than the median over it).")] = 8.0,
    min_siblings: Annotated[int, typer.Option("--min-siblings", min=2, help="outlier: judge only tensors repeated in at least this many blocks.")] = 3,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Leave out this rule (nan, inf, zero, constant, outlier, tie-diverged, "
                                                        "optimizer-shape, mixed-dtype). Repeatable.", show_default=False)] = None,
    key: KeyOpt = None,
) -> None:
    """Health rules for CI: one line per finding (SOURCE: RULE: NAME: what), exit 1 if there is any.

    Rules: NaN/Inf values; weight matrices all zero or constant; a tensor far from its siblings in repeated
    blocks (--outlier-factor); ties config.json declares whose stored values diverged; optimizer state whose
    shape is not its parameter's; weight matrices in more than one dtype. See docs/reference.md, "Checking a checkpoint".
    """
    from .check import RULES, Thresholds

    _FAILURE[0] = 2  # as diff: findings are 1, any error is 2
    unknown = [r for r in ignore or [] if r not in RULES]
    if unknown:
        raise UsageError(f"--ignore {unknown[0]}: no such rule (rules: {', '.join(RULES)})")
    th = Thresholds(outlier_factor, min_siblings)
    out = Sink(json_out)
    _exit(each_source(source, lambda one: _check_one(one, out, th, set(ignore or []), key), json_out))


def _check_one(source: Optional[str], out: Sink, th: Any, ignore: set[str], key: Optional[str]) -> int:
    src, report = queries.check(source, key, th, ignore)
    out.result(report, lambda console: _print_findings(console, src.label, report.findings))
    return 1 if report.findings else 0


def _print_findings(console: Any, label: str, findings: list) -> None:
    for f in findings:
        where = f"{render.safe_name(f.name)}: " if f.name else ""
        console.print(f"{render.safe_name(label)}: {f.rule}: {where}{render.safe_name(f.message)}", markup=False)
    if not findings:
        err_console().print(f"{render.safe_name(label)}: no findings", markup=False)


class _progress:
    """A progress bar on stderr for long runs (terminal only); yields an ``advance()`` callable."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.task = total, label, None

    def __enter__(self):
        if sys.stderr.isatty() and self.total > 20:
            bar = progress_display()
            self.task = bar.add_task(self.label, total=self.total, detail="")
            return lambda: bar.advance(self.task)
        return lambda: None

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:
            progress_display().remove_task(self.task)


@app.command(epilog="Examples:\n\n  paramtool diff before.pt after.safetensors --atol 1e-6\n\n"
             "Exit status (as cmp/diff): 0 equal, 1 different, 2 error.")
def diff(
    a: Annotated[str, typer.Argument(help="First checkpoint.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Second checkpoint.", show_default=False)],
    json_out: JsonOpt = False,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance (as torch.isclose).")] = 0.0,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute tolerance; 0 and 0 means bit-exact.")] = 0.0,
    key: KeyOpt = None,
) -> None:
    """Added, removed, reshaped/retyped and changed tensors, with the largest difference; ties gained or lost."""
    result = queries.diff(a, b, key, rtol, atol)  # (diff follows cmp: any error is 2)
    Sink(json_out).result(result, lambda console: _print_lines(console, render.diff_lines(result)))
    _exit(0 if result.equal else 1)


@app.command(epilog="Examples:\n\n  paramtool convert model.pt model.safetensors\n\n"
             "  paramtool convert train.ckpt weights.safetensors --drop-extra\n\n"
             "  paramtool convert model.safetensors model-bf16.safetensors --dtype bf16 --keep-dtype '*ln_*'\n\n" + EPILOG_HINT)
def convert(
    source: SourceArg = None,
    target: TargetArg = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Cast floating-point tensors: bf16, fp16 or fp32 (integers and bools stay).",
                                                 show_default=False)] = None,
    keep_dtype: Annotated[Optional[list[str]], typer.Option("--keep-dtype", help="With --dtype: leave these tensors (a selector, as --layer) in their dtype. Repeatable.",
                                                            show_default=False)] = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Rewrite a checkpoint in another format (ties and metadata kept), or another dtype with --dtype.

    --dtype casts one storage at a time: a tie group is cast once and stays tied, and values that do not fit the
    new dtype (|v| > 65504 in fp16) are counted in a warning naming the tensors.
    """
    from . import sources
    from .plan import Plan, Report

    if target is not None and output is not None:
        raise UsageError("give the output either as OUTPUT or as -o, not both")
    if keep_dtype and dtype is None:
        raise UsageError("--keep-dtype goes with --dtype")
    if dtype is None:
        if dry_run or json_out:
            raise UsageError("--dry-run goes with --dtype (a plain convert changes no tensor)")
        src = _resolve_for_write(source, target or output, in_place, False)
        _finish(src, sources.open_for_plan(src, key), Plan(Report("convert"), narrow=True), False, False,
                target or output, in_place, fmt, drop_extra, max_shard_size=max_shard_size, convert=True)
        return
    from . import surgery

    to = surgery.target_dtype(dtype)
    src = _resolve_for_write(source, target or output, in_place, dry_run)
    listing = sources.open_for_plan(src, key)
    keep = _config_layers(src, listing, keep_dtype, "--keep-dtype")
    plan = surgery.plan_cast(listing, to, keep, directory=src.directory)
    _finish(src, listing, plan, dry_run, json_out, target or output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size, convert=True)


def _source_then(args: list[str], looks_like_arg: Any) -> tuple[Optional[str], list[str]]:
    """Split ``SOURCE ARG…`` where SOURCE may be left out when stdin is a pipe (as for ``set``)."""
    if args and looks_like_arg(args[0]) and not os.path.exists(args[0]) and not _stdin_is_terminal():
        return None, args
    return (args[0], args[1:]) if args else (None, [])


@app.command(epilog="Examples:\n\n  paramtool rename compiled.pt --strip-prefix _orig_mod. -o clean.pt\n\n"
             "  paramtool rename model.safetensors 's/^transformer\\.h\\.(\\d+)\\./layers.\\1./' -o out.safetensors\n\n" + EPILOG_HINT)
def rename(
    args: Annotated[Optional[list[str]], typer.Argument(help="SOURCE then RULEs s/REGEX/REPLACEMENT/ (Python regex, \\1 for groups, "
                                                        "g flag for every match), applied in order. SOURCE may be omitted when stdin is a pipe.",
                                                        show_default=False)] = None,
    strip_prefix: Annotated[Optional[str], typer.Option("--strip-prefix", help="Remove this prefix where a name starts with it (module., _orig_mod.).",
                                                        show_default=False)] = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Rename tensors by rules; two names becoming one is an error. Ties, metadata and optimizer state are kept."""
    from . import sources, surgery

    source, texts = _source_then(list(args or []), lambda a: a.startswith("s") and len(a) > 1 and not a[1].isalnum())
    rules = ([surgery.strip_prefix_rule(strip_prefix)] if strip_prefix else []) + [surgery.parse_rule(t) for t in texts]
    if not rules:
        raise UsageError("give at least one RULE (s/REGEX/REPLACEMENT/) or --strip-prefix P")
    src = _resolve_for_write(source, output, in_place, dry_run)
    listing = sources.open_for_plan(src, key)
    plan = surgery.plan_rename(listing, rules)
    _finish(src, listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size)


@app.command(epilog="Examples:\n\n  paramtool drop train.ckpt --key optimizer -o weights.ckpt\n\n"
             "  paramtool drop model.safetensors --layer 'transformer.h.*.attn' --in-place\n\n" + EPILOG_HINT)
def drop(
    source: SourceArg = None,
    layer: LayerOpt = None,
    key: Annotated[Optional[list[str]], typer.Option("--key", help="Remove this whole sub-tree of a training checkpoint (optimizer, ema, callbacks). Repeatable.",
                                                     show_default=False)] = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Remove tensors (--layer) or whole sub-trees (--key). A dropped name tied to kept ones leaves them the storage."""
    from . import sources, surgery

    if bool(layer) == bool(key):
        raise UsageError("give --layer SEL… (tensors) or --key PATH… (sub-trees), one of the two")
    src = _resolve_for_write(source, output, in_place, dry_run)
    listing = sources.open_for_plan(src)
    from .select import as_paths

    shown = _positions(src, listing, layer or [])  # (a config-tied name is not dropped for its stored tensor)
    layers = as_paths([t.name for t in sources.describe(src, listing).tensors], list(layer or []), shown) \
        if shown is not None else list(layer or [])
    plan = surgery.plan_drop(listing, layers, list(key or []))
    _finish(src, listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size)


@app.command(epilog="Examples:\n\n  paramtool resize model.safetensors transformer.wte.weight --rows 50304 -o out.safetensors\n\n"
             "  paramtool resize model.safetensors transformer.wpe.weight --rows 32 --scheme normal --std 0.02 --seed 0 -o out.safetensors\n\n" + EPILOG_HINT)
@_takes_scheme_options
def resize(
    source: SourceThenNameArg,
    name: Annotated[Optional[str], typer.Argument(help="The tensor whose dim 0 changes, e.g. an embedding.", show_default=False)] = None,
    rows: Annotated[int, typer.Option("--rows", help="The new size of dim 0.", show_default=False)] = ...,
    scheme: Annotated[Optional[str], typer.Option("--scheme", "-s", help="Fill new rows with this initializer (default: the mean of the existing rows).",
                                                  show_default=False)] = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
    scheme_options: Optional[dict[str, Any]] = None,
) -> None:
    """Grow or shrink dim 0 of a tensor (an embedding's vocabulary); every tensor tied to it follows.

    New rows are the mean of the existing rows, or drawn from --scheme (with init's options and --seed).
    """
    from . import sources, surgery

    if name is None:  # `cat m.pt | paramtool resize emb.weight --rows 10`
        if _stdin_is_terminal():
            raise UsageError("missing NAME (usage: paramtool resize SOURCE NAME --rows N)")
        source, name = "-", source
    given = scheme_options or {}
    if given and scheme is None:
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} is a scheme option: give --scheme too")
    if rows <= 0:
        raise UsageError(f"--rows must be at least 1, not {rows}")
    if scheme is not None:
        from .schemes import get_scheme, resolve_options

        resolve_options(get_scheme(scheme), given)
    src = _resolve_for_write(source, output, in_place, dry_run)
    listing = sources.open_for_plan(src, key)
    from .select import resolve_name

    stored = resolve_name(name, list(listing.names), shown=_positions(src, listing, [name]))  # config ties: plan_resize's
    plan = surgery.plan_resize(listing, stored, rows, surgery.NewRows(scheme, given, seed), directory=src.directory)
    _finish(src, listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size)


@app.command(epilog="Examples:\n\n  paramtool grad 'nn:Sequential(Linear(20, 256), ReLU(), Linear(256, 10))' --input 2,20\n\n"
             "  paramtool grad models.py:build --input 2x4 --layer 2 --json\n\n" + EPILOG_HINT)
def grad(
    source: SourceArg = None,
    inputs: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Shape of one random input, e.g. 2,20 or 2x20 "
                                                        "(float32, torch.rand). Repeat for a forward taking several.",
                                                        show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the input (and the initialization of nn: and factory models).")] = 0,
    layer: LayerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Forward a random input through a model, backpropagate output.sum(), and report each parameter's gradient.

    Tied parameters are reported once, with what each use contributes. SOURCE is nn:EXPR, FILE.py:FUNC or a
    pickled model (torch.save(model)).
    """
    from . import grad as grads
    from . import sources

    if not inputs:
        raise UsageError("give the shape of the model's input with --input, e.g. --input 2,20")
    shapes = [grads.parse_shape(s) for s in inputs]
    src = sources.resolve(source)
    report = grads.compute(grads.build_model(src, seed), shapes, seed, src.label)
    params = grads.select_params(report, layer)
    Sink(json_out).result(report.as_json(params), lambda console: _print_lines(console, render.grad_lines(report, params)))


# ---------------------------------------------------------------- merge and lora (issue 27)


def _split_weights(paths: list[str], weights: Optional[list[str]]) -> tuple[list[str], Optional[list[float]]]:
    """SOURCEs and --weights: ``--weights 0.3,0.7``, ``--weights 0.3 --weights 0.7``, and ``--weights 0.3 0.7``
    (where the numbers after the first reach the positionals: a number that names no file is a weight)."""
    if weights is None:
        return paths, None

    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return not os.path.exists(text)

    texts = [w for given in weights for w in given.split(",") if w.strip()] + [p for p in paths if number(p)]
    try:
        values = [float(w) for w in texts]
    except ValueError:
        raise UsageError(f"--weights takes numbers, not '{next(w for w in texts if not number(w))}'") from None
    return [p for p in paths if not number(p)], values


@app.command(epilog="Examples:\n\n  paramtool merge run/ckpt-8.pt run/ckpt-9.pt run/ckpt-10.pt --key model -o soup.pt\n\n"
             "  paramtool merge a.safetensors b.safetensors --weights 0.3 0.7 -o mix.safetensors\n\n"
             "  paramtool merge math/ code/ --method ties --base base/ --density 0.2 -o merged/\n\n"
             "  paramtool merge a/ b/ --method slerp --t 0.3 -o mid/\n\n" + EPILOG_HINT)
def merge(
    paths: Annotated[list[str], typer.Argument(help="The checkpoints to combine (any SOURCE kind); the first gives the "
                                               "output its layout, non-tensor entries, ties, order and sidecars.",
                                               show_default=False, metavar="SOURCE...")],
    weights: Annotated[Optional[list[str]], typer.Option("--weights", "-w", help="One weight per SOURCE (0.3 0.7, or 0.3,0.7). "
                                                         "linear: normalized by their sum (default: equal); task-arithmetic, ties: "
                                                         "each task vector's (default 1); slerp: t = w2 / (w1 + w2).",
                                                         show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="linear (weighted average), task-arithmetic, ties (both "
                                        "against --base) or slerp (two sources).")] = "linear",
    base: Annotated[Optional[str], typer.Option("--base", help="task-arithmetic, ties: the model the SOURCEs were fine-tuned "
                                                "from; task vectors are SOURCE - BASE.", show_default=False)] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="ties: the fraction of each task vector kept, by "
                                                     "magnitude (default 0.2).", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option("--lambda", help="task-arithmetic, ties: scale of the combined task "
                                                   "vector (default 1).", show_default=False)] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="slerp: 0 is the first SOURCE, 1 the second (default 0.5).",
                                               show_default=False)] = None,
    layer: LayerOpt = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Combine parameter sets tensor by tensor: weighted average, task arithmetic, TIES or SLERP.

    Every floating-point tensor (those --layer selects) is computed in float32 (float64 for float64) from the same
    tensor of every SOURCE, one tensor at a time, and written in the first SOURCE's dtype; the rest of the first
    SOURCE is kept. Names, shapes or dtypes that differ are an error listing them.
    """
    from . import merge as merging
    from . import sources

    paths, values = _split_weights(list(paths), weights)
    spec = merging.method_of(method, len(paths), values, base is not None, density, scale, t)
    resolved = [sources.resolve(p) for p in paths]
    listing = sources.open_for_plan(resolved[0], key)
    opened = [(resolved[0].label, sources.values_of(resolved[0], listing, key))]
    opened += [(s.label, sources.load_lazy(s, key)) for s in resolved[1:]]
    based = (base, sources.load_lazy(sources.resolve(base), key)) if base is not None else None
    plan = merging.plan_merge(listing, opened, based, spec, _config_layers(resolved[0], listing, layer))
    _finish(resolved[0], listing, plan, dry_run, json_out, output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size)


lora_app = typer.Typer(cls=typer.core.TyperGroup, help="PEFT LoRA adapters: merge one into its base, or extract one "
                       "from a fine-tune.", no_args_is_help=True, rich_markup_mode=None,
                       epilog="Examples:\n\n  paramtool lora merge base/ adapter/ -o merged/\n\n"
                       "  paramtool lora extract base/ tuned/ --rank 16 -o adapter/\n\n" + EPILOG_HINT,
                       context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(lora_app, name="lora")


@lora_app.command(name="merge", epilog="Examples:\n\n  paramtool lora merge base/ adapter/ -o merged/\n\n"
                  "  paramtool lora merge model.safetensors adapter/ merged.safetensors\n\n" + EPILOG_HINT)
def lora_merge(
    base: Annotated[str, typer.Argument(help="The base checkpoint (any SOURCE kind; a model directory stays one).",
                                        show_default=False)],
    adapter: Annotated[str, typer.Argument(help="The PEFT adapter directory (adapter_config.json + "
                                           "adapter_model.safetensors).", show_default=False)],
    target: TargetArg = None,
    dry_run: DryRunOpt = False,
    json_out: PlanJsonOpt = False,
    output: OutOpt = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    drop_extra: DropExtraOpt = False,
    key: KeyOpt = None,
    max_shard_size: MaxShardOpt = None,
) -> None:
    """Merge a LoRA adapter into its base, as PEFT's merge_and_unload(): W += scale · B·A for each target.

    scale is alpha / r (alpha / sqrt(r) with use_rslora; rank_pattern and alpha_pattern per module); Conv1D and
    embedding updates are transposed; modules_to_save and trained biases replace the base's. Computed in float32,
    written in the base's dtype and layout. DoRA and other variants are refused by name.
    """
    from . import lora, sources

    if target is not None and output is not None:
        raise UsageError("give the output either as OUTPUT or as -o, not both")
    src = sources.resolve(base)
    listing = sources.open_for_plan(src, key)
    found, values = lora.open_adapter(adapter)
    plan = lora.plan_merge(listing, sources.values_of(src, listing, key), found, values,
                           lora.module_classes(src.directory))
    _finish(src, listing, plan, dry_run, json_out, target or output, in_place, fmt, drop_extra,
            max_shard_size=max_shard_size)


@lora_app.command(name="extract", epilog="Example: paramtool lora extract base/ tuned/ --rank 16 -o adapter/\n\n"
                  + EPILOG_HINT)
def lora_extract(
    base: Annotated[str, typer.Argument(help="The base checkpoint.", show_default=False)],
    tuned: Annotated[str, typer.Argument(help="The fine-tuned checkpoint (same names, shapes and dtypes).",
                                         show_default=False)],
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, help="The adapter's rank (lower for tensors with fewer "
                                      "rows or columns).", show_default=False)] = ...,
    layer: LayerOpt = None,
    output: Annotated[str, typer.Option("--output", "-o", help="The adapter directory to write.", show_default=False)] = ...,
    json_out: JsonOpt = False,
    key: KeyOpt = None,
) -> None:
    """Extract a LoRA adapter from a fine-tune: the truncated SVD of TUNED - BASE for each 2-D weight that changed.

    Written as a PEFT adapter directory (PeftModel.from_pretrained loads it; alpha = r, so B·A is the delta's best
    rank-r approximation). The report gives, per tensor, the fraction of the delta's energy (squared Frobenius
    norm) the rank keeps.
    """
    from . import lora, sources

    src = sources.resolve(base)
    base_values = sources.load_lazy(src, key)
    tuned_values = sources.load_lazy(sources.resolve(tuned), key)
    classes = lora.module_classes(src.directory)
    names = lora.extract_candidates(base_values, tuned_values, _selected(list(base_values.names), layer), classes)
    with _progress(len(names), "extract") as advance:
        tensors, config, report = lora.extract(base_values, tuned_values, names, rank, classes, advance)
    lora.write_adapter(output, tensors, config)
    Sink(json_out).result({"adapter": output, "rank": rank, "tensors": [
        {"name": e.name, "module": e.module, "rank": e.rank, "energy": e.energy} for e in report]},
        lambda console: _print_energies(console, report))
    err_console().print(f"wrote {render.safe_name(output)} (PEFT LoRA adapter, {len(report)} target(s))", markup=False)


def _print_energies(console: Any, report: list) -> None:
    width = max(len(render.safe_name(e.name)) for e in report)
    for e in report:
        console.print(f"{render.safe_name(e.name):<{width}}  rank {e.rank:>4}  energy kept {e.energy:8.2%}", markup=False)


def main() -> None:
    from .fsops import install_signal_handlers

    install_signal_handlers()  # Ctrl-C, SIGTERM, a closed pipe: temporaries removed, 130/143/141
    if sys.stderr.isatty():
        watch_transfers()
    try:
        app(prog_name="paramtool")
    finally:
        settle()


if __name__ == "__main__":  # pragma: no cover
    main()
