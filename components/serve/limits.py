"""What bounds a line server's time and memory against slow or hostile clients (issue 18).

- **Header deadline** (`header_deadline_protocol`): uvicorn's h11 protocol has no deadline for
  a request's headers (its keep-alive timeout stops at the first byte), so a client sending a
  byte every few seconds held its connection for ever. The subclass answers 408 and closes
  the connection when a request's headers are not complete ``header_timeout_s`` after the
  connection opened or the request's first byte arrived.
- **Body deadline and bytes being read** (`BodyReading`): the event loop reads a /predict
  body for at most ``body_timeout_s`` (408, connection closed), and the bodies being read at
  once hold at most ``capacity`` bytes (503 with Retry-After above it). Only a request whose
  body is complete takes an inference slot (app.py), so slow clients cannot starve the slots.
- **Decoded bytes in flight** (`DecodedBudget`): before an image is decoded, its pixel count
  (read from the header) reserves ``BYTES_PER_PIXEL`` bytes per pixel, released after its
  forward pass: the decoded images and forward passes of all requests together stay within
  ``--max-decoded-mb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from components.serve.decode import BadInput

#: Peak memory one served image pixel costs, decoded and through the forward pass (the outputs
#: and the defect score are computed at the image resolution): 145 B measured for a
#: 2290 x 2736 PNG with the tiny CTAL model (decode 13 B, inspect 132 B), rounded up.
BYTES_PER_PIXEL = 160
#: How long a request waits for room in the decoded-image budget before a 503. Long: the
#: waiters are at most --max-concurrency requests, and on a busy 2-core machine eight of the
#: largest images took 250 s to serve.
DECODED_WAIT_S = 600.0


def header_deadline_protocol(header_timeout_s: float, on_timeout: Callable[[], None]) -> type:
    """uvicorn's H11Protocol with a deadline on each request's headers; ``on_timeout`` is
    called (on the event loop) for each connection closed by it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(
        {"error": f"request headers not complete within --header-timeout-s {header_timeout_s:g}"}
    ).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()  # a request's first bytes, or still its headers
            else:
                self._disarm_header_deadline()  # headers complete (or the connection ended)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_expired)

        def _disarm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_expired(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self.transport.write(answer)
            self.transport.close()
            on_timeout()

    return HeaderDeadlineProtocol


class BodyReading:
    """Reads request bodies within a deadline, the bytes of all bodies being read capped.

    Lives on the event loop (no lock: only coroutines touch it)."""

    def __init__(self, capacity_bytes: int, timeout_s: float, max_body_bytes: int):
        self.capacity = capacity_bytes
        self.timeout_s = timeout_s
        self.max_body = max_body_bytes
        self.bytes = 0  # held by bodies being read now
        self.count = 0  # bodies being read now

    async def read(self, declared: str | None, chunks: AsyncIterator[bytes]) -> bytes:
        """The whole body, or BadInput: 413 over ``max_body`` (from Content-Length, before
        reading), 408 past the deadline, 503 when the bodies being read would hold more than
        ``capacity`` bytes."""
        if declared is not None:
            if not declared.isdigit():
                raise BadInput(400, f"Content-Length {declared!r} is not a number")
            if int(declared) > self.max_body:
                raise BadInput(
                    413, f"body of {declared} bytes exceeds the limit of {self.max_body}"
                )
        parts: list[bytes] = []
        size = 0
        self.count += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_body:
                        raise BadInput(
                            413, f"body exceeds the limit of {self.max_body} bytes", close=True
                        )
                    if self.bytes + len(chunk) > self.capacity:
                        raise BadInput(
                            503,
                            f"busy: the bodies being read hold {self.bytes} bytes, "
                            f"--max-reading-mb allows {self.capacity}",
                            close=True,
                        )
                    self.bytes += len(chunk)
                    parts.append(chunk)
        except TimeoutError:
            of = f" of {declared}" if declared is not None else ""
            raise BadInput(
                408,
                f"body not complete within --body-timeout-s {self.timeout_s:g} "
                f"({size}{of} bytes received)",
                close=True,
            ) from None
        finally:
            self.count -= 1
            self.bytes -= sum(len(part) for part in parts)
        return b"".join(parts)


class DecodedBudget:
    """A byte semaphore for decoded images and their forward passes (worker threads)."""

    def __init__(self, capacity_bytes: int, wait_s: float = DECODED_WAIT_S):
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.used = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve ``pixels`` x BYTES_PER_PIXEL for the block: BadInput 413 when that is more
        than the whole budget, 503 when no room frees within ``wait_s``."""
        need = pixels * BYTES_PER_PIXEL
        if need > self.capacity:
            raise BadInput(
                413,
                f"{pixels} pixels need ~{need >> 20} MiB decoded ({BYTES_PER_PIXEL} B/px), over "
                f"--max-decoded-mb {self.capacity >> 20}",
            )
        with self._room:
            if not self._room.wait_for(lambda: self.used + need <= self.capacity, self.wait_s):
                raise BadInput(
                    503,
                    f"busy: decoded images in flight hold {self.used >> 20} MiB of "
                    f"--max-decoded-mb {self.capacity >> 20}",
                )
            self.used += need
        try:
            yield
        finally:
            with self._room:
                self.used -= need
                self._room.notify_all()


__all__ = [
    "BYTES_PER_PIXEL",
    "BodyReading",
    "DecodedBudget",
    "header_deadline_protocol",
]
