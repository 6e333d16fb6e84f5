"""Local backend: one ``cta serve`` process per line and role on a free loopback port.

Servers outlive the ``cta rollout`` command that started them (they are the line's service);
their pid and port are recorded in the state store, and they are stopped by pid on rollback,
on promotion (the model they served was replaced) and by ``cta rollout stop-all``. Before a
signal is sent the pid's command line is checked to be a ``cta serve`` process, so a recycled
pid of another program is never touched. In live mode the previous server keeps running as a
standby until health passes, so a rollback is a switch back, not a cold start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from components.rollout.backends import ModelRef, deployment_record, model_of

STOP_TIMEOUT_S = 15.0


def is_serve_process(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "\nState:\tZ" in state:
        return False
    # `python -m cta_cli serve --model ...` (start_server) or `cta serve --model ...`.
    return b"--model" in argv and any(arg.endswith(b"serve") for arg in argv)


def stop_pid(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM a ``cta serve`` process, SIGKILL it after ``timeout_s``; False if none ran."""
    if not is_serve_process(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_serve_process(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    # Our own child turns into a zombie until waited for.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class LocalBackend:
    name = "local"

    def __init__(
        self,
        tracking_uri: str | None = None,
        log_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        lines_config: str | Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.log_dir = Path(log_dir).absolute() if log_dir else None
        self.host = host
        # The servers' fleet inventory (their --line resolution rule); None: configs/lines.yaml.
        self.lines_config = str(Path(lines_config).absolute()) if lines_config else None

    def _start(self, line_id: str, model: ModelRef, role: str) -> dict[str, Any]:
        from components.serve.process import start_server

        print(f"[rollout] {line_id}: starting cta serve for {model.uri} ({role})", flush=True)
        # models:/NAME/<version> with --line: the server applies the threshold that version's
        # evaluation.json records for this line (components/serve/inspection.py).
        options: dict[str, Any] = {"sha256": model.sha256, "line": line_id, "host": self.host}
        if self.tracking_uri:
            options["tracking_uri"] = self.tracking_uri
        if self.lines_config:
            options["lines_config"] = self.lines_config
        log_path = None
        if self.log_dir is not None:
            log_path = self.log_dir / f"{line_id}-{role}-v{model.version}-{time.time_ns()}.log"
        handle = start_server(model.uri, log_path=log_path, **options)
        return deployment_record(
            role,
            model,
            handle.url,
            pid=handle.pid,
            port=handle.port,
            log_path=str(handle.log_path),
            backend=self.name,
        )

    def deploy_shadow(self, line_id: str, model: ModelRef) -> dict[str, Any]:
        return self._start(line_id, model, "shadow")

    def deploy_live(
        self, line_id: str, model: ModelRef, previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        return self._start(line_id, model, "live")

    def finish_promotion(
        self, line_id: str, candidate: dict[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        if previous is not None and previous.get("pid") != candidate.get("pid"):
            self.stop(previous)
        return {**candidate, "role": "live"}

    def roll_back(
        self, line_id: str, candidate: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if candidate is not None:
            self.stop(candidate)
        if previous is None:
            return None
        if self.is_running(previous):
            return previous
        # The previous server was retired at promotion (a manual rollback later): start it again.
        return self._start(line_id, model_of(previous), "live")

    def is_running(self, deployment: dict[str, Any]) -> bool:
        pid = deployment.get("pid")
        return isinstance(pid, int) and is_serve_process(pid)

    def stop(self, deployment: dict[str, Any]) -> bool:
        pid = deployment.get("pid")
        if not isinstance(pid, int):
            return False
        stopped = stop_pid(pid)
        if stopped:
            print(f"[rollout] stopped cta serve pid {pid} ({deployment.get('model_uri')})")
        return stopped
