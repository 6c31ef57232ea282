"""deltackpt.testing.httpproxy.FaultProxy: byte-exact forwarding (a stdlib echo server sees
exactly what the client sent; obstore's GET/PUT/HEAD/multipart through it to moto), each
action, rule order and counts, and the bandwidth cap."""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

from deltackpt.testing.httpproxy import FaultProxy


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it received (JSON); ``/bytes/N``, ``/chunked/N`` and
    ``/close/N`` answer N deterministic bytes framed by length, chunks, or the connection's
    end."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        kind, _, n = self.path.strip("/").partition("/")
        if kind in ("bytes", "chunked", "close") and n.isdigit():
            data = _payload(int(n))
            self.send_response(200)
            if kind == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(data), 7000):
                    part = data[i:i + 7000]
                    self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
                return
            if kind == "close":
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        doc = json.dumps({"method": self.command, "path": self.path,
                          "headers": list(self.headers.items()),
                          "sha": hashlib.sha256(body).hexdigest(), "len": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(doc)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(doc)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve


def _payload(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo: str) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as p:
        yield p


def _conn(p: FaultProxy) -> http.client.HTTPConnection:
    host, port = p.endpoint.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def test_forwards_head_and_body_unchanged(proxy: FaultProxy) -> None:
    body = os.urandom(300_000)
    c = _conn(proxy)
    c.putrequest("PUT", "/b%2Fk/x%20y?partNumber=2&uploadId=a%2Bb", skip_host=True,
                 skip_accept_encoding=True)
    c.putheader("Host", "bucket.example.com:1234")     # SigV4 signs Host: it must pass as sent
    c.putheader("X-Amz-Date", "20260101T000000Z")
    c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    got = json.loads(c.getresponse().read())
    assert got["path"] == "/b%2Fk/x%20y?partNumber=2&uploadId=a%2Bb"
    assert got["headers"][:2] == [["Host", "bucket.example.com:1234"],
                                  ["X-Amz-Date", "20260101T000000Z"]]
    assert got["len"] == len(body) and got["sha"] == hashlib.sha256(body).hexdigest()
    c.request("GET", "/again")                          # the same keep-alive connection
    assert json.loads(c.getresponse().read())["method"] == "GET"
    c.close()
    assert proxy.stats.requests == {"PUT": 1, "GET": 1}
    assert proxy.stats.bytes_up == len(body)
    assert proxy.log[0] == ("PUT", "/b%2Fk/x%20y?partNumber=2&uploadId=a%2Bb", 200)


def test_chunked_request_and_response(proxy: FaultProxy) -> None:
    body = os.urandom(200_000)
    c = _conn(proxy)
    c.request("PUT", "/chunked-up", body=iter([body[:70_000], body[70_000:]]),
              headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    got = json.loads(c.getresponse().read())
    assert got["len"] == len(body) and got["sha"] == hashlib.sha256(body).hexdigest()
    assert ["Transfer-Encoding", "chunked"] in got["headers"]
    c.request("GET", "/chunked/100000")                 # chunk extensions and trailers pass
    r = c.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.read() == _payload(100_000)
    c.request("HEAD", "/bytes/5000")                    # HEAD: a length, no body
    r = c.getresponse()
    assert r.getheader("Content-Length") == "5000" and r.read() == b""
    c.request("GET", "/bytes/70000")                    # keep-alive survives all of the above
    assert c.getresponse().read() == _payload(70_000)
    c.request("GET", "/close/50000")                    # a body up to the connection's end
    assert c.getresponse().read() == _payload(50_000)
    c.close()
    assert proxy.stats.bytes_up == len(body)
    assert proxy.stats.bytes_down >= 220_000


def test_actions(proxy: FaultProxy) -> None:
    fail = proxy.add_rule(method="put", path=r"^/obj", query=r"partNumber=3", status=412)
    c = _conn(proxy)
    c.request("PUT", "/obj?partNumber=3", body=b"x" * 1000)
    r = c.getresponse()
    assert r.status == 412 and b"<Code>PreconditionFailed</Code>" in r.read()
    c.request("PUT", "/obj?partNumber=3", body=b"x")   # times=1: spent, forwarded
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["len"] == 1 and fail.hits == 1

    proxy.add_rule(method="HEAD", status=404)
    c.request("HEAD", "/obj")
    r = c.getresponse()
    assert r.status == 404 and r.read() == b""

    delay = proxy.add_rule(path="/slow", action="delay", delay=0.3)
    t = time.monotonic()
    c.request("GET", "/slow")
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["path"] == "/slow"
    assert time.monotonic() - t >= 0.3 and delay.hits == 1

    proxy.add_rule(path="/drop", action="drop")
    c.request("GET", "/drop")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        c.getresponse()
    c.close()

    mid = proxy.add_rule(path="/mid", action="drop", after_bytes=100_000)
    c = _conn(proxy)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        c.request("PUT", "/mid", body=os.urandom(4 << 20))
        c.getresponse()
    c.close()
    assert mid.hits == 1 and ("PUT", "/mid", 0) in proxy.log

    cut = proxy.add_rule(path="/bytes/", action="reset_response", after_bytes=10_000)
    c = _conn(proxy)
    c.request("GET", "/bytes/300000")
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises((ConnectionError, http.client.IncompleteRead)):
        r.read()
    c.close()
    assert cut.hits == 1

    lost = proxy.add_rule(method="PUT", path="/applied", action="reset_response")
    c = _conn(proxy)
    c.request("PUT", "/applied", body=b"abc")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        c.getresponse()
    c.close()
    assert lost.hits == 1 and ("PUT", "/applied", 200) in proxy.log   # the upstream answered


def test_rule_order_times_and_clear(proxy: FaultProxy) -> None:
    first = proxy.add_rule(method="GET", status=500, times=2)
    always = proxy.add_rule(method="GET", status=503, times=None)
    c = _conn(proxy)
    codes = []
    for _ in range(4):
        c.request("GET", "/x")
        r = c.getresponse()
        r.read()
        codes.append(r.status)
    assert codes == [500, 500, 503, 503]
    assert (first.hits, always.hits) == (2, 2)
    proxy.clear()
    c.request("GET", "/x")
    r = c.getresponse()
    assert r.status == 200 and r.read()
    c.close()
    with pytest.raises(ValueError):
        proxy.add_rule(action="explode")
    proxy.reset_stats()
    assert proxy.stats.requests == {} and proxy.log == []


def test_bandwidth_cap(proxy: FaultProxy) -> None:
    up = os.urandom(1 << 20)
    c = _conn(proxy)
    c.request("GET", "/bytes/1000")                     # warm: connect outside the timing
    c.getresponse().read()
    proxy.bandwidth = 4e6                               # 1 MiB up + 1 MiB down at 4 MB/s
    t = time.monotonic()
    c.request("PUT", "/up", body=up)
    c.getresponse().read()
    c.request("GET", f"/bytes/{1 << 20}")
    assert c.getresponse().read() == _payload(1 << 20)
    took = time.monotonic() - t
    assert took >= 0.95 * (2 << 20) / 4e6, took        # >= 0.5 s: the cap holds
    proxy.bandwidth = None                              # lifted while running
    t = time.monotonic()
    c.request("GET", f"/bytes/{4 << 20}")
    assert c.getresponse().read() == _payload(4 << 20)
    assert time.monotonic() - t < 1.0
    c.close()


def test_shared_link_and_stop(echo: str) -> None:
    """Two connections at once share one cap; stop() closes connections in use."""
    with FaultProxy(echo, bandwidth=4e6) as p:
        took: list[float] = []

        def get() -> None:
            c = _conn(p)
            t = time.monotonic()
            c.request("GET", f"/bytes/{1 << 20}")
            assert c.getresponse().read() == _payload(1 << 20)
            took.append(time.monotonic() - t)
            c.close()

        threads = [threading.Thread(target=get) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(took) >= 0.95 * (2 << 20) / 4e6, took
        p.bandwidth = None
        idle = _conn(p)
        idle.request("GET", "/bytes/10")
        assert idle.getresponse().read() == _payload(10)
    assert idle.sock is not None
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b""                     # the kept-alive connection: closed
    idle.close()


def test_many_connections_at_once_are_all_accepted(echo: str) -> None:
    """A client opening many connections at once (a load fetching packs and ranges in
    parallel) gets every one: none waits for a dropped SYN to be resent (1 s later; a listen
    backlog of 5 did that), so a connect timeout well under 1 s never fires."""
    import socket

    with FaultProxy(echo) as p:
        host, port = p.endpoint.removeprefix("http://").split(":")
        barrier = threading.Barrier(48)
        failed: list[BaseException] = []

        def connect() -> None:
            barrier.wait()
            try:
                with socket.create_connection((host, int(port)), timeout=0.9) as sock:
                    sock.sendall(b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    sock.settimeout(30)
                    assert sock.recv(12).startswith(b"HTTP/1.")
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        threads = [threading.Thread(target=connect) for _ in range(48)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failed, failed[:3]


# -- obstore through the proxy to moto ---------------------------------------------------------

obstore = pytest.importorskip("obstore", reason="needs obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="needs moto's server: pip install 'moto[server]'")

import _s3server  # noqa: E402
from _s3server import S3Server  # noqa: E402

from deltackpt.errors import StorageError  # noqa: E402
from deltackpt.store.objectstore import ObjectStoreBackend  # noqa: E402

s3_server = _s3server.s3_server


@pytest.fixture
def s3proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def _backend(s3_server: S3Server, p: FaultProxy, name: str) -> ObjectStoreBackend:
    return ObjectStoreBackend.from_url(s3_server.url(name), s3_server.options_via(p.endpoint),
                                       part_size=5 << 20)


def test_obstore_pass_through_byte_exact(s3_server: S3Server, s3proxy: FaultProxy) -> None:
    b = _backend(s3_server, s3proxy, "px")
    small, big = os.urandom(1000), os.urandom(12 << 20)
    b.write_atomic("small", small)
    b.write_new("new", small)
    s = b.create_stream("packs/big")                    # multipart: 3 parts, then the POST
    for i in range(0, len(big), 1 << 20):
        s.write(big[i:i + (1 << 20)])
    s.commit()
    assert b.read("small") == small and b.read("new") == small
    assert b.read("packs/big") == big
    assert b.read_range("packs/big", 5 << 20, 100_000) == big[5 << 20:(5 << 20) + 100_000]
    assert b.size("packs/big") == len(big) and b.exists("small")
    assert b.list("") == ["new", "small"] and b.list_dirs("") == ["packs"]
    b.delete("small")
    assert not b.exists("small")
    stats = s3proxy.stats
    posts = [t.rsplit("?", 1)[-1][:8] for m, t, _s in s3proxy.log if m == "POST"]
    assert posts == ["uploads=", "uploadId", "delete"]  # create, complete; a bulk delete
    assert stats.requests["PUT"] == 2 + 3 and stats.requests["HEAD"] >= 2
    assert stats.bytes_up >= len(big) + 2 * len(small)
    assert stats.bytes_down >= len(big) + 100_000
    assert all(status < 300 for _m, _t, status in s3proxy.log if _m != "HEAD")


def test_obstore_sees_each_action(s3_server: S3Server, s3proxy: FaultProxy) -> None:
    b = _backend(s3_server, s3proxy, "pxa")
    data = os.urandom(3 << 20)
    b.write_atomic("obj", data)
    transient = s3proxy.add_rule(method="GET", status=503, times=2)
    assert b.read("obj") == data and transient.hits == 2          # retried by obstore
    cut = s3proxy.add_rule(method="GET", action="reset_response", after_bytes=100_000)
    assert b.read("obj") == data and cut.hits == 1                # a cut body is fetched again
    drop = s3proxy.add_rule(method="PUT", action="drop", after_bytes=500_000)
    b.write_atomic("obj2", data)
    assert drop.hits == 1 and b.read("obj2") == data
    denied = s3proxy.add_rule(method="GET", path="/obj$", status=403, times=None)
    with pytest.raises(StorageError) as err:
        b.read("obj")
    assert err.value.key == "obj" and denied.hits == 1            # a 403 is not retried
    s3proxy.clear()
    s3proxy.add_rule(method="HEAD", status=404)
    assert not b.exists("obj")                                    # a 404 is "absent"
    lost = s3proxy.add_rule(method="PUT", path="/created$", action="reset_response")
    with pytest.raises(StorageError):
        b.write_new("created", b"x")                              # applied, answer lost
    assert lost.hits == 1 and b.read("created") == b"x"
    s3proxy.bandwidth = 8e6
    t = time.monotonic()
    assert b.read("obj") == data
    assert time.monotonic() - t >= 0.95 * len(data) / 8e6
