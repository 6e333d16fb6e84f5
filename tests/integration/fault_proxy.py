"""A loopback HTTP proxy that injects S3 faults in front of a real (moto) S3 server.

Every distinct request (method, path, query, Range) is answered by a fault schedule before it
is forwarded: by default the first attempt gets ``503 SlowDown`` (S3's throttling reply) and
the second has its connection dropped without a response; the third and later attempts reach
the server. A client without retries therefore fails, one with bounded retries succeeds, which
is what the tests prove.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class FaultLog:
    attempts: Counter = field(default_factory=Counter)
    slow_downs: int = 0
    drops: int = 0
    forwarded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(upstream: str, schedule: Sequence[str], log: FaultLog) -> type:
    target = urlparse(upstream)

    class FaultInjectingHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            body = self._body()
            key = (self.command, self.path, self.headers.get("Range"))
            with log.lock:
                attempt = log.attempts[key]
                log.attempts[key] += 1
            fault = schedule[attempt] if attempt < len(schedule) else "forward"
            if fault == "slowdown":
                with log.lock:
                    log.slow_downs += 1
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN_BODY)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN_BODY)
                return
            if fault == "drop":
                with log.lock:
                    log.drops += 1
                self.close_connection = True
                self.connection.close()
                return
            self._forward(body)

        def _forward(self, body: bytes) -> None:
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            # A HEAD reply carries the object's length, not that of its (empty) body.
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            connection.close()
            with log.lock:
                log.forwarded += 1

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return FaultInjectingHandler


@contextmanager
def fault_proxy(
    upstream: str, schedule: Sequence[str] = ("slowdown", "drop")
) -> Iterator[tuple[str, FaultLog]]:
    """(proxy endpoint URL, its FaultLog) while the proxy runs on a free loopback port."""
    log = FaultLog()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, schedule, log))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
