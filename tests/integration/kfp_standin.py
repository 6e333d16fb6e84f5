"""A loopback stand-in for the KFP v2beta1 REST API that records every request.

Enough of the API for ``kfp.Client`` (2.17) to submit runs and create recurring runs:
healthz, experiments (list with a display_name filter, create), pipelines (list with a filter,
upload, upload_version, list versions), runs (create) and recurringruns (create). State lives in
memory; unknown routes answer 404 and are recorded too, so a test sees any unexpected call.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or {field: bytes} for multipart uploads
    status: int = 0


@dataclass
class KfpStandIn:
    """Run with ``with KfpStandIn() as kfp: ...``; ``kfp.url`` is the host for kfp.Client."""

    requests: list[RecordedRequest] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    def __enter__(self) -> KfpStandIn:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def calls(self) -> list[tuple[str, str]]:
        """``[(method, path), ...]`` in arrival order."""
        return [(r.method, r.path) for r in self.requests]

    def find(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # --- the API
    def handle(self, request: RecordedRequest) -> tuple[int, dict]:
        method, path = request.method, request.path
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False, "commit_sha": "standin", "tag_name": "2.5.0"}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, _listing("experiments", self.experiments.values(), request.query)
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {
                **request.body,
                "experiment_id": _new_id(),
                "created_at": _now(),
                "storage_state": "AVAILABLE",
            }
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if (method, path) == ("GET", f"{API}/pipelines"):
            return 200, _listing("pipelines", self.pipelines.values(), request.query)
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            name = request.query["name"][0]
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return 409, {"error": f"pipeline {name} exists", "code": 6}
            pipeline = {"pipeline_id": _new_id(), "display_name": name, "created_at": _now()}
            if "description" in request.query:
                pipeline["description"] = request.query["description"][0]
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self.versions[pipeline["pipeline_id"]] = []
            self._add_version(pipeline["pipeline_id"], name, request.body["uploadfile"])
            return 200, pipeline
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            pipeline_id = request.query["pipelineid"][0]
            if pipeline_id not in self.pipelines:
                return 404, {"error": f"pipeline {pipeline_id} not found", "code": 5}
            version = self._add_version(
                pipeline_id, request.query["name"][0], request.body["uploadfile"]
            )
            return 200, version
        parts = path.split("/")
        if method == "GET" and len(parts) == 6 and parts[:4] == API.split("/") + ["pipelines"]:
            pipeline_id = parts[4]
            if parts[5] == "versions" and pipeline_id in self.versions:
                return 200, {
                    "pipeline_versions": self.versions[pipeline_id],
                    "total_size": len(self.versions[pipeline_id]),
                }
        if (method, path) == ("POST", f"{API}/runs"):
            run = {**request.body, "run_id": _new_id(), "state": "PENDING", "created_at": _now()}
            self.runs[run["run_id"]] = run
            return 200, run
        if (method, path) == ("POST", f"{API}/recurringruns"):
            recurring = {
                **request.body,
                "recurring_run_id": _new_id(),
                "status": "ENABLED",
                "created_at": _now(),
            }
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        return 404, {"error": f"stand-in has no route {method} {path}", "code": 5}

    def _add_version(self, pipeline_id: str, name: str, package: bytes) -> dict:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": _new_id(),
            "display_name": name,
            "created_at": _now(),
            "package_size": len(package),
        }
        self.versions[pipeline_id].append(version)
        return version


class _Handler(BaseHTTPRequestHandler):
    owner: KfpStandIn

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Quiet: the recorded requests are the log."""

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=_parse_body(self.headers.get("Content-Type", ""), raw),
        )
        with self.owner._lock:
            status, payload = self.owner.handle(request)
            request.status = status
            self.owner.requests.append(request)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve
    do_DELETE = _serve


def _parse_body(content_type: str, raw: bytes) -> Any:
    if not raw:
        return None
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        return {
            part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()
        }
    return json.loads(raw)


def _listing(key: str, items: Any, query: dict[str, list[str]]) -> dict:
    """Items filtered by the EQUALS display_name predicate kfp.Client sends, if any."""
    selected = list(items)
    if "filter" in query:
        for predicate in json.loads(query["filter"][0]).get("predicates", []):
            assert predicate["operation"] in (1, "EQUALS"), predicate
            selected = [i for i in selected if i.get(predicate["key"]) == predicate["stringValue"]]
    if not selected:
        return {}
    return {key: selected, "total_size": len(selected)}


def _new_id() -> str:
    return str(uuid.uuid4())


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
