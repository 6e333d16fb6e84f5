"""Faults survived (issue 9): S3 throttling and dropped connections, a full disk.

The S3 tests put a fault-injecting proxy (tests/integration/fault_proxy.py) in front of the
session's moto server: each distinct request first gets 503 SlowDown, then a dropped
connection, then reaches S3. With retries bounded at 1 attempt the same calls fail, so the
passing runs prove the retry configuration, not luck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fault_proxy import fault_proxy
from test_dvc import DVC, _git_dvc_repo, _isolated_env, _run, _tree_digest

from components import storage
from cta_model.data.synthetic_dataset import generate_dataset

pytestmark = pytest.mark.integration


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for index in range(3):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / "sub" / f"file-{index}.bin").write_bytes(os.urandom(1000 + index))
    (root / "manifest.parquet").write_bytes(b"manifest")
    return root


def test_upload_and_download_survive_slowdown_and_dropped_connections(
    moto_s3, s3_bucket: str, small_tree: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("CTA_S3_MAX_ATTEMPTS", "4")
    with fault_proxy(moto_s3.endpoint_url) as (endpoint, log):
        uri = f"s3://{s3_bucket}/faulty"
        storage.upload_tree(small_tree, uri, endpoint_url=endpoint)
        storage.download_tree(uri, tmp_path / "back", endpoint_url=endpoint)
        assert storage.read_bytes(f"{uri}/manifest.parquet", endpoint_url=endpoint) == b"manifest"
    assert _tree_digest(tmp_path / "back") == _tree_digest(small_tree)
    assert log.slow_downs >= 4 and log.drops >= 4  # every object met both faults
    assert min(log.attempts.values()) >= 3  # each request got through on a retry


def test_without_retries_the_same_faults_fail_naming_the_object(
    moto_s3, s3_bucket: str, monkeypatch
):
    moto_s3.client().put_object(Bucket=s3_bucket, Key="one.bin", Body=b"x")
    monkeypatch.setenv("CTA_S3_MAX_ATTEMPTS", "1")
    with (
        fault_proxy(moto_s3.endpoint_url) as (endpoint, _log),
        pytest.raises(OSError, match=f"s3://{s3_bucket}/one.bin"),
    ):
        storage.read_bytes(f"s3://{s3_bucket}/one.bin", endpoint_url=endpoint)


def test_dvc_push_and_pull_survive_slowdown_and_dropped_connections(
    tmp_path: Path, moto_s3, s3_bucket: str
):
    env = _isolated_env(tmp_path / "home")
    repo = _git_dvc_repo(tmp_path / "repo", env)
    data = generate_dataset(
        repo / "data" / "synthetic",
        n_lines=1,
        samples_per_line=1,
        height=16,
        width=16,
        seed=0,
        progress=False,
    )
    expected = _tree_digest(data)
    _run([DVC, "add", "data/synthetic"], repo, env)
    with fault_proxy(moto_s3.endpoint_url) as (endpoint, log):
        _run([DVC, "remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvc"], repo, env)
        _run([DVC, "remote", "modify", "storage", "endpointurl", endpoint], repo, env)
        _run([DVC, "push"], repo, env)
        shutil.rmtree(data)
        shutil.rmtree(repo / ".dvc" / "cache")
        _run([DVC, "pull"], repo, env)
    assert _tree_digest(data) == expected
    assert log.slow_downs > 0 and log.drops > 0


_WRITER = textwrap.dedent(
    """
    import json, resource, signal, sys
    # Without this the kernel kills the process with SIGXFSZ instead of failing the write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from cta_model.atomic import write_bytes_atomic
    try:
        write_bytes_atomic(sys.argv[1], b"x" * (limit * 4))
    except OSError as exc:
        print(json.dumps({"errno": exc.errno, "message": str(exc)}))
        sys.exit(3)
    """
)


def test_disk_full_leaves_the_previous_artefact_byte_identical(tmp_path: Path):
    target = tmp_path / "evaluation.json"
    previous = json.dumps({"version": 1, "metric": 0.5}).encode()
    target.write_bytes(previous)
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(target), "4096"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 3, done.stderr
    failure = json.loads(done.stdout.strip().splitlines()[-1])
    assert failure["errno"] == 27  # EFBIG: a real write refused by the kernel
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]  # no temporary left
