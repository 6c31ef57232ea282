"""An HTTP/1.1 forwarding proxy for fault injection and bandwidth limits in object-store tests.

:class:`FaultProxy` sits between a client (obstore, with its endpoint set to
:attr:`FaultProxy.endpoint`) and an upstream server (moto's S3 server, MinIO, ...) and forwards
every request byte for byte: the request line, every header (``Host`` included, which SigV4
signs) and the body, streamed in blocks (``Content-Length`` or ``Transfer-Encoding: chunked``),
over keep-alive connections. Rules, checked in order, make chosen requests fail, drop, stall or
lose their response::

    from deltackpt.testing.httpproxy import FaultProxy

    with FaultProxy("http://127.0.0.1:9000", bandwidth=50e6) as proxy:
        rule = proxy.add_rule(method="PUT", path=r"/packs/", status=503, times=2)
        ...  # a client configured with endpoint=proxy.endpoint
        assert rule.hits == 2

Actions (each after sleeping the rule's ``delay``, if any):

* ``"fail"``: answer ``status`` with an S3-style XML error body, without forwarding;
* ``"drop"``: reset the client connection without an answer: after reading the whole request,
  or with ``after_bytes > 0`` after reading that many bytes of the request body (a link that
  dies mid-upload); the upstream never sees the request;
* ``"delay"``: forward normally after the delay;
* ``"reset_response"``: forward to the upstream (which applies the request), then reset the
  client connection after ``after_bytes`` bytes of the response body; with ``after_bytes=0``
  nothing of the response reaches the client (a lost answer to an applied write).

Only the standard library is used; nothing here is imported by ``import deltackpt``.
"""
from __future__ import annotations

import io
import re
import select
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: bytes moved per read/write (and per throttle step) when streaming a body
BLOCK = 64 << 10
#: most bytes of a request or response head, and most header lines
MAX_HEAD = 64 << 10
MAX_HEADERS = 200
#: seconds the proxy waits on its upstream before giving up on a request
UPSTREAM_TIMEOUT = 120.0
ACTIONS = ("fail", "drop", "delay", "reset_response")
#: S3 error codes for the statuses a "fail" rule answers
S3_CODES = {400: "InvalidRequest", 403: "AccessDenied", 404: "NoSuchKey", 409: "OperationAborted",
            412: "PreconditionFailed", 416: "InvalidRange", 429: "SlowDown",
            500: "InternalError", 501: "NotImplemented", 502: "BadGateway",
            503: "SlowDown", 504: "GatewayTimeout"}
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 412: "Precondition Failed", 416: "Range Not Satisfiable",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class _Cut(Exception):
    """The connection is to be reset now (a drop, or a cut response)."""


class _Closed(Exception):
    """The peer closed its connection (between requests, or mid-message)."""


@dataclass
class Rule:
    """One fault rule (see :meth:`FaultProxy.add_rule`); ``hits`` counts the requests it acted on."""

    method: str | None = None
    path: str | None = None
    query: str | None = None
    action: str = "fail"
    status: int = 503
    times: int | None = 1
    delay: float = 0.0
    after_bytes: int = 0
    hits: int = 0
    _path_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _query_re: re.Pattern[str] | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}: one of {', '.join(ACTIONS)}")
        if self.times is not None and self.times < 0:
            raise ValueError(f"times must be None or >= 0, got {self.times}")
        if self.delay < 0 or self.after_bytes < 0:
            raise ValueError("delay and after_bytes must be >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status}")
        self.method = self.method.upper() if self.method else None
        self._path_re = re.compile(self.path) if self.path is not None else None
        self._query_re = re.compile(self.query) if self.query is not None else None

    def matches(self, method: str, path: str, query: str) -> bool:
        """Whether a request of ``method`` on ``path`` with ``query`` is one this rule targets
        (regardless of how many times it has acted)."""
        return ((self.method is None or self.method == method)
                and (self._path_re is None or self._path_re.search(path) is not None)
                and (self._query_re is None or self._query_re.search(query) is not None))


