"""Bounded load test of `cta serve` on loopback (issue 9 item 3; `make test-load`).

Two phases against a tiny untrained model (32x32 PNGs, ResNet-18 at output stride 8):

1. **load**: 32 concurrent clients send 2,000 /predict requests (keep-alive connections, one per
   client) to a server whose --max-concurrency (64) is above the client count: throughput,
   latency p50/p95/p99 and error counts; every request should succeed.
2. **saturation**: 32 clients each send 10 requests to a server with --max-concurrency 4: the
   surplus must be answered 503 with Retry-After at once (no error, no timeout), and
   afterwards (recovery) sequential requests succeed again and /readyz stays 200.
3. **slow-client attack** (issue 18): on a server with the default limits (--max-concurrency
   8, --body-timeout-s 30), 4 clients send 200 requests unloaded, then again while 16 sockets
   send ``POST /predict`` with ``Content-Length: 100000`` one byte every 2 s (reconnecting
   whenever the server closes them): every request must be answered 200 (none 503 for lack of
   a slot); the p95 latency under attack over the unloaded p95 is the figure.

Writes ``bench/results/load_serve.json`` (or ``$BENCH_RESULTS_DIR``; quick runs with
``--quick`` / ``BENCH_QUICK=1`` use 4 clients, 100 requests, under raw/quick) and prints a
summary. Exit status 1 when an expectation fails (errors in the load phase, no 503 under
saturation, no recovery, or a request not answered 200 under the slow-client attack).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, quick, results_dir  # noqa: E402
from bench.slow_clients import SlowClients  # noqa: E402

CLIENTS = 32
REQUESTS = 2000
LOAD_MAX_CONCURRENCY = 64
# An eighth of the clients: most of a burst finds the server full.
SATURATION_DIVISOR = 8
SATURATION_REQUESTS_PER_CLIENT = 10
RECOVERY_REQUESTS = 20
IMAGE_SIZE = 32
REQUEST_TIMEOUT_S = 60.0
ATTACK_SOCKETS = 16
ATTACK_INTERVAL_S = 2.0
ATTACK_CLIENTS = 4
ATTACK_REQUESTS = 200


def _tiny_model(folder: Path) -> Path:
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import ModelSpec, build_model

    spec = ModelSpec(
        arch="ctal",
        tasks=("semseg", "height", "normals"),
        input_size=(IMAGE_SIZE, IMAGE_SIZE),
        backbone="resnet18",
        output_stride=8,
        num_classes=10,
    )
    return save_model_folder(build_model(spec), folder / "model")


def _pngs(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        buffer = io.BytesIO()
        image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(image).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies


class _Client:
    """One keep-alive connection; reconnects after a connection error."""

    def __init__(self, port: int):
        self.port = port
        self.connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int | str, float, dict[str, str]]:
        start = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S
                )
            self.connection.request(
                "POST", "/predict", body=body, headers={"Content-Type": "image/png"}
            )
            response = self.connection.getresponse()
            response.read()
            status: int | str = response.status
            headers = {k.lower(): v for k, v in response.getheaders()}
        except (OSError, http.client.HTTPException) as exc:
            if self.connection is not None:
                self.connection.close()
            self.connection = None
            status, headers = type(exc).__name__, {}
        return status, time.perf_counter() - start, headers


def _run_clients(port: int, bodies: list[bytes], clients: int, total: int) -> dict[str, Any]:
    """``clients`` threads share ``total`` requests; each result is (status, latency_s)."""
    next_index = iter(range(total))
    lock = threading.Lock()
    results: list[tuple[int | str, float, dict[str, str]]] = []

    def worker() -> None:
        client = _Client(port)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            outcome = client.post(bodies[index % len(bodies)])
            with lock:
                results.append(outcome)
                done = len(results)
            if total >= 500 and done % (total // 10) == 0:
                print(f"  {done}/{total} requests", flush=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - start
    codes = Counter(str(status) for status, _, _ in results)
    ok = np.array([latency for status, latency, _ in results if status == 200]) * 1000
    saturated = [headers for status, _, headers in results if status == 503]
    return {
        "clients": clients,
        "requests": len(results),
        "elapsed_s": round(elapsed, 3),
        "codes": dict(sorted(codes.items())),
        "ok": int(codes.get("200", 0)),
        "errors": len(results) - int(codes.get("200", 0)) - len(saturated),
        "saturated_503": len(saturated),
        "saturated_with_retry_after": sum("retry-after" in h for h in saturated),
        "throughput_ok_per_s": round(len(ok) / elapsed, 2) if elapsed else None,
        "latency_ms": (
            {f"p{q}": round(float(np.percentile(ok, q)), 2) for q in (50, 95, 99)}
            | {"max": round(float(ok.max()), 2)}
            if ok.size
            else None
        ),
    }


def _recovery(port: int, body: bytes, count: int) -> dict[str, Any]:
    client = _Client(port)
    codes = Counter(str(client.post(body)[0]) for _ in range(count))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/readyz")
    ready = connection.getresponse().status
    return {"requests": count, "codes": dict(codes), "readyz": ready}


def main(argv: list[str] | None = None) -> int:
    from components.serve.process import start_server
    from cta_model.atomic import write_bytes_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 100 requests")
    args = parser.parse_args(argv)
    small = args.quick or quick()
    clients, total = (4, 100) if small else (CLIENTS, REQUESTS)
    out_dir = results_dir() / ("raw/quick" if args.quick and not quick() else "")

    # Other work on the machine shares the cores: the load average puts the figures in context.
    load_average_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cta-load-") as scratch:
        model = _tiny_model(Path(scratch))
        bodies = _pngs(64)
        print(f"load: {clients} clients, {total} requests", flush=True)
        with start_server(
            str(model), max_concurrency=LOAD_MAX_CONCURRENCY, stats_window_s=10
        ) as server:
            _run_clients(server.port, bodies, min(clients, 4), 4 * min(clients, 4))  # warm-up
            load = _run_clients(server.port, bodies, clients, total)
        print(f"load: {json.dumps(load)}", flush=True)

        burst = clients * SATURATION_REQUESTS_PER_CLIENT
        limit = max(1, clients // SATURATION_DIVISOR)
        print(f"saturation: {clients} clients, {burst} requests, limit {limit}", flush=True)
        with start_server(str(model), max_concurrency=limit) as server:
            saturation = _run_clients(server.port, bodies, clients, burst)
            recovery = _recovery(server.port, bodies[0], RECOVERY_REQUESTS)
        print(f"saturation: {json.dumps(saturation)}", flush=True)
        print(f"recovery: {json.dumps(recovery)}", flush=True)

        attack_requests = ATTACK_REQUESTS  # --quick too: its p95 is the figure this phase gives
        print(f"attack: {ATTACK_SOCKETS} slow sockets, {attack_requests} requests", flush=True)
        with start_server(str(model), stats_window_s=10) as server:
            _run_clients(server.port, bodies, ATTACK_CLIENTS, 4 * ATTACK_CLIENTS)  # warm-up
            unloaded = _run_clients(server.port, bodies, ATTACK_CLIENTS, attack_requests)
            with SlowClients(
                server.port, ATTACK_SOCKETS, "body", interval_s=ATTACK_INTERVAL_S
            ) as slow:
                time.sleep(2 * ATTACK_INTERVAL_S)  # every slow socket is in its body
                attacked = _run_clients(server.port, bodies, ATTACK_CLIENTS, attack_requests)
            slow_answers = dict(slow.answers)
        p95_ratio = (
            round(attacked["latency_ms"]["p95"] / unloaded["latency_ms"]["p95"], 2)
            if attacked["latency_ms"] and unloaded["latency_ms"]
            else None
        )
        attack = {
            "slow_sockets": ATTACK_SOCKETS,
            "byte_every_s": ATTACK_INTERVAL_S,
            "unloaded": unloaded,
            "under_attack": attacked,
            "slow_socket_answers": slow_answers,
            "p95_ratio_attack_over_unloaded": p95_ratio,
        }
        print(f"attack: {json.dumps(attack)}", flush=True)
        print(f"attack: p95 under attack / unloaded p95 = {p95_ratio}", flush=True)

    checks = {
        "load_all_ok": load["ok"] == load["requests"] == total,
        "saturation_answered_503": saturation["saturated_503"] > 0
        and saturation["saturated_with_retry_after"] == saturation["saturated_503"],
        "saturation_no_errors": saturation["errors"] == 0,
        "recovered": recovery["codes"] == {"200": RECOVERY_REQUESTS} and recovery["readyz"] == 200,
        "attack_all_ok": attacked["ok"] == attacked["requests"] == attack_requests,
    }
    result = {
        "benchmark": "load_serve",
        "machine": machine(),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_average_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": f"ctal resnet18 os8, {IMAGE_SIZE}x{IMAGE_SIZE} PNG, untrained",
        "load": {**load, "max_concurrency": LOAD_MAX_CONCURRENCY},
        "saturation": {**saturation, "max_concurrency": limit},
        "recovery": recovery,
        "attack": attack,
        "checks": checks,
        "passed": all(checks.values()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "load_serve.json"
    path = write_bytes_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}; checks {checks}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
