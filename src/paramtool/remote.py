"""Remote checkpoints: objects over HTTP(S), in S3 buckets and on the Hugging Face Hub, read by byte range.

This is the remote medium behind ``blob.py``'s seam, and the only module that knows a protocol:

- ``http://``/``https://``: ranged ``GET`` requests (RFC 9110); a server that answers a range with the whole
  body is refused, never downloaded.
- ``hf://org/name[@revision][/file]``: the Hub's resolve URLs (``{HF_ENDPOINT}/{repo}/resolve/{rev}/{file}``),
  read as HTTP, with ``HF_TOKEN`` (or the Hub's token file) as a bearer token; a repository lists its files
  through the Hub's model API (``/api/models/{repo}/revision/{rev}``) and resolves like a model directory.
- ``s3://bucket/key`` and ``s3://bucket/prefix/``: ``fsspec``/``s3fs`` (the usual AWS credential chain;
  ``AWS_ENDPOINT_URL`` for stores other than AWS).

Every object is opened with one ranged read of its first 64 KiB (its size and its ETag come with it), kept
with the last 128 KiB once read: a safetensors header, a torch zip's end records and central directory and a
small ``data.pkl`` are then served without more requests. The ETag (else Last-Modified) is pinned at the
first read and checked on every later one: an object replaced during a read is an error, never mixed data.
Reads are retried with backoff on connection errors, timeouts and 5xx answers, resuming at the byte reached.
Large reads are split into parts of ``PART`` bytes, ``STREAM_AHEAD`` of them fetched at once: into the caller's
buffer, into a spill file that is then mapped (``RemoteBlob.mapped``: a storage of ``SPILL`` bytes or more,
which the process then holds a few chunks of at a time, as a mapped local file), or for a reader going from
start to end, a part at a time (``Stream``: conversions and downloads). Which storage is read how is
``formats.remote_storage``'s; this module knows no format.

Writes go to a bucket only: a local write, then an upload (``stage``). ``--in-place`` on an ``s3://`` source
replaces an object by one PUT conditional on the ETag read (``replace_object``), and commits a sharded or DCP
prefix through its index (``replace_prefix``): new data files under new names, the index last, old files after.
Every write first aborts the incomplete multipart uploads a killed upload left under its key or prefix
(``abort_leftovers``).
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Callable

from .blobio import Blob, transferred
from .errors import FormatError, ParamtoolError, UsageError

WINDOW = 1 << 16  # bytes fetched at least per small read (read-ahead): headers and pickles in one request
TAIL = 1 << 18  # a read near the end fetches this much before it: a zip's end records and central directory (about 3000 records)
PART = 8 << 20  # a large read is split into parts of this size, fetched concurrently
CACHED = 16  # windows kept per object
CACHED_BYTES = 16 << 20  # and their bytes, at most (the head window stays)
METADATA = 4 << 20  # a read of the file view up to this size is a format's metadata: kept in a window
SPILL = 64 << 20  # a span at least this large is mapped from a spill file (``RemoteBlob.mapped``), not held
STREAM_AHEAD = 3  # parts fetched at once by one read (a ``Stream``: its memory, this many parts)
PART_THREADS = 4  # the threads that fetch parts (``_parts``), for every read in the run
RETRIES = 5
TIMEOUT = 60.0
MAX_REDIRECTS = 5
PRESIGNED_FOR = 7 * 24 * 3600  # seconds an S3 object's presigned URL is valid (SigV4's longest)
MAX_JSON = 64 << 20  # an index, a Hub listing, a config.json


def _missing_extra(name: str) -> ParamtoolError:
    return ParamtoolError(f"reading s3:// needs the optional extra: pip install 'paramtool[remote]' ({name} is missing)")


# --- HTTP (plain URLs and the Hub) -------------------------------------------------------------------------


def _opener(cafile: str | None = None) -> Any:
    """urllib's opener with bounded redirects to http(s) only; ``cafile``: the certificates to trust instead of
    the system's (an S3 store's ``AWS_CA_BUNDLE``, as botocore trusts only it)."""
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            from urllib.parse import urlsplit

            if not newurl.startswith(("http://", "https://")):
                raise FormatError(f"{_public(req.full_url)}: redirected to a non-HTTP location")
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
                new.remove_header("Authorization")  # a token goes to its own host only (a CDN gets signed URLs)
            return new

    handlers: list[Any] = [Redirects]
    if cafile is not None:
        import ssl

        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
    return urllib.request.build_opener(*handlers)


_OPENERS: dict[str | None, Any] = {}  # by the certificates trusted (None: the system's)


def _public(url: str) -> str:
    """A URL as it may be printed: without user information or a query (where signatures and tokens go)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class NotFound(ParamtoolError):
    """No object at that URL (HTTP 404)."""


class _Retry(Exception):
    """A failure worth another try (connection reset, timeout, 5xx)."""


def _with_retries(what: str, attempt: Callable[[], Any]) -> Any:
    for i in range(RETRIES):
        try:
            return attempt()
        except _Retry as e:
            if i == RETRIES - 1:
                raise FormatError(f"{what}: {e} (after {RETRIES} tries)") from None
            time.sleep(min(0.1 * 2 ** i, 2.0))


def _changed(label: str, what: str) -> FormatError:
    """The error for an object replaced while it is read (its pinned ``what`` differs)."""
    return FormatError(f"{label}: the object changed while it was read ({what} differs): read it again")


