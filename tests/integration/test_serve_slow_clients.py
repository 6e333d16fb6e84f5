"""Slow clients cannot starve `cta serve` (issue 18 finding 1): header and body deadlines, the
bytes of bodies being read capped, and an inference slot taken only once a body is complete.

Small deadlines (2 s) and a drip of one byte every 0.5 s keep the test to seconds; the figures
under attack are bench/load_serve.py's (slow tier)."""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from components.serve.process import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from slow_clients import SlowClients  # noqa: E402

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
SLOW_SOCKETS = 16
NORMAL_REQUESTS = 200
CLOSED = "closed by the server after its answer"


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _png() -> bytes:
    buffer = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def _timed_out(attack: SlowClients) -> int:
    return sum(count for answer, count in attack.answers.items() if " 408 " in answer)


def _read_until_closed(connection: socket.socket) -> bytes:
    """The whole answer of a connection the server closes (headers and body may arrive in
    separate segments)."""
    chunks = []
    with contextlib.suppress(OSError):  # a reset after the answer ends it too
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    # The default --max-concurrency 8: half the slow sockets would take every slot if a
    # request took one before its body was complete.
    with start_server(
        str(tiny_model_dir),
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        max_body_mb=1,
        max_reading_mb=1,
        stats_window_s=0,
    ) as handle:
        yield handle


def test_normal_requests_are_answered_while_slow_sockets_drip(server) -> None:
    body = _png()

    def client(count: int) -> list[int]:
        http = _session()
        return [
            http.post(
                f"{server.url}/predict", data=body, headers={"Content-Type": "image/png"}
            ).status_code
            for _ in range(count)
        ]

    with SlowClients(server.port, SLOW_SOCKETS, "body") as attack:
        with ThreadPoolExecutor(max_workers=4) as pool:
            codes = [
                code for batch in pool.map(client, [NORMAL_REQUESTS // 4] * 4) for code in batch
            ]
        # Every slow socket meets the body deadline at least once.
        _until(lambda: _timed_out(attack) >= SLOW_SOCKETS)
    assert codes == [200] * NORMAL_REQUESTS, sorted(set(codes))
    timed_out = _timed_out(attack)
    assert timed_out >= SLOW_SOCKETS, attack.answers
    assert attack.answers[CLOSED] == timed_out, attack.answers
    assert set(attack.answers) == {"HTTP/1.1 408 Request Timeout", CLOSED}, attack.answers
    metrics = _session().get(f"{server.url}/metrics").text
    # The server counts every 408 it sends; a socket stopped between the server's answer and
    # its own read never sees it, so up to one answer per slow socket goes unobserved.
    server_timeouts = _metric(metrics, 'cta_request_timeouts_total{stage="body"}')
    assert timed_out <= server_timeouts <= timed_out + SLOW_SOCKETS, (server_timeouts, timed_out)
    assert _metric(metrics, 'cta_requests_total{code="503"}') == 0


def test_headers_that_never_complete_are_answered_408_and_closed(server) -> None:
    with SlowClients(server.port, 4, "headers") as attack:
        _until(lambda: attack.answers[CLOSED] >= 4)
    assert set(attack.answers) == {"HTTP/1.1 408 Request Timeout", CLOSED}, attack.answers
    # A connection that sends nothing at all is closed too.
    with socket.create_connection(("127.0.0.1", server.port), timeout=3 * HEADER_TIMEOUT_S) as idle:
        assert idle.recv(4096).startswith(b"HTTP/1.1 408 ")
    metrics = _session().get(f"{server.url}/metrics").text
    assert _metric(metrics, 'cta_request_timeouts_total{stage="headers"}') >= 5


def test_bodies_being_read_are_capped_in_bytes(server) -> None:
    """Two bodies of 0.6 MB at once do not fit --max-reading-mb 1: the second is answered
    503 with Retry-After (and its connection closed) while the first is still being read."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 900000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as first:
        first.sendall(head + b"\x00" * 600_000)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as second:
            second.sendall(head)
            # The server may answer and close before it has read all of it.
            with contextlib.suppress(OSError):
                second.sendall(b"\x00" * 600_000)
            reply = _read_until_closed(second)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"retry-after: 1" in reply.lower() and b"--max-reading-mb" in reply
        # The first one was never answered 503: it meets the body deadline instead.
        assert first.recv(65536).startswith(b"HTTP/1.1 408 ")
