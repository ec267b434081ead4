"""A fault-injecting HTTP proxy in front of the local S3 server (tests only; 127.0.0.1, seeded, bounded).

    with S3FaultProxy(upstream="http://127.0.0.1:5000") as proxy:     # rate 0: a plain relay
        proxy.configure(rate=0.08, seed=0)                    # from now on 8% of requests fail
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint      # clients talk to the proxy
        ...
    proxy.stats   # {"requests": 812, "faults": 63, "500": 15, "503": 17, "reset_before": 12, ...}

For a `rate` share of requests (decided by a seeded RNG, in arrival order) it answers like a sick S3:
- "500"          : 500 InternalError before the request reaches the server
- "503"          : 503 SlowDown (throttling) before the request reaches the server
- "reset_before" : the connection is reset (TCP RST) without an answer
- "reset_mid"    : GET only: the server answers, the client gets the headers and half the body, then a reset
- "delay"        : the answer comes `delay_s` late (a slow node / congested link)
Faults that stop a request before the server sees it are used for writes, so a retried PUT or multipart
step repeats nothing the server applied; reads may also fail after the server answered (reset_mid).

Bounds: at most `max_consecutive` faults in a row on one object (below the clients' retry attempts, so
random faults are survivable by design), at most `max_faults` in all, and the server stops by itself
after `lifetime_s`. `fail_first={"clip-3.wav": 3}` answers 503 SlowDown to the first 3 requests whose path
(with query) contains that string, to test what happens when a client's retries run out. `deny` answers permanent errors:
{"credentials": "AKIA..."} -> 403 InvalidAccessKeyId for other access keys, {"prefix": "bucket/key"} ->
403 AccessDenied for keys under it.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset_before", "reset_mid", "delay")
ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
          "503": ("SlowDown", "Please reduce your request rate."),
          "denied": ("AccessDenied", "Access Denied"),
          "bad_key": ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")}
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect"}  # 100-continue is answered here; the body is sent on whole


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a killed node, a reset we injected) is normal here, not a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class S3FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, lifetime_s: float = 3600, **settings):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.lifetime_s = lifetime_s
        self.lock = threading.Lock()
        self.configure(rate=rate, seed=seed, **settings)
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads: list[threading.Thread] = []

    def configure(self, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS, delay_s: float = 0.3,
                  max_consecutive: int = 2, max_faults: int = 10_000, fail_first: dict[str, int] | None = None,
                  deny: dict[str, str] | None = None) -> "S3FaultProxy":
        """(Re)set the fault plan and zero the counters; the session's proxy starts with rate 0 (a plain relay)."""
        with self.lock:
            self.rate, self.kinds, self.delay_s = rate, kinds, delay_s
            self.max_consecutive, self.max_faults = max_consecutive, max_faults
            self.fail_first = dict(fail_first or {})
            self.deny = dict(deny or {})
            self.rng = random.Random(seed)
            self.stats: Counter = Counter()
            self.streak: Counter = Counter()  # object path -> faults in a row
        return self

    # --- lifecycle ---
    def start(self) -> "S3FaultProxy":
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        timer = threading.Timer(self.lifetime_s, self.stop)  # never outlives a hung test
        timer.daemon = True
        self._threads = [serve, timer]
        serve.start()
        timer.start()
        return self

    def stop(self) -> None:
        """Idempotent: the lifetime timer and the owner may both call it."""
        for thread in self._threads:
            if isinstance(thread, threading.Timer):
                thread.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "S3FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def faults(self) -> int:
        return sum(self.stats[k] for k in KINDS)

    # --- decisions ---
    def decide(self, method: str, path: str, headers) -> str | None:
        """The fault for this request (None: forward it untouched). Thread-safe, seeded by arrival order."""
        with self.lock:
            self.stats["requests"] += 1
            denied = self._denied(path, headers)
            if denied:
                self.stats[denied] += 1
                return denied
            for name, left in self.fail_first.items():
                if name in path and left > 0:
                    self.fail_first[name] = left - 1
                    self.stats["503"] += 1
                    self.stats["fail_first"] += 1
                    return "503"
            key = path.split("?")[0]
            draw, kind = self.rng.random(), self.rng.choice(self.kinds)
            if draw >= self.rate or self.faults >= self.max_faults or self.streak[key] >= self.max_consecutive:
                self.streak[key] = 0
                return None
            if kind == "reset_mid" and method != "GET":
                kind = "reset_before"
            self.streak[key] += 1
            self.stats[kind] += 1
            return kind

    def _denied(self, path: str, headers) -> str | None:
        if "credentials" in self.deny:
            auth = headers.get("Authorization") or ""
            if f"Credential={self.deny['credentials']}/" not in auth:
                return "bad_key"
        if "prefix" in self.deny and path.lstrip("/").startswith(self.deny["prefix"]):
            return "denied"
        return None

    # --- the request handler ---
    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _error(self, kind: str) -> None:
                code, message = ERRORS[kind]
                status = {"500": 500, "503": 503}.get(kind, 403)
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                kind = proxy.decide(self.command, self.path, self.headers)
                if kind in ("500", "503", "denied", "bad_key"):
                    return self._error(kind)
                if kind == "reset_before":
                    return self._reset()
                if kind == "delay":
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for k, v in answer.getheaders():
                        if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else len(data)
                    self.send_header("Content-Length", str(length or 0))  # HEAD: the object's size
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if kind == "reset_mid" and len(data) > 1:
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        return self._reset()
                    self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