class HttpObject:
    """One object behind a URL: ranged GETs, with the validator (ETag, else Last-Modified) pinned."""

    def __init__(self, url: str, label: str, headers: dict[str, str] | None = None,
                 cafile: str | None = None) -> None:
        self.url, self.label, self.headers, self.cafile = url, label, dict(headers or {}), cafile
        self.size: int | None = None
        self.validator: tuple[str, str] | None = None

    def _request(self, method: str, extra: dict[str, str]) -> Any:
        import socket
        import urllib.error
        import urllib.request

        opener = _OPENERS.get(self.cafile)
        if opener is None:
            opener = _OPENERS[self.cafile] = _opener(self.cafile)
        req = urllib.request.Request(self.url, method=method, headers={**self.headers, **extra})
        try:
            return opener.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                return e
            if e.code >= 500 or e.code == 429:
                raise _Retry(f"HTTP {e.code}") from None
            if e.code == 412:  # If-Match (an S3 object's pinned ETag) no longer holds
                raise _changed(self.label, "ETag") from None
            if 300 <= e.code < 400:  # urllib's own refusal: another scheme than http(s), or a loop
                raise FormatError(f"{self.label}: a redirect paramtool does not follow (to a non-HTTP location, "
                                  f"or more than {MAX_REDIRECTS})") from None
            raise _http_error(self.label, e.code) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retry(f"cannot connect ({reason})") from None

    def _check(self, response: Any) -> None:
        """Pin the object's validator at the first answer; refuse a later answer from another version."""
        etag = response.headers.get("ETag")
        validator = ("ETag", etag) if etag else ("Last-Modified", response.headers.get("Last-Modified") or "")
        if self.validator is None:
            self.validator = validator
        elif validator != self.validator:
            raise _changed(self.label, validator[0])

    def fetch_into(self, buf: Any, start: int) -> int:
        """Fill ``buf`` from byte ``start`` (one ranged GET, retried and resumed); the bytes read."""
        view = memoryview(buf).cast("B")
        done = 0

        def attempt() -> int:
            nonlocal done
            end = start + len(view) - 1
            response = self._request("GET", {"Range": f"bytes={start + done}-{end}"})
            with response:
                if response.status == 416:  # past the end (an empty object)
                    self._size_from(response, 416)
                    return done
                if response.status != 206 and not self._whole_within(response, start + done, len(view) - done):
                    raise FormatError(f"{self.label}: the server ignored the byte range (HTTP {response.status} "
                                      "with the whole object): paramtool reads remote objects by range only")
                self._check(response)
                first = self._size_from(response, 206) if response.status == 206 else 0
                if first != start + done:
                    raise FormatError(f"{self.label}: the server answered another byte range than asked")
                try:
                    while done < len(view):
                        n = response.readinto(view[done:])
                        if not n:
                            break
                        done += n
                except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as e:
                    raise _Retry(f"connection lost ({type(e).__name__})") from None
                want = min(len(view), (self.size or 0) - start)
                if done < want:
                    raise _Retry("connection closed early")
                return done

        got = _with_retries(self.label, attempt)
        transferred(got)
        return got

    def _whole_within(self, response: Any, start: int, n: int) -> bool:
        """A ``200`` answer to a first range that covers the whole object (a small file: an index, a config;
        some servers answer so): taken when its stated length fits in the range asked for, and recorded as the
        object's size. Any other ``200`` is a server that ignores ``Range``."""
        length = response.headers.get("Content-Length") or ""
        if response.status != 200 or start != 0 or not length.isdigit() or int(length) > n:
            return False
        if self.size is None:
            self.size = int(length)
        return self.size == int(length)

    def _size_from(self, response: Any, status: int) -> int:
        """The first byte of a 206 answer's range; the object's size (``bytes a-b/size``) is recorded."""
        text = response.headers.get("Content-Range") or ""
        try:
            unit, _, rest = text.partition(" ")
            span, _, total = rest.partition("/")
            size = int(total)
            first = int(span.split("-")[0]) if status == 206 else 0
        except ValueError:
            raise FormatError(f"{self.label}: the server's Content-Range is malformed ({text[:60]!r})") from None
        if unit != "bytes" or size < 0:
            raise FormatError(f"{self.label}: the server's Content-Range is malformed ({text[:60]!r})")
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise _changed(self.label, "its size")
        return first


def _http_error(label: str, code: int) -> ParamtoolError:
    if code in (401, 403):
        which = "the AWS credentials" if label.startswith("s3://") else "the credentials (HF_TOKEN for the Hub)"
        return ParamtoolError(f"{label}: access denied (HTTP {code}): check {which}")
    if code == 404:
        return NotFound(f"{label}: not found (HTTP 404)")
    return ParamtoolError(f"{label}: HTTP {code}")


def _get_json(url: str, label: str, headers: dict[str, str]) -> Any:
    obj = HttpObject(url, label, headers)

    def attempt() -> bytes:
        with obj._request("GET", {}) as response:
            if response.status != 200:
                raise FormatError(f"{label}: HTTP {response.status}")
            length = int(response.headers.get("Content-Length") or 0)
            if length > MAX_JSON:
                raise FormatError(f"{label}: {length} bytes, above the {MAX_JSON} byte limit")
            try:
                return response.read(MAX_JSON + 1)
            except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as e:
                raise _Retry(f"connection lost ({type(e).__name__})") from None

    raw = _with_retries(label, attempt)
    if len(raw) > MAX_JSON:
        raise FormatError(f"{label}: above the {MAX_JSON} byte limit")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError(f"{label}: not valid JSON") from None


# --- the Hub ---------------------------------------------------------------------------------------------------


