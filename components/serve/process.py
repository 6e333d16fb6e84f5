"""Start `cta serve` as a subprocess on a free loopback port and wait until it is ready.

Used by the roll-out's local backend and by tests::

    with start_server("models:/cta/3", sha256=digest, line="line-a") as server:
        requests.post(f"{server.url}/predict", data=png, headers={"Content-Type": "image/png"})

The server runs in its own session (a signal to the test runner does not reach it twice) and
logs to ``log_path`` (a temporary file unless given). ``stop()`` sends SIGTERM (uvicorn drains
requests in flight and the statistics window is written), then SIGKILL after a timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cta_model.errors import CtaError

DEFAULT_READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
_PORT_ATTEMPTS = 3


class ServerStartError(CtaError, RuntimeError):
    """The server exited or did not become ready; the message holds its log's tail."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _opener() -> urllib.request.OpenerDirector:
    # No proxy handler: an HTTP(S)_PROXY in the environment must not capture loopback calls.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ServerHandle:
    url: str
    pid: int
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    ready: dict[str, Any] = field(default_factory=dict)  # the /readyz body

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Terminate and wait; returns the exit status. Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_command(model_uri: str, port: int, **opts: Any) -> list[str]:
    """The argv of ``python -m cta_cli serve`` for these options (None values omitted;
    ``True`` flags become bare flags; names use underscores: ``max_concurrency=2``).

    The server is the `cta serve` command run by name in a new process (as the TrainJob runs
    `cta train`): this module never imports the command line above it."""
    argv = [sys.executable, "-m", "cta_cli", "serve", "--model", model_uri, "--port", str(port)]
    for name, value in opts.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv.extend([flag] if value is True else [flag, str(value)])
    return argv


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _wait_ready(handle: ServerHandle, timeout_s: float) -> dict[str, Any]:
    opener = _opener()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServerStartError(
                f"cta serve exited with {handle.process.returncode} before it was ready:\n"
                + _log_tail(handle.log_path)
            )
        try:
            with opener.open(f"{handle.url}/readyz", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    handle.stop()
    raise ServerStartError(
        f"cta serve at {handle.url} not ready within {timeout_s:.0f} s:\n"
        + _log_tail(handle.log_path)
    )


def start_server(
    model_uri: str,
    port: int | None = None,
    *,
    log_path: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
    **opts: Any,
) -> ServerHandle:
    """Start ``cta serve --model model_uri`` and return once /readyz answers 200.

    ``opts`` are ``cta serve`` options by their Python names: host, sha256, line, threshold,
    lines_config, max_concurrency, tracking_uri, stats_dir, stats_window_s, log_level, ...
    Without ``port`` a free loopback port is picked (and another one tried if it was taken in
    between).
    Raises ServerStartError (with the log's tail) when the server exits or is not ready in time.
    """
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="cta-serve-")) / "serve.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    host = opts.get("host") or "127.0.0.1"
    for attempt in itertools.count(1):
        chosen = port if port is not None else free_loopback_port()
        argv = [*serve_command(model_uri, chosen, **opts), *extra_args]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        handle = ServerHandle(f"http://{url_host}:{chosen}", process.pid, chosen, log_path, process)
        try:
            handle.ready = _wait_ready(handle, ready_timeout_s)
            return handle
        except ServerStartError:
            handle.stop()
            port_taken = "address already in use" in _log_tail(log_path)
            if port is None and port_taken and attempt < _PORT_ATTEMPTS:
                continue
            raise


__all__ = [
    "ServerHandle",
    "ServerStartError",
    "free_loopback_port",
    "serve_command",
    "start_server",
]
