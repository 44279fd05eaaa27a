"""Hostile and broken checkpoints, built byte by byte (never by unpickling anything).

Payload ideas follow the public scanner corpora (picklescan, fickling): the classic GLOBAL+REDUCE call,
protocol-4 STACK_GLOBAL, INST and OBJ, NEWOBJ on a dangerous class, BUILD driving ``__setstate__``, and
calls to exec/eval/subprocess/importlib/runpy.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _str4(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:
    return _str4(module) + _str4(name) + b"\x93"


def payloads(marker: str) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle body that leaves ONE object on the stack, the global that must be refused)."""
    touch = f"touch {marker}"
    py = f"open({marker!r}, 'w').close()"
    return {
        "global-reduce-os.system": (_global("os", "system") + _str4(touch) + b"\x85R", "os.system"),
        "global-reduce-posix.system": (_global("posix", "system") + _str4(touch) + b"\x85R", "posix.system"),
        "stack_global-os.system": (_stack_global("os", "system") + _str4(touch) + b"\x85R", "os.system"),
        "builtins.exec": (_global("builtins", "exec") + _str4(py) + b"\x85R", "builtins.exec"),
        "builtins.eval": (_stack_global("builtins", "eval") + _str4(py) + b"\x85R", "builtins.eval"),
        "inst-subprocess.Popen": (b"(" + _str4("touch") + _str4(marker) + b"isubprocess\nPopen\n",
                                  "subprocess.Popen"),
        "obj-subprocess.call": (b"(" + _global("subprocess", "call") + b"(" + _str4("touch") + _str4(marker) + b"lo",
                                "subprocess.call"),
        "newobj-subprocess.Popen": (_global("subprocess", "Popen") + b"(" + _str4("touch") + _str4(marker) + b"l\x85\x81",
                                    "subprocess.Popen"),
        "importlib.import_module": (_global("importlib", "import_module") + _str4("os") + b"\x85R",
                                    "importlib.import_module"),
        "runpy._run_code": (_global("runpy", "_run_code") + _str4(py) + b"}\x86R", "runpy._run_code"),
        "build-setstate": (_global("collections", "OrderedDict") + b")R" + b"}" + _str4("x")
                           + _global("os", "system") + b"sb", "os.system"),
        "getattr-chain": (_global("builtins", "getattr") + _global("os", "path") + _str4("join") + b"\x86R",
                          "builtins.getattr"),
        # issue 10: names the scanners flag beyond the classics, and a payload hidden inside an inert object
        "pty.spawn": (_global("pty", "spawn") + _str4("sh") + b"\x85R", "pty.spawn"),
        "webbrowser.open": (_global("webbrowser", "open") + _str4("http://example.invalid") + b"\x85R",
                            "webbrowser.open"),
        "nested-pickle-loader": (_global("torch.storage", "_load_from_bytes") + b"C\x01." + b"\x85R",
                                 "torch.storage._load_from_bytes"),
        "numpy-runstring": (_global("numpy.testing._private.utils", "runstring") + _str4(py) + b"}\x86R",
                            "numpy.testing._private.utils.runstring"),
        "inside-an-inert-object": (_global("argparse", "Namespace") + b")\x81}" + _str4("x")
                                   + _global("os", "system") + _str4(touch) + b"\x85Rsb", "os.system"),
    }


def as_state_dict(body: bytes) -> bytes:
    """A protocol-2 pickle of {"ok.weight": <payload>, "epoch": 1}."""
    return b"\x80\x02}(" + _str4("ok.weight") + body + _str4("epoch") + b"K\x01u."


def as_training(body: bytes) -> bytes:
    """{"epoch": 3, "model": {"0.weight": <payload>}}"""
    return b"\x80\x02}(" + _str4("epoch") + b"K\x03" + _str4("model") + b"}(" + _str4("0.weight") + body + b"uu."


def as_bare(body: bytes) -> bytes:
    return body + b"."


def in_zip(pickle_bytes: bytes, valid_zip: bytes) -> bytes:
    """A real torch zip whose data.pkl is replaced."""
    src = zipfile.ZipFile(io.BytesIO(valid_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, pickle_bytes if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


def in_legacy(pickle_bytes: bytes) -> bytes:
    """The legacy torch format: magic, protocol version, sys_info, then the object pickle."""
    head = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    return head + pickle_bytes + pickle.dumps([], protocol=2)


def containers(body: bytes, valid_zip: bytes) -> dict[str, bytes]:
    return {
        "bare": as_bare(body),
        "nested-state-dict": as_state_dict(body),
        "training-checkpoint": as_training(body),
        "zip-data.pkl": in_zip(as_state_dict(body), valid_zip),
        "legacy": in_legacy(as_state_dict(body)),
    }