def _hf_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    try:
        with open(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token"), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _hf_parts(path: str) -> tuple[str, str, str]:
    """``hf://org/name[@rev][/file]`` -> (repository, revision, file or "")."""
    parts = path[len("hf://"):].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UsageError(f"{path}: a Hub source is hf://org/name[@revision][/file]")
    name, _, rev = parts[1].partition("@")
    return f"{parts[0]}/{name}", rev or "main", "/".join(p for p in parts[2:] if p)


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hf_headers() -> dict[str, str]:
    token = _hf_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _http_target(path: str) -> tuple[str, dict[str, str]]:
    """The URL to GET for ``path`` (an http(s) URL, or a file in a Hub repository) and its headers."""
    if path.startswith("hf://"):
        from urllib.parse import quote

        repo, rev, file = _hf_parts(path)
        if not file:
            raise FormatError(f"{path}: a Hub repository, not a file in it")
        return f"{_hf_endpoint()}/{repo}/resolve/{quote(rev, safe='')}/{quote(file)}", _hf_headers()
    return path, {}


_HF_FILES: dict[tuple[str, str], list[str]] = {}


def _hf_files(path: str) -> list[str]:
    """Every file in the repository ``path`` is in (the Hub's model API; asked once per run)."""
    from urllib.parse import quote

    repo, rev, _ = _hf_parts(path)
    if (repo, rev) not in _HF_FILES:
        url = f"{_hf_endpoint()}/api/models/{repo}/revision/{quote(rev, safe='')}"
        info = _get_json(url, f"hf://{repo}", _hf_headers())
        siblings = info.get("siblings") if isinstance(info, dict) else None
        if not isinstance(siblings, list):
            raise FormatError(f"hf://{repo}: the Hub's answer lists no files")
        _HF_FILES[(repo, rev)] = [s["rfilename"] for s in siblings
                                  if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]
    return _HF_FILES[(repo, rev)]


# --- S3 ---------------------------------------------------------------------------------------------------------

_S3: Any = None


def s3fs_filesystem() -> Any:
    """The one ``s3fs`` filesystem (credentials from the usual AWS chain; ``AWS_ENDPOINT_URL`` honoured)."""
    global _S3
    if _S3 is None:
        try:
            import s3fs
        except ImportError:
            raise _missing_extra("s3fs") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        _S3 = s3fs.S3FileSystem(endpoint_url=endpoint) if endpoint else s3fs.S3FileSystem()
    return _S3


def _s3_key(path: str) -> str:
    key = path[len("s3://"):]
    if not key or key.startswith("/"):
        raise UsageError(f"{path}: an S3 source is s3://bucket/key or s3://bucket/prefix/")
    return key


def _s3_call(label: str, action: Callable[[], Any]) -> Any:
    """An s3fs call, its failures as one line (the credentials never in it)."""
    try:
        return action()
    except OSError as e:
        raise _s3_failure(label, e) from None


def _s3_failure(label: str, e: OSError) -> ParamtoolError:
    """An s3fs failure as one line."""
    if isinstance(e, FileNotFoundError):
        return ParamtoolError(f"{label}: not found")
    if isinstance(e, PermissionError):
        return ParamtoolError(f"{label}: access denied: check the AWS credentials")
    return FormatError(f"{label}: {' '.join(str(e).split())[:160]}")


def _precondition_failed(e: BaseException) -> bool:
    """Did the store refuse a request because its ``If-Match``/``If-None-Match`` did not hold (HTTP 412)?"""
    text = str(e).lower().replace("-", "")
    return "precondition" in text or "412" in text


def _cut_short(e: BaseException) -> bool:
    """Is ``e`` an answer of the async S3 client cut short (a dropped connection, a body ended early)?"""
    import aiohttp
    import botocore.exceptions as boto

    return isinstance(e, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, boto.ResponseStreamingError,
                          boto.ReadTimeoutError, boto.ConnectionClosedError, boto.EndpointConnectionError))


class S3Object:
    """One S3 object, read by ranged GETs that name the ETag pinned when it was opened (``If-Match``).

    The GETs go to a presigned URL (s3fs and botocore sign it, with the usual credential chain) through the
    HTTP client of ``HttpObject``, which receives a part straight into its buffer: the async client costs
    Python work for every 64-256 KiB it receives, a third of the CPU of a stats run on a local store. The
    certificates trusted are botocore's: ``AWS_CA_BUNDLE`` when it is set. Where no URL can be signed
    (anonymous access), ranged GetObject calls through s3fs do the same."""

    def __init__(self, path: str) -> None:
        self.label = path
        self.fs = s3fs_filesystem()
        self.key = _s3_key(path)
        self.size: int | None = None
        self.etag: str | None = None
        self._http: HttpObject | None = None
        try:
            url = self.fs.url(self.key, expires=PRESIGNED_FOR)
        except Exception:  # noqa: BLE001 - no credentials to sign with: the async client reads
            url = ""
        if url.startswith(("http://", "https://")):  # (its first ranged read says the size and the ETag: no HEAD)
            self._http = HttpObject(url, path, cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        else:
            self._info()

    def _info(self) -> None:
        """The object's size and ETag as s3fs says them (a HEAD request); a prefix or nothing is an error."""
        info = _s3_call(self.label, lambda: self.fs.info(self.key))
        if info.get("type") != "file":
            raise ParamtoolError(f"{self.label}: not an object (a prefix: end it with '/')")
        self.size, self.etag = int(info["size"]), info.get("ETag")

    def fetch_into(self, buf: Any, start: int) -> int:
        if self._http is None:
            return self._get_object_into(buf, start)
        if self.size is not None:
            return self._http.fetch_into(buf, start)
        try:  # the first read: the object's size and ETag come with it
            got = self._http.fetch_into(buf, start)
        except NotFound:
            self._info()  # a prefix, or nothing: s3fs says which
            raise
        self.size = self._http.size or 0
        kind, value = self._http.validator or ("", "")
        if kind == "ETag" and value:
            self.etag = value
            self._http.headers["If-Match"] = value  # every later range names it: a replaced object is a 412
        return got

    def _get_object_into(self, buf: Any, start: int) -> int:
        from fsspec.asyn import sync

        view = memoryview(buf).cast("B")
        n = min(len(view), self.size - start)
        if n <= 0:
            return 0
        bucket, _, key = self.key.partition("/")
        done = 0  # (a retry resumes here)

        async def get() -> None:
            nonlocal done
            kwargs = {"IfMatch": self.etag} if self.etag else {}
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                              Range=f"bytes={start + done}-{start + n - 1}", **kwargs)
            async with response["Body"] as body:  # (received into the caller's buffer: no whole-part copy)
                while done < n:
                    got = await body.readinto(view[done:n])
                    if not got:
                        break
                    done += got

        def attempt() -> None:
            try:
                sync(self.fs.loop, get)
            except (ConnectionError, TimeoutError) as e:
                raise _Retry(f"connection lost ({type(e).__name__})") from None
            except Exception as e:
                if _cut_short(e):
                    raise _Retry(f"connection lost ({type(e).__name__})") from None
                raise

        try:
            _with_retries(self.label, attempt)
        except OSError as e:
            if _precondition_failed(e):  # If-Match failed: another ETag
                raise _changed(self.label, "ETag") from None
            raise _s3_failure(self.label, e) from None
        if done != n:
            raise FormatError(f"{self.label}: the store answered {done} bytes for a range of {n}")
        transferred(n)
        return n


