"""Run the paramtool CLI many times quickly, each run in a process of its own that may be killed.

``python fault_runner.py`` imports torch and paramtool once, then reads one JSON request per line
(``{"argv": [...], "env": {...}, "stdout": path, "stderr": path, "pipe": N | null, "pidfile": path | null}``), forks a child per request that runs
``paramtool.cli.main()`` exactly as the console script does (signal handlers included), and answers with
``{"exit": code}`` or ``{"signal": number}``. A child killed by ``PARAMTOOL_FAULT_AT`` is a real SIGKILL of a
real process; only the start-up cost (importing torch, seconds on a loaded machine) is shared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass


def _child(request: dict, pipe: tuple[int, int] | None) -> None:
    import tempfile

    os.environ.update(request.get("env", {}))
    tempfile.tempdir = None  # $TMPDIR as the request sets it, not as the server first saw it
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    if pipe is not None:  # stdout is a pipe, as in `paramtool ... | head -c N`
        os.dup2(pipe[1], 1)
        os.close(pipe[0])
        os.close(pipe[1])
    sys.argv = ["paramtool", *request["argv"]]
    code = 0
    try:
        from paramtool.cli import main

        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _read_then_close(fd: int, limit: int, keep: str) -> None:
    """Read ``limit`` bytes (all, if negative) from the child's stdout, keep them in ``keep``, then close
    the pipe: the child's next write meets a closed pipe."""
    data = b""
    while limit < 0 or len(data) < limit:
        chunk = os.read(fd, 1 << 16 if limit < 0 else min(1 << 16, limit - len(data)))
        if not chunk:
            break
        data += chunk
    os.close(fd)
    with open(keep, "wb") as f:
        f.write(data)


def serve() -> None:
    import torch  # noqa: F401 - the shared start-up cost
    import torch.distributed.checkpoint  # noqa: F401

    import paramtool.cli  # noqa: F401
    import paramtool.writer  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pipe = os.pipe() if request.get("pipe") is not None else None
        pid = os.fork()
        if pid == 0:
            _child(request, pipe)
        if request.get("pidfile"):  # for a test that acts on the running child (its /proc entry)
            with open(request["pidfile"] + ".tmp", "w") as f:
                f.write(str(pid))
            os.replace(request["pidfile"] + ".tmp", request["pidfile"])
        if pipe is not None:
            os.close(pipe[1])
            _read_then_close(pipe[0], request["pipe"], request["stdout"])
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


@dataclass
class Outcome:
    exit: int | None
    signal: int | None
    stdout: bytes
    stderr: str


class Runner:
    """The test side: one server process, one ``run`` per CLI invocation."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, *argv: object, env: dict | None = None, pipe: int | None = None, pidfile: str | None = None) -> Outcome:
        """One CLI run; ``pipe=N``: stdout is a pipe read for N bytes (all, if negative) and then closed;
        ``pidfile``: the child's process id is written there as it starts."""
        out, err = os.path.join(self.workdir, "run.stdout"), os.path.join(self.workdir, "run.stderr")
        request = {"argv": [str(a) for a in argv], "env": env or {}, "stdout": out, "stderr": err, "pipe": pipe,
                   "pidfile": pidfile}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        with open(out, "rb") as f:
            stdout = f.read()
        with open(err, encoding="utf-8", errors="replace") as f:
            stderr = f.read()
        os.unlink(out)
        os.unlink(err)
        return Outcome(answer.get("exit"), answer.get("signal"), stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


if __name__ == "__main__":
    serve()