@dataclass
class Stats:
    """Traffic seen since the last :meth:`FaultProxy.reset_stats`: requests received per method,
    request-body bytes forwarded upstream and response-body bytes forwarded to clients."""

    requests: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0


#: how far the bandwidth cap lets traffic run ahead of its schedule before a sleep
BURST_S = 0.002


class _Bucket:
    """A rate limit shared by every connection: each block waits for its share of the link."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        rate = self.rate
        if not rate or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(now, self._next) + n / rate  # after the blocks queued before it
            wait = self._next - now
        # a sleep costs far more than one block at a high rate (about 0.5 ms, where 64 KiB
        # at 1 GB/s is 65 us): a block runs ahead while the link's schedule is at most
        # BURST_S behind, and the debt is paid by a later, longer sleep; the average rate holds
        if wait > BURST_S:
            time.sleep(wait)


class _Head:
    """A parsed request or response head, with its raw bytes for forwarding unchanged."""

    def __init__(self, raw: bytes, first: str, headers: list[tuple[str, str]]) -> None:
        self.raw, self.first = raw, first
        self.headers = {k.lower(): v for k, v in headers}

    def get(self, name: str) -> str:
        return self.headers.get(name, "").strip()

    @property
    def chunked(self) -> bool:
        return "chunked" in self.get("transfer-encoding").lower()

    @property
    def length(self) -> int | None:
        text = self.get("content-length")
        if not text:
            return None
        if not text.isdigit():
            raise ValueError(f"bad Content-Length {text!r}")
        return int(text)

    @property
    def close(self) -> bool:
        return "close" in self.get("connection").lower()


def _read_head(f: io.BufferedReader) -> _Head:
    """Read a message head (start line and headers) from ``f``."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = f.readline(MAX_HEAD + 1)
        if not line:
            if lines:
                raise _Closed("connection closed inside a message head")
            raise _Closed("connection closed")
        if not lines and line in (b"\r\n", b"\n"):
            continue  # a stray empty line between messages
        size += len(line)
        if size > MAX_HEAD or len(lines) > MAX_HEADERS:
            raise ValueError("message head too large")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    text = [ln.decode("latin-1").rstrip("\r\n") for ln in lines[:-1]]
    headers: list[tuple[str, str]] = []
    for ln in text[1:]:
        if ln[:1] in (" ", "\t") and headers:  # an obsolete folded continuation
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + ln.strip())
            continue
        name, sep, value = ln.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {ln!r}")
        headers.append((name.strip(), value.strip()))
    return _Head(b"".join(lines), text[0], headers)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (no orderly shutdown), as a dying link looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Upstream:
    """One keep-alive connection to the upstream server (per client connection)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.rfile: io.BufferedReader | None = None

    def connect(self) -> tuple[socket.socket, io.BufferedReader]:
        """The connection, opened anew if there is none or the server closed it meanwhile."""
        if self.sock is not None:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable:  # an idle keep-alive connection is readable only when closed
                self.close()
        if self.sock is None or self.rfile is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=UPSTREAM_TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.rfile = self.sock.makefile("rb")
        return self.sock, self.rfile

    def close(self) -> None:
        if self.rfile is not None:
            self.rfile.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.rfile = None


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.proxy.serve_connection(self.request)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a client opening more connections at once (a load
    # fetching packs and ranges in parallel) had its extra SYNs dropped and retried after 1 s
    request_queue_size = 128
    proxy: FaultProxy


class FaultProxy:
    """A forwarding HTTP/1.1 proxy to ``upstream`` (``"http://127.0.0.1:PORT"``) with fault
    rules and an optional bandwidth cap (``bandwidth``: bytes per second over request and
    response bodies together, one link shared by every connection; None: unlimited; settable
    while running). Start it with :meth:`start` or ``with``; clients use :attr:`endpoint`."""

    def __init__(self, upstream: str, *, bandwidth: float | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL with a host, got {upstream!r}")
        self.upstream = upstream
        self._host, self._port = parts.hostname, parts.port or 80
        self._bucket = _Bucket()
        self.bandwidth = bandwidth
        self.endpoint = ""
        #: (method, request target, status) of every request, in arrival order; status is the
        #: one answered or forwarded (the upstream's, for a cut response), 0 for a drop
        self.log: list[tuple[str, str, int]] = []
        self._rules: list[Rule] = []
        self._stats = Stats()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 and serve in daemon threads; returns self."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="FaultProxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------------------------
    @property
    def bandwidth(self) -> float | None:
        return self._bucket.rate

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"bandwidth must be None or > 0 bytes/s, got {value!r}")
        self._bucket.rate = None if value is None else float(value)

    def add_rule(self, *, method: str | None = None, path: str | None = None,
                 query: str | None = None, action: str = "fail", status: int = 503,
                 times: int | None = 1, delay: float = 0.0, after_bytes: int = 0) -> Rule:
        """Add a rule after the existing ones and return it.

        It targets requests whose method is ``method`` (any if None), whose path (the request
        target before ``?``, percent-encoded as sent) has a match of the regex ``path``, and
        whose query string has a match of the regex ``query``; it acts on the first ``times``
        of them (None: on all). Of the rules that target a request, the first with acts left
        applies. ``action``, ``status``, ``delay`` and ``after_bytes``: see the module doc.
        """
        rule = Rule(method=method, path=path, query=query, action=action, status=status,
                    times=times, delay=delay, after_bytes=after_bytes)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @property
    def stats(self) -> Stats:
        """A snapshot of the traffic counters."""
        with self._lock:
            return Stats(Counter(self._stats.requests), self._stats.bytes_up,
                         self._stats.bytes_down)

    def reset_stats(self) -> None:
        """Zero the traffic counters (and empty :attr:`log`)."""
        with self._lock:
            self._stats = Stats()
            self.log.clear()

    def _claim(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            self._stats.requests[method] += 1
            for rule in self._rules:
                if (rule.times is None or rule.hits < rule.times) and \
                        rule.matches(method, path, query):
                    rule.hits += 1
                    return rule
        return None

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._stats.bytes_up += up
            self._stats.bytes_down += down

    def _log(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.log.append((method, target, status))

    # -- serving -----------------------------------------------------------------------------
    def serve_connection(self, client: socket.socket) -> None:
        """Serve the requests of one client connection until either side closes it."""
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.add(client)
        upstream = _Upstream(self._host, self._port)
        rfile = client.makefile("rb")
        try:
            while self._server is not None:
                if not self._one(client, rfile, upstream):
                    break
        except _Cut:
            _reset(client)
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(client)
            upstream.close()
            rfile.close()

    def _one(self, client: socket.socket, rfile: io.BufferedReader, upstream: _Upstream) -> bool:
        """Serve one request; whether the connection stays open for the next."""
        try:
            head = _read_head(rfile)
        except ValueError:
            self._answer(client, 400, b"", "HEAD", "request head too large or malformed", close=True)
            return False
        method, target, version = (head.first.split(" ") + ["", ""])[:3]
        path, _, query = target.partition("?")
        keep = not head.close and version != "HTTP/1.0"
        rule = self._claim(method, path, query)
        if rule is not None and rule.delay:
            time.sleep(rule.delay)
        if "100-continue" in head.get("expect").lower():
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the upstream's own 100 is dropped
        action = rule.action if rule is not None else "forward"
        if action == "drop":
            limit = rule.after_bytes if rule is not None and rule.after_bytes else None
            self._log(method, target, 0)
            self._body(rfile, head, None, limit=limit)
            raise _Cut
        if action == "fail":
            assert rule is not None
            self._body(rfile, head, None)
            self._log(method, target, rule.status)
            self._answer(client, rule.status, _error_xml(rule.status, path), method,
                         "injected by FaultProxy", close=not keep)
            return keep
        cut = rule.after_bytes if rule is not None and action == "reset_response" else None
        try:
            sock, ufile = upstream.connect()
        except OSError as exc:
            self._body(rfile, head, None)
            self._log(method, target, 502)
            self._answer(client, 502, _error_xml(502, path, str(exc)), method,
                         f"upstream unreachable: {exc}", close=True)
            return False
        try:
            sock.sendall(head.raw)
            self._count(up=self._body(rfile, head, sock))
        except (_Closed, ValueError) as exc:  # the client's body ended early or is malformed
            upstream.close()
            self._log(method, target, 400)
            if isinstance(exc, ValueError):
                self._answer(client, 400, _error_xml(400, path, str(exc)), method,
                             "malformed request body", close=True)
            return False
        except OSError as exc:
            upstream.close()
            self._log(method, target, 502)
            self._answer(client, 502, _error_xml(502, path, str(exc)), method,
                         f"upstream failed: {exc}", close=True)
            return False
        try:
            while True:
                got = _read_head(ufile)
                status = int(got.first.split(" ")[1])
                if status >= 200:
                    break
                if status != 100:  # other interim answers pass; a 100 was answered already
                    client.sendall(got.raw)
        except (OSError, _Closed, ValueError, IndexError) as exc:
            upstream.close()
            self._log(method, target, 502)
            self._answer(client, 502, _error_xml(502, path, str(exc)), method,
                         f"upstream failed: {exc}", close=True)
            return False
        self._log(method, target, status)
        if cut == 0:
            raise _Cut
        client.sendall(got.raw)
        if method != "HEAD" and status not in (204, 304):
            self._count(down=self._body(ufile, got, client, limit=cut, to_close=True))
        if cut is not None:
            raise _Cut
        to_end = got.length is None and not got.chunked and not (
            method == "HEAD" or status in (204, 304))
        if got.close or to_end:
            upstream.close()
            return False
        return keep

    def _body(self, src: io.BufferedReader, head: _Head, dst: socket.socket | None, *,
              limit: int | None = None, to_close: bool = False) -> int:
        """Move the body of the message ``head`` from ``src`` to ``dst`` (None: discard) in
        blocks, throttled; the payload bytes moved. ``limit``: raise :class:`_Cut` once that
        many payload bytes have passed. ``to_close``: without a length or chunking the body
        runs to the end of the connection (a response)."""
        moved = 0

        def pipe(n: int | None) -> None:
            nonlocal moved
            while n is None or n > 0:
                want = BLOCK if n is None else min(BLOCK, n)
                if limit is not None:
                    want = min(want, limit - moved)
                data = src.read(want) if n is not None else src.read1(want)
                if not data:
                    if n is None:
                        return
                    raise _Closed("connection closed inside a body")
                self._bucket.take(len(data))
                if dst is not None:
                    dst.sendall(data)
                moved += len(data)
                if n is not None:
                    n -= len(data)
                if limit is not None and moved >= limit:
                    raise _Cut

        if head.chunked:
            while True:
                line = src.readline(MAX_HEAD)
                if not line:
                    raise _Closed("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if dst is not None:
                    dst.sendall(line)
                if size == 0:
                    while True:  # trailers up to the empty line
                        line = src.readline(MAX_HEAD)
                        if not line:
                            raise _Closed("connection closed inside chunked trailers")
                        if dst is not None:
                            dst.sendall(line)
                        if line in (b"\r\n", b"\n"):
                            return moved
                pipe(size)
                crlf = src.readline(MAX_HEAD)
                if dst is not None:
                    dst.sendall(crlf)
        length = head.length
        if length is not None:
            pipe(length)
        elif to_close:
            pipe(None)
        return moved

    def _answer(self, client: socket.socket, status: int, body: bytes, method: str, note: str,
                *, close: bool) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
                 "Content-Type: application/xml", f"Content-Length: {len(body)}",
                 f"x-amz-request-id: {uuid.uuid4().hex[:16].upper()}",
                 "x-fault-proxy: " + note.encode("ascii", "backslashreplace").decode()[:200],
                 f"Connection: {'close' if close else 'keep-alive'}"]
        if status in (503, 429):
            lines.append("Retry-After: 0")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if method != "HEAD":
            data += body
        client.sendall(data)


def _error_xml(status: int, resource: str, message: str = "injected by FaultProxy") -> bytes:
    """An S3 error document for ``status``."""
    code = S3_CODES.get(status, "Error")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{_xml(message)}</Message><Resource>{_xml(resource)}"
            f"</Resource><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