# --- the blob ------------------------------------------------------------------------------------------------


class RemoteBlob(Blob):
    """A remote object (``HttpObject`` or ``S3Object``) with small reads served from a few cached windows."""
    def __init__(self, name: str) -> None:
        self.name = name
        self._windows: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        if name.startswith("s3://"):
            self._object: Any = S3Object(name)
        else:
            url, headers = _http_target(name)
            self._object = HttpObject(url, name, headers)
        head = bytearray(WINDOW)
        got = self._object.fetch_into(head, 0)  # the first range says the size
        self.size = self._object.size or 0
        self._windows.append((0, bytes(head[:got])))

    def _window(self, start: int, end: int) -> bytes:
        data = bytearray(end - start)
        got = self._object.fetch_into(data, start)
        data = bytes(data[:got])
        with self._lock:
            self._windows.append((start, data))
            while len(self._windows) > 1 and (len(self._windows) > CACHED
                                              or sum(len(d) for _, d in self._windows) > CACHED_BYTES):
                self._windows.pop(1)  # the head stays
        return data

    def _cached(self, offset: int, n: int, partial: bool = False) -> bytes | None:
        """``n`` bytes from ``offset`` out of a window (``partial``: as many as a window holds from there)."""
        with self._lock:
            for start, data in self._windows:
                if start <= offset < start + len(data) and (partial or offset + n <= start + len(data)):
                    return data[offset - start: offset - start + n]
        return None

    def read_some(self, buf: Any, offset: int) -> int:
        """Fill some of ``buf`` from ``offset``: what a window holds from there, else a read (the file view's
        reads, which may be short)."""
        view = memoryview(buf).cast("B")
        data = self._cached(offset, len(view), partial=True) if len(view) else None
        if data:
            view[:len(data)] = data
            return len(data)
        return self.pread_into(view, offset)

    def pread_into(self, buf: Any, offset: int, ahead: bool = True) -> int:
        """``ahead``: a small read fetches a whole window, kept for the reads that follow (headers, pickles);
        tensor data is read as asked (``RemoteStorage``), so values cost their own bytes."""
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - offset))
        if n == 0:
            return 0
        data = self._cached(offset, n)
        if data is not None:
            view[:n] = data
            return n
        if not ahead or n > METADATA:
            return self._read_large(view[:n], offset)
        done = 0
        while done < n:  # a format's metadata (headers, pickles, a zip's directory): through kept windows
            pos = offset + done
            data = self._cached(pos, n - done, partial=True) or self._fetch_window(pos, n - done)
            k = min(len(data), n - done)
            view[done:done + k] = data[:k]
            done += k
        return n

    def _fetch_window(self, pos: int, want: int) -> bytes:
        """Fetch and keep a window from ``pos`` (at least ``WINDOW`` bytes, and ``want``; near the end, the whole
        tail, where a zip keeps its directory), stopping where a kept window begins (nothing is fetched
        twice); its bytes from ``pos``."""
        start, end = pos, min(self.size, pos + max(want, WINDOW))
        if end == self.size or pos >= self.size - TAIL:
            start, end = max(0, min(pos, self.size - TAIL)), self.size
        with self._lock:
            end = min([end] + [w for w, _ in self._windows if pos < w < end])
        data = self._window(start, end)[pos - start:]
        if not data:
            raise FormatError(f"{self.name}: truncated: a read ends beyond the object")
        return data

    def will_read(self, spans: list[tuple[int, int]]) -> None:
        """A format is about to read these ``(start, end)`` spans (a zip's pickle and small records): what the
        kept windows do not hold of them is fetched now, spans less than ``WINDOW`` apart in one request, all
        requests at once, and kept (at most ``METADATA`` bytes; beyond that, each read asks for itself)."""
        with self._lock:
            held = sorted((w, w + len(d)) for w, d in self._windows)
        missing: list[list[int]] = []
        for start, end in sorted(spans):
            start, end = max(0, start), min(self.size, end)
            for w, w_end in held:  # (what a window holds is cut away: the rest, before and after it)
                if w <= start < w_end:
                    start = w_end
                elif start < w < end:
                    missing.append([start, w])
                    start = min(end, w_end)
            if start < end:
                missing.append([start, end])
        merged: list[list[int]] = []
        for start, end in sorted(missing):
            if merged and start - merged[-1][1] < WINDOW:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if merged and sum(end - start for start, end in merged) <= METADATA:
            for job in [_parts().submit(self._window, start, end) for start, end in merged]:
                job.result()

    def read_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes at each (offset, length) of ``spans``: a ranged request each (nothing read ahead), sent
        concurrently, so samples of many storages cost their own bytes and a round trip or so."""
        def one(offset: int, n: int) -> bytes:
            buf = bytearray(n)
            if self.pread_into(buf, offset, ahead=False) != n:
                raise FormatError(f"{self.name}: truncated: a read ends beyond the object")
            return bytes(buf)

        jobs = [_parts().submit(one, offset, n) for offset, n in spans]
        return [job.result() for job in jobs]

    def _read_large(self, view: memoryview, offset: int) -> int:
        """A large read as parts fetched concurrently, straight into the caller's buffer (nothing cached)."""
        parts = [(i, min(PART, len(view) - i)) for i in range(0, len(view), PART)]
        if len(parts) == 1:
            return self._object.fetch_into(view, offset)
        jobs: list[Any] = []
        for i, n in parts:  # (at most ``STREAM_AHEAD`` at once: a server answers a few ranges faster than many)
            if len(jobs) >= STREAM_AHEAD and jobs[-STREAM_AHEAD].result() != parts[len(jobs) - STREAM_AHEAD][1]:
                break
            jobs.append(_parts().submit(self._object.fetch_into, view[i:i + n], offset + i))
        if [job.result() for job in jobs] != [n for _, n in parts]:
            raise FormatError(f"{self.name}: truncated: a read ends beyond the object")
        return len(view)

    def mapped(self, offset: int, nbytes: int, private: bool = False) -> Any:
        """``nbytes`` from ``offset`` written to a spill file (a temporary file, unlinked: its space goes with
        the mapping) and mapped, read-only (``private``: copy-on-write), as a local file's bytes are: pages of
        the kernel's cache, which the value kernels drop from the process behind the chunk they compute
        (``numeric.drop_mapped``), so the process holds a few chunks whatever the storage's size.

        The parts, ``STREAM_AHEAD`` at a time, are received straight into a shared writable mapping of the file
        (no copy through a buffer: half the time of writing them with ``pwrite``), each dropped from the
        process once received; the file's blocks are reserved first (``posix_fallocate``), so a full disk is
        an error here rather than a SIGBUS on a mapped write."""
        import mmap
        import tempfile

        try:
            with tempfile.TemporaryFile(prefix="paramtool-spill-") as f:
                fd = f.fileno()
                os.posix_fallocate(fd, 0, nbytes)
                with mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as out:
                    with memoryview(out) as view:
                        self._receive(view, offset, out)
                if private:
                    return mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as e:
            raise ParamtoolError(f"{self.name}: cannot spill {nbytes} bytes to {tempfile.gettempdir()} "
                                 f"({e.strerror or e}): set TMPDIR to a directory with room") from None

    def _receive(self, view: memoryview, offset: int, mapping: Any) -> None:
        """Fill ``view`` (of ``mapping``) from ``offset``, a part at a time, each part's pages dropped from the
        process once it is in (they stay in the file)."""
        import mmap

        def part(i: int) -> None:
            n = min(PART, len(view) - i)
            if self._object.fetch_into(view[i:i + n], offset + i) != n:
                raise FormatError(f"{self.name}: truncated: a read ends beyond the object")
            mapping.madvise(mmap.MADV_DONTNEED, i, n)

        jobs: list[Any] = []
        try:
            for i in range(0, len(view), PART):
                if len(jobs) >= STREAM_AHEAD:
                    jobs.pop(0).result()
                jobs.append(_parts().submit(part, i))
            for job in jobs:
                job.result()
        finally:
            for job in jobs:  # (none may write into the mapping once it is closed)
                job.cancel() or job.exception()

    def stream(self, offset: int, nbytes: int) -> Stream:
        """``nbytes`` from ``offset`` for a reader going from their start to their end (``Stream``)."""
        return Stream(self, offset, nbytes)


