"""The loaded checkpoint: tensors by name, the container they sit in, and its metadata.

Operations change tensors in place (so ties stay ties) or replace them by name; the container, its
non-tensor entries and every untouched tensor go back to disk as they came.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Layout(Protocol):
        """What a checkpoint asks of the format it was read from: ``formats.base.Format``, which sits above this
        module (formats read and write checkpoints; a checkpoint names no format module)."""

        name: str

        def reads_by_range(self, ckpt: Checkpoint) -> bool: ...

from . import tree
from .records import dataclass, field
from .toc import FakeModule, TensorInfo, Toc


@dataclass
class Checkpoint:
    source: str
    layout: Layout  # the format it was read from, as the object to ask (a ``formats.base.Format``)
    root: Any  # the whole container (dict, OrderedDict, list, nn.Module, ...)
    names: dict[str, tree.Path]  # listed tensor name -> path in root
    metadata: dict[str, str] | None = None  # safetensors header metadata
    meta_ties: dict[str, str] = field(default_factory=dict)  # ties restored from safetensors metadata
    path: str | None = None  # the file it came from, if any
    key: str | None = None  # the --key sub-tree the names are relative to
    globals: list[str] | None = None  # the global names a torch file's pickle refers to (None: not a pickle)
    located: dict | None = None  # torch zip: storage key -> (offset of its bytes, None if compressed; its record)
    whole: str | None = None  # why torch must rebuild its tensors (conj bits, quantized, sparse, ...), if it must

    @property
    def format(self) -> str:
        """The contract's ``"format"`` string of the format it was read from."""
        return self.layout.name

    @property
    def byte_ranges(self) -> bool:
        """Are its storages byte ranges of its file, read and patched in place? Its format says
        (``Format.reads_by_range``)."""
        return self.layout.reads_by_range(self)

    def tensor(self, name: str) -> Any:
        return tree.get_path(self.root, self.names[name])

    def raw_bytes(self, name: str) -> Any:
        """The tensor's bytes without torch (a memoryview), where the reader can give them; else None."""
        return None

    def raw_samples(self, name: str, spans: list[tuple[int, int]]) -> list[bytes] | None:
        """The bytes of the tensor at ``spans`` (offset, length), without torch, where ``raw_bytes`` gives them
        (else None): a remote reader asks for these bytes only, not the tensor's (``ties --values``)."""
        raw = self.raw_bytes(name)
        return None if raw is None else [bytes(raw[o:o + n]) for o, n in spans]

    def tensors(self) -> dict[str, Any]:
        return {n: self.tensor(n) for n in self.names}

    def replace(self, name: str, value: Any) -> None:
        """Give ``name`` a new tensor. A live module is first turned into its state dict: when one module
        object sits at two paths (a tied layer), its attributes cannot differ between the two."""
        if tree.is_module(self.root) and not isinstance(self.root, FakeModule):
            state = self.root.state_dict()
            self.root = state
            self.names = {n: (n,) for n in state}
        tree.set_path(self.root, self.names[name], value)

    def infos(self) -> list[TensorInfo]:
        return tree.infos(self.root, self.names)

    def toc(self) -> Toc:
        values = None
        if self.key and not self.names and not tree.is_module(self.root):  # hyper_parameters, args: show them
            values = tree.plain_values(tree.get_path(self.root, tree.find_key(self.root, self.key)))
        return Toc(
            self.source,
            self.format,
            self.infos(),
            extras=tree.extras(self.root, self.names) if not tree.is_module(self.root) and values is None else {},
            metadata=self.metadata,
            modules=module_reprs(self.root) if tree.is_module(self.root) else {},
            meta_ties=dict(self.meta_ties),
            key=self.key,
            values=values,
            globals=self.globals,
        )


def named(label: str, fmt: Layout, root: Any, path: str | None, key: str | None,
          cls: type[Checkpoint] | None = None) -> Checkpoint:
    """A checkpoint (``cls``: a kind of ``Checkpoint``) over ``root`` with its tensors named (relative to
    ``--key`` when given)."""
    return (cls or Checkpoint)(label, fmt, root, tree.assign_names(root, key), path=path, key=key)


def module_reprs(module: Any) -> dict[str, str]:
    """Module path -> one-line description (``Linear(in_features=4, out_features=8, bias=True)``)."""
    out: dict[str, str] = {}
    if isinstance(module, FakeModule):  # a pickled model, listed without torch: class names only

        def visit(m: FakeModule, path: str) -> None:
            out[path] = m.cls.rsplit(".", 1)[-1]
            for name, child in (m.state.get("_modules") or {}).items():
                if isinstance(child, FakeModule):
                    visit(child, f"{path}.{name}" if path else name)

        visit(module, "")
        return out
    for path, m in module.named_modules(remove_duplicate=False):
        extra = m.extra_repr()
        out[path] = f"{type(m).__name__}({extra})" if "\n" not in extra else type(m).__name__
    return out
