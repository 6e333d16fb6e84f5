"""Slow-client attackers for `cta serve` (issue 18 finding 1), shared by the integration test
(tests/integration/test_serve_slow_clients.py) and the benchmark (bench/load_serve.py --attack).

``SlowClients(port, count, stage="body")`` runs ``count`` sockets, each in its own thread:
``stage="body"`` sends complete ``POST /predict`` headers with ``Content-Length: 100000`` and
then one body byte every ``interval_s``; ``stage="headers"`` sends a request line and then one
header byte every ``interval_s``. Whenever the server answers (or closes) a socket, its status
line is recorded (and whether the server then closed the connection) and the socket
reconnects, so the attack lasts until ``stop()``.
"""

from __future__ import annotations

import select
import socket
import threading
from collections import Counter

DECLARED_BYTES = 100_000


class SlowClients:
    def __init__(self, port: int, count: int, stage: str = "body", interval_s: float = 0.5):
        if stage not in ("body", "headers"):
            raise ValueError(f"stage is body or headers, not {stage!r}")
        self.port = port
        self.stage = stage
        self.interval_s = interval_s
        self.answers: Counter[str] = Counter()  # status line (or "closed") -> count
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._attack, name=f"slow-{stage}-{i}", daemon=True)
            for i in range(count)
        ]

    def __enter__(self) -> SlowClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _opening(self) -> bytes:
        if self.stage == "headers":
            return b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        return (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: " + str(DECLARED_BYTES).encode() + b"\r\n\r\n"
        )

    def _record(self, answer: str) -> None:
        with self._lock:
            self.answers[answer] += 1

    @staticmethod
    def _closed_by_server(sock: socket.socket, wait_s: float = 5.0) -> bool:
        """Whether the server closes the connection (EOF) within ``wait_s`` of answering."""
        sock.settimeout(wait_s)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            return True  # closed with our unread drip bytes in its buffer: a reset
        except OSError:
            return False
        return True

    def _attack(self) -> None:
        drip = b"X" if self.stage == "headers" else b"\x00"
        while not self._stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                self._stop.wait(self.interval_s)
                continue
            with self._lock:
                self.connections += 1
            try:
                sock.sendall(self._opening())
                while not self._stop.is_set():
                    readable, _, _ = select.select([sock], [], [], self.interval_s)
                    if readable:
                        reply = sock.recv(4096)
                        self._record(reply.split(b"\r\n", 1)[0].decode() if reply else "closed")
                        if reply and self._closed_by_server(sock):
                            self._record("closed by the server after its answer")
                        break
                    sock.sendall(drip)
            except OSError:
                self._record("closed")
            finally:
                sock.close()


__all__ = ["DECLARED_BYTES", "SlowClients"]