class Stream(Blob):
    """A span of a remote object read in order by one reader (a conversion's chunks, a download): parts are
    fetched concurrently, at most ``STREAM_AHEAD`` of them ahead of the reader, and each is let go once read
    whole, so a storage of any size costs a few parts of memory. Reads elsewhere (or twice) go to the object."""

    def __init__(self, blob: RemoteBlob, offset: int, nbytes: int) -> None:
        self.blob, self.name, self.size = blob, blob.name, blob.size
        self.start, self.end = offset, offset + nbytes
        self._next = offset
        self._parts: dict[int, Any] = {}  # part start -> its fetch (a bytearray)
        self._read: dict[int, int] = {}  # part start -> bytes of it handed out
        self._lock = threading.Lock()

    def begin(self) -> Stream:
        """Start fetching the first parts now (the reader comes soon: a value command's storage)."""
        with self._lock:
            self._start_parts(self.start)
        return self

    def _fetch(self, start: int, n: int) -> Any:
        buf = _part_buffer(n)
        view = memoryview(buf)[:n]
        if self.blob._object.fetch_into(view, start) != n:
            raise FormatError(f"{self.name}: truncated: a read ends beyond the object")
        return view

    def _start_parts(self, at_least: int) -> None:
        """Start fetching parts in order: up to ``STREAM_AHEAD`` in memory, and the one holding ``at_least``."""
        while self._next < self.end and (len(self._parts) < STREAM_AHEAD or self._next <= at_least):
            n = min(PART, self.end - self._next)
            self._parts[self._next] = _parts().submit(self._fetch, self._next, n)
            self._next += n

    def pread_into(self, buf: Any, offset: int) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.end - offset))
        done = 0
        while done < n:
            pos = offset + done
            first = self.start + (pos - self.start) // PART * PART
            with self._lock:
                job = self._parts.get(first) if pos >= self.start else None
                if job is None and pos >= self._next:
                    self._start_parts(pos)
                    job = self._parts.get(first)
            if job is None:  # before the span, or read already: from the object
                return done + self.blob.pread_into(view[done:n], pos, ahead=False)
            data = job.result()
            k = min(n - done, first + len(data) - pos)
            view[done:done + k] = data[pos - first:pos - first + k]
            done += k
            with self._lock:
                self._read[first] = self._read.get(first, 0) + k
                if self._read[first] >= len(data):  # read whole: its buffer serves another part
                    del self._parts[first], self._read[first]
                    _PART_BUFFERS.append(data.obj)
                self._start_parts(0)
        return n

    def parts(self) -> Any:
        """The span's bytes in order, a part at a time (each valid until the next is asked for); the parts
        fetched ahead are let go if the reader stops early."""
        try:
            for start in range(self.start, self.end, PART):
                with self._lock:
                    self._start_parts(start)
                    job = self._parts.pop(start)
                data = job.result()
                yield data
                with self._lock:
                    _PART_BUFFERS.append(data.obj)
                    self._start_parts(0)
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            for job in self._parts.values():
                job.cancel()
            self._parts.clear()


_PART_BUFFERS: list[bytearray] = []  # ``PART``-sized buffers free for the next part (fresh pages cost faults)


def _part_buffer(n: int) -> bytearray:
    """A buffer of at least ``n`` bytes: a free one, else a new one of ``PART`` bytes (or ``n``)."""
    try:
        buf = _PART_BUFFERS.pop()
    except IndexError:
        return bytearray(max(n, PART))
    return buf if len(buf) >= n else bytearray(max(n, PART))


_PARTS: Any = None


def _parts() -> Any:
    """The threads that fetch parts, for every read in the run (a part's fetch never waits on another)."""
    global _PARTS
    if _PARTS is None:
        from concurrent.futures import ThreadPoolExecutor

        _PARTS = ThreadPoolExecutor(max_workers=PART_THREADS, thread_name_prefix="paramtool-part")
    return _PARTS


_BLOBS: dict[str, RemoteBlob] = {}
_MISSING: dict[str, NotFound] = {}  # objects found missing in this run (asked again: the same answer)
_OPENING: dict[str, threading.Lock] = {}  # one opening at a time per object; different objects at once
_BLOBS_LOCK = threading.Lock()


def open_blob(path: str) -> RemoteBlob:
    """The remote object ``path`` names, opened once per run (its pinned validator and windows kept); several
    objects open at once (``blob.prefetch``: shards' heads)."""
    with _BLOBS_LOCK:
        opening = _OPENING.setdefault(path, threading.Lock())
    with opening:
        with _BLOBS_LOCK:
            if path in _BLOBS:
                return _BLOBS[path]
            if path in _MISSING:
                raise _MISSING[path]
        try:
            blob = RemoteBlob(path)
        except NotFound as e:
            with _BLOBS_LOCK:
                _MISSING[path] = e
            raise
        with _BLOBS_LOCK:
            _BLOBS[path] = blob
        return blob


def forget() -> None:
    """Drop every object opened, and the Hub listings asked, so far (the next read opens them anew)."""
    with _BLOBS_LOCK:
        _BLOBS.clear()
        _MISSING.clear()
        _OPENING.clear()
    _HF_FILES.clear()
    _KEPT.clear()
    global _S3
    _S3 = None
    for hook in FORGET_HOOKS:
        hook()


FORGET_HOOKS: list[Callable[[], None]] = []  # run by ``forget`` (``remote_io``: a DCP rewrite's data names)


# --- directories ---------------------------------------------------------------------------------------------


def _is_repo(path: str) -> bool:
    return path.startswith("hf://") and not _hf_parts(path)[2]


def isdir(path: str) -> bool:
    if path.startswith("s3://"):
        fs = s3fs_filesystem()
        return _s3_call(path, lambda: fs.isdir(_s3_key(path).rstrip("/")))
    if path.startswith("hf://"):
        repo, rev, file = _hf_parts(path)
        if not file:
            return True
        prefix = file.rstrip("/") + "/"
        return any(f.startswith(prefix) for f in _hf_files(path))
    return False  # a plain HTTP server lists nothing: sources there are files (an index names its shards)


def isfile(path: str) -> bool:
    if path.startswith("s3://"):
        fs = s3fs_filesystem()
        return _s3_call(path, lambda: fs.isfile(_s3_key(path)))
    if path.startswith("hf://"):
        _, _, file = _hf_parts(path)
        return bool(file) and file in _hf_files(path)
    try:  # (the object's first ranged read: what a reader of it asks for first anyway, kept)
        open_blob(path)
    except NotFound:
        return False
    return True


def listdir(path: str) -> list[str]:
    if path.startswith("s3://"):
        fs = s3fs_filesystem()
        key = _s3_key(path).rstrip("/")
        return [os.path.basename(p.rstrip("/")) for p in _s3_call(path, lambda: fs.ls(key, detail=False))]
    if path.startswith("hf://"):
        _, _, file = _hf_parts(path)
        prefix = file.rstrip("/") + "/" if file else ""
        return sorted({f[len(prefix):].split("/", 1)[0] for f in _hf_files(path) if f.startswith(prefix)})
    raise ParamtoolError(f"{path}: an HTTP server lists no directories: name the file or the *.index.json")


# --- writing to a bucket ------------------------------------------------------------------------------------

INDEX_NAMES = (".index.json", ".metadata", "config.json")  # what makes a directory a checkpoint: written last
PUT_PART = 64 << 20  # an upload above this is a multipart upload of parts this size, completed at its end


def stage(out: str, replace: bool = False, prefix: bool = False,
          name: Callable[[str], str] | None = None) -> tuple[str, Callable[[str], str]]:
    """``-o s3://...``: the local path to write instead (in a temporary directory, removed at exit), and the
    commit that uploads what was written there once it is complete (returning the name to report).

    One object appears whole or not at all (a single PUT, or a multipart upload completed only at its end and
    aborted on a failure); a directory's data files go first and its index (``*.index.json``, ``.metadata``,
    ``config.json``) last, so a reader never sees a partial checkpoint.

    ``replace`` (``--in-place``, or ``-o`` naming the source read) rewrites ``out`` where it is: an object is
    replaced by one conditional PUT (``replace_object``), a sharded or DCP prefix (``prefix``) is committed
    through its index (``replace_prefix``). What a format needs named anew is the caller's (``remote_io``).

    ``out`` naming a prefix (``s3://bucket/prefix/``) where one file is written goes up as ``prefix/NAME``, as
    ``aws s3 cp FILE s3://bucket/prefix/`` puts it: ``name`` (given the file written) says NAME; a prefix is
    then refused when not empty only if a directory was written."""
    import atexit
    import shutil
    import tempfile

    fs = s3fs_filesystem()
    key = _s3_key(out)
    directory = prefix or (not replace and (out.endswith("/") or not os.path.splitext(key)[1]))
    under = name is not None and out.endswith("/") and not replace  # one file goes under the prefix, if one

    def refuse_content() -> None:  # a directory goes to a new (or empty) prefix
        fs.invalidate_cache()
        if _s3_call(out, lambda: fs.exists(key.rstrip("/"))) and [  # (a folder's own marker object is no content)
                p for p in fs.ls(key.rstrip("/"), detail=False) if p.rstrip("/") != key.rstrip("/")]:
            raise ParamtoolError(f"{out}: not empty: write a directory to a new prefix")

    if directory and not replace and not under:
        refuse_content()
    work = tempfile.mkdtemp(prefix="paramtool-upload-")
    atexit.register(shutil.rmtree, work, True)
    local = os.path.join(work, "checkpoint" if prefix else os.path.basename(key.rstrip("/")))
    if prefix:
        _KEPT[work] = f"s3://{key.rstrip('/')}/"

    def commit(label: str) -> str:
        if under and os.path.isfile(local):
            target = key + name(local)
            abort_leftovers(fs, target, out)
            _put(fs, local, target, out)
            forget()
            return f"s3://{target}"
        if under:
            refuse_content()
        abort_leftovers(fs, key.rstrip("/"), out, under=directory)
        if replace and prefix:
            replace_prefix(fs, local, key.rstrip("/"), out)
        elif replace:
            replace_object(fs, local, key, out)
        elif os.path.isdir(local):
            _upload_directory(fs, local, key.rstrip("/"), out)
        else:
            _put(fs, local, key, out)
        forget()  # (what this run read and pinned is not what the bucket holds now)
        return out

    return local, commit


_KEPT: dict[str, str] = {}  # a rewrite's local work directory -> the prefix it replaces (``kept``)


def kept(path: str, target: str) -> bool:
    """Is copying the object ``path`` to the local ``target`` needless, because ``target`` is in the local copy
    of ``path``'s own prefix being rewritten in place (an unchanged shard stays where it is, not downloaded)?"""
    for work, prefix in _KEPT.items():  # (the directory is written as a temporary in ``work``, then renamed)
        if target.startswith(work + os.sep) and path.startswith(prefix) \
                and os.path.relpath(target, work).split(os.sep, 1)[-1] == path[len(prefix):]:
            return True
    return False


def _put(fs: Any, local: str, key: str, label: str, if_match: str | None = None, new: bool = False) -> None:
    """Upload the file ``local`` as the object ``key``, whole or not at all: one PUT, or above ``PUT_PART`` a
    multipart upload completed only at its end (aborted on a failure). ``if_match``: only over the object with
    that ETag; ``new``: only where no object is (``If-None-Match: *``). A store that does not implement
    conditional writes is asked again without the condition (``replace_object`` checks the ETag just before)."""
    from fsspec.asyn import sync

    from . import fsops

    fsops.step("upload")  # (counted: the tests kill an upload at each step)
    bucket, _, name = key.partition("/")
    size = os.path.getsize(local)

    async def put(cond: dict[str, str]) -> None:
        if size <= PUT_PART:
            with open(local, "rb") as f:
                body = f.read()
            await fs._call_s3("put_object", Bucket=bucket, Key=name, Body=body, **cond)
            return
        upload = (await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=name))["UploadId"]
        try:
            parts = []
            with open(local, "rb") as f:
                while body := f.read(PUT_PART):
                    number = len(parts) + 1
                    fsops.step("upload part")  # (counted: a test kills an upload between its parts)
                    done = await fs._call_s3("upload_part", Bucket=bucket, Key=name, UploadId=upload,
                                             PartNumber=number, Body=body)
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
            await fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=name, UploadId=upload,
                              MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            try:
                await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=name, UploadId=upload)
            except Exception:
                pass
            raise

    cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if new else {}
    try:
        try:
            sync(fs.loop, put, cond)
        except OSError as e:
            if not cond or "notimplemented" not in str(e).lower().replace(" ", ""):
                raise
            sync(fs.loop, put, {})  # a store without conditional writes
    except OSError as e:
        if _precondition_failed(e):
            raise ParamtoolError(f"{label}: s3://{key} changed since it was read (its ETag differs): "
                                 "not replaced; read it again") from None
        raise _s3_failure(label, e) from None


def abort_leftovers(fs: Any, key: str, label: str, under: bool = False) -> None:
    """Abort the incomplete multipart uploads of ``key`` (``under``: of every key under the prefix ``key``),
    before a write there: what a killed upload (``_put``) left. S3 keeps the parts of an upload that was
    neither completed nor aborted, invisible to readers but stored (and billed), until someone aborts it; a
    process killed with SIGKILL cannot. The store lists no metadata for an incomplete upload, so paramtool
    cannot tell its own from another client's: any upload of these keys begun before this write is aborted,
    as the write replaces those keys anyway. A store that cannot list uploads is left as it is."""
    from fsspec.asyn import sync

    bucket, _, name = key.partition("/")
    name = name + "/" if under and name else name

    async def abort() -> None:
        uploads, marker = [], {}
        while True:
            page = await fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=name, **marker)
            uploads += page.get("Uploads") or []
            if not page.get("IsTruncated"):
                break
            marker = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
        for upload in uploads:
            if under or upload.get("Key") == name:
                await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                  UploadId=upload["UploadId"])

    try:
        sync(fs.loop, abort)
    except OSError as e:
        if "notimplemented" not in str(e).lower().replace(" ", ""):
            raise _s3_failure(label, e) from None


def _etag_now(fs: Any, key: str) -> str | None:
    """The ETag of ``key`` as the store says now (a HEAD request); None where there is no object."""
    try:
        return fs.info(key, refresh=True).get("ETag")
    except FileNotFoundError:
        return None


def _pinned(fs: Any, key: str) -> str | None:
    """The ETag ``key`` had when this run read it (``S3Object``), else as it is now."""
    with _BLOBS_LOCK:
        for b in _BLOBS.values():
            if isinstance(b._object, S3Object) and b._object.key == key:
                return b._object.etag
    return _etag_now(fs, key)


def replace_object(fs: Any, local: str, key: str, label: str) -> None:
    """Replace the object ``key`` by the file ``local`` in one PUT (S3 replaces an object atomically: a reader
    gets the old bytes or the new, never a mix), only if it is still the version read: its ETag is checked by a
    HEAD request right before, and named in the PUT's ``If-Match`` (the store then refuses the PUT itself if
    another writer replaced the object in between; on a store that ignores the condition, the HEAD is all)."""
    etag = _pinned(fs, key)
    if etag is not None and _etag_now(fs, key) != etag:
        raise ParamtoolError(f"{label}: s3://{key} changed since it was read (its ETag differs): not replaced; "
                             "read it again")
    _put(fs, local, key, label, if_match=etag, new=etag is None)


def _same_bytes(path: str, etag: str | None) -> bool:
    """Does the object whose ETag is ``etag`` hold exactly the bytes of the file ``path``? (A single-part
    upload's ETag is its bytes' MD5; a multipart or encrypted object's is not, and counts as different.)"""
    import hashlib

    if not etag or os.path.getsize(path) > PUT_PART:
        return False
    with open(path, "rb") as f:
        return hashlib.md5(f.read(), usedforsecurity=False).hexdigest() == etag.strip('"')


def _read_json(path: str) -> Any:
    """The (small) JSON object ``path`` names, read by range."""
    b = open_blob(path)
    if b.size > MAX_JSON:
        raise FormatError(f"{path}: {b.size} bytes, above the {MAX_JSON} byte limit")
    try:
        return json.loads(b.pread(0, b.size))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError(f"{path}: not valid JSON") from None


def _shard_names(index: Any) -> set[str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    return {v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set()


def replace_prefix(fs: Any, local: str, key: str, label: str) -> None:
    """Rewrite the checkpoint under the prefix ``key`` with the one written to the local directory ``local``,
    committed through its index as ``shard_commit`` does on a disk:

    1. every data file whose bytes changed goes up under a new name (a shard the old index names is never
       overwritten: a reader of the old index still finds every old shard); unchanged files are not uploaded;
    2. the index naming the new shards replaces the old index in one conditional PUT (``replace_object``):
       the commit point. Before it the prefix holds the old checkpoint (and unnamed new shards, removed on a
       failure); from it on, the new one;
    3. the shards the old index named and the new one does not are deleted.

    A DCP directory's data files are named by its ``.metadata``: ``stage`` has them written under new names
    (``formats.dcp.DATA_PREFIX``), and after the commit every ``.distcp`` file the new ``.metadata`` does not
    name is deleted. A changed file nothing renames (a sidecar) is refused before anything is uploaded."""
    import re
    import secrets

    fs.invalidate_cache()
    old = {os.path.relpath(p, key): info.get("ETag")
           for p, info in _s3_call(label, lambda: fs.find(key, detail=True)).items()}
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
    indexes = [f for f in files if f.endswith(INDEX_NAMES)]
    stale = [f for f in old if f.endswith(".index.json") and f not in indexes]
    if stale:
        raise ParamtoolError(f"{label}: the new checkpoint has no {stale[0]}: --in-place keeps the format; "
                             "write -o s3://a-new-prefix/")
    json_index = next((f for f in indexes if f.endswith(".index.json")), None)
    new_index: Any = {}
    if json_index:
        with open(os.path.join(local, json_index), encoding="utf-8") as f:
            new_index = json.load(f)
    old_index = _read_json(f"s3://{key}/{json_index}") if json_index in old else {}
    named = _shard_names(new_index)
    missing = sorted(n for n in named if n not in files and n not in old)
    if missing:
        raise ParamtoolError(f"{label}: the new index names {missing[0]}, which is neither written nor in the bucket")
    uploads, renames = [], {}
    for f in files:
        if f in indexes or (f in old and _same_bytes(os.path.join(local, f), old[f])):
            continue
        target = f
        if f in old:
            if f not in named:  # (a DCP data file, a sidecar: nothing names it in a JSON index)
                raise ParamtoolError(f"{label}: {f} changed, and only an index that paramtool rewrites can name "
                                     "it anew: --in-place is not supported here; write -o s3://a-new-prefix/")
            stem, ext = os.path.splitext(f)
            stem = re.sub(r"\.[0-9a-f]{8}$", "", stem)  # (the token an earlier rewrite gave it)
            target = renames[f] = f"{stem}.{secrets.token_hex(4)}{ext}"
        uploads.append((f, target))
    if renames:
        new_index["weight_map"] = {k: renames.get(v, v) for k, v in new_index["weight_map"].items()}
        with open(os.path.join(local, json_index), "w", encoding="utf-8") as out:
            json.dump(new_index, out, indent=2)
    done: list[str] = []
    committed = False
    try:
        for f, target in uploads:
            _put(fs, os.path.join(local, f), f"{key}/{target}", label, new=True)
            done.append(target)
        for f in sorted(indexes, key=lambda f: f.endswith("config.json")):  # the index first: the commit
            if not (f in old and _same_bytes(os.path.join(local, f), old[f])):
                replace_object(fs, os.path.join(local, f), f"{key}/{f}", label)
                committed = True
    except BaseException:
        if not committed:  # nothing names the new files: the old checkpoint is as it was
            _remove(fs, [f"{key}/{t}" for t in done])
        raise
    gone = _shard_names(old_index) - _shard_names(new_index)
    if ".metadata" in indexes:  # a DCP directory: its data files are the .distcp files the new .metadata names
        gone |= {f for f in old if f.endswith(".distcp") and f not in files}
    _remove(fs, [f"{key}/{f}" for f in sorted(gone) if f in old])


def _remove(fs: Any, keys: list[str]) -> None:
    from . import fsops

    for k in keys:
        fsops.step("delete")
        try:
            fs.rm_file(k)
        except Exception:
            pass


def _upload_directory(fs: Any, local: str, key: str, label: str) -> None:
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
    last = [f for f in files if f.endswith(INDEX_NAMES)]
    first = [f for f in files if f not in last]
    try:
        for f in first:
            _put(fs, os.path.join(local, f), f"{key}/{f}", label)
    except BaseException:
        _remove(fs, [f"{key}/{f}" for f in first])  # nothing names the data files written so far: the index is last
        raise
    for f in last:
        _put(fs, os.path.join(local, f), f"{key}/{f}", label)
