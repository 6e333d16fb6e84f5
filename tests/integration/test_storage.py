"""components.storage against a real S3 server (moto on loopback)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from components.storage import (
    S3Opener,
    download_tree,
    is_remote,
    make_s3_client,
    opener_for,
    read_bytes,
    upload_tree,
    write_bytes_atomic,
)
from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, LocalOpener
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.integration

PREFIX = "datasets/toy"


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "data"
    return generate_dataset(
        root, n_lines=2, samples_per_line=6, height=32, width=32, seed=0, progress=False
    )


@pytest.fixture
def s3_dataset(local_dataset: Path, s3_bucket: str, moto_s3) -> str:
    uri = f"s3://{s3_bucket}/{PREFIX}"
    upload_tree(local_dataset, uri, endpoint_url=moto_s3.endpoint_url)
    return uri


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _assert_same_samples(remote: LineDataset, local: LineDataset) -> None:
    assert len(remote) == len(local) > 0
    assert remote.sample_ids == local.sample_ids
    for index in range(len(local)):
        remote_item, local_item = remote[index], local[index]
        assert remote_item.keys() == local_item.keys()
        for name, expected in local_item.items():
            actual = remote_item[name]
            if isinstance(expected, np.ndarray):
                assert actual.dtype == expected.dtype, name
                # NaNs (sensor drop-out in height) compare equal here.
                np.testing.assert_array_equal(actual, expected, err_msg=name, strict=True)
            else:
                assert actual == expected, name


def test_line_dataset_reads_the_same_from_s3(local_dataset: Path, s3_dataset: str, moto_s3):
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    remote = LineDataset(s3_dataset, opener=opener, include_clean=True)
    local = LineDataset(local_dataset, include_clean=True)
    assert remote.location == s3_dataset
    _assert_same_samples(remote, local)
    assert remote.read_features().equals(local.read_features())


def test_upload_then_download_is_byte_identical(
    local_dataset: Path, s3_dataset: str, moto_s3, tmp_path: Path
):
    copied = download_tree(s3_dataset, tmp_path / "copy", endpoint_url=moto_s3.endpoint_url)
    assert copied == sorted(_tree_digest(local_dataset))
    assert _tree_digest(tmp_path / "copy") == _tree_digest(local_dataset)


def test_upload_puts_the_manifest_last(local_dataset: Path, s3_bucket: str, moto_s3):
    order = upload_tree(
        local_dataset, f"s3://{s3_bucket}/ordered", endpoint_url=moto_s3.endpoint_url
    )
    assert order[-1] == MANIFEST_NAME
    assert len(order) == len(_tree_digest(local_dataset))


def test_corrupted_object_fails_the_checksum_naming_the_file(s3_dataset: str, moto_s3):
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    dataset = LineDataset(s3_dataset, opener=opener)
    image_path = dataset.rows[0]["image_path"]
    write_bytes_atomic(
        f"{s3_dataset}/{image_path}", b"\x89PNG not the original", endpoint_url=moto_s3.endpoint_url
    )
    with pytest.raises(DataError, match="sha256 mismatch") as caught:
        dataset[0]
    assert f"{s3_dataset}/{image_path}" in str(caught.value)


def test_missing_object_names_the_s3_uri(s3_dataset: str, moto_s3):
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    dataset = LineDataset(s3_dataset, opener=opener)
    semseg_path = next(row["semseg_path"] for row in dataset.rows if row["has_semseg"])
    moto_s3.client().delete_object(
        Bucket=opener.location.bucket, Key=opener.location.key_for(semseg_path)
    )
    index = next(i for i, row in enumerate(dataset.rows) if row["semseg_path"] == semseg_path)
    with pytest.raises(DataError, match="object missing") as caught:
        dataset[index]
    assert f"{s3_dataset}/{semseg_path}" in str(caught.value)

    with pytest.raises(DataError, match=r"s3://.*/nowhere/manifest.parquet: object missing"):
        LineDataset(
            f"s3://{opener.location.bucket}/nowhere",
            opener=S3Opener(
                f"s3://{opener.location.bucket}/nowhere", endpoint_url=moto_s3.endpoint_url
            ),
        )


class _RecordingClient:
    """Stands in for boto3: any request is a test failure."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_object(self, **kwargs):
        self.calls.append(kwargs["Key"])
        raise AssertionError("no request may be made for a refused path")


@pytest.mark.parametrize(
    "bad_path", ["../secret.png", "images/../../other/x.png", "/etc/passwd", "a\\b", ""]
)
def test_paths_leaving_the_prefix_are_refused_without_a_request(bad_path: str):
    client = _RecordingClient()
    opener = S3Opener("s3://bucket/datasets/toy", client=client)
    with pytest.raises(ValueError):
        opener(bad_path)
    assert client.calls == []


def test_opener_pickles_and_reads_after_unpickling(s3_dataset: str, moto_s3, local_dataset: Path):
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    assert opener(MANIFEST_NAME) == (local_dataset / MANIFEST_NAME).read_bytes()
    assert opener._client is not None
    clone = pickle.loads(pickle.dumps(opener))
    assert clone._client is None  # a fresh client per process, made on first use
    assert clone.endpoint_url == moto_s3.endpoint_url
    assert clone(MANIFEST_NAME) == (local_dataset / MANIFEST_NAME).read_bytes()
    # The whole dataset pickles too (DataLoader workers get a copy).
    dataset = pickle.loads(pickle.dumps(LineDataset(s3_dataset, opener=opener)))
    assert dataset[0]["image"].shape == (32, 32, 3)


def test_state_holds_no_credentials(s3_dataset: str, moto_s3):
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    opener(MANIFEST_NAME)
    blob = pickle.dumps(opener)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert "testing" not in repr(opener)


def test_client_config_has_retries_and_timeouts(monkeypatch: pytest.MonkeyPatch, moto_s3):
    monkeypatch.setenv("CTA_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    client = make_s3_client()
    assert client.meta.endpoint_url == moto_s3.endpoint_url
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert client.meta.config.connect_timeout == 10.0
    assert client.meta.config.read_timeout == 60.0
    monkeypatch.setenv("CTA_S3_MAX_ATTEMPTS", "zero")
    with pytest.raises(ConfigError, match="CTA_S3_MAX_ATTEMPTS"):
        make_s3_client()


def test_opener_for_and_single_objects(tmp_path: Path, s3_bucket: str, moto_s3):
    assert isinstance(opener_for(tmp_path), LocalOpener)
    assert isinstance(opener_for(f"file://{tmp_path}"), LocalOpener)
    s3_opener = opener_for(f"s3://{s3_bucket}/x", endpoint_url=moto_s3.endpoint_url)
    assert isinstance(s3_opener, S3Opener)
    assert is_remote("s3://b/k") and not is_remote(tmp_path) and not is_remote("file:///x")
    with pytest.raises(ConfigError, match="unsupported scheme"):
        opener_for("gs://bucket/x")

    local_file = tmp_path / "sub" / "report.json"
    write_bytes_atomic(local_file, b"{}")
    assert read_bytes(f"file://{local_file}") == b"{}"
    assert [p.name for p in local_file.parent.iterdir()] == ["report.json"]  # no temp left

    uri = f"s3://{s3_bucket}/x/report.json"
    write_bytes_atomic(uri, b"one", endpoint_url=moto_s3.endpoint_url)
    write_bytes_atomic(uri, b"two", endpoint_url=moto_s3.endpoint_url)
    assert read_bytes(uri, endpoint_url=moto_s3.endpoint_url) == b"two"
    assert s3_opener("report.json") == b"two"
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/x/absent.json: object missing"):
        read_bytes(f"s3://{s3_bucket}/x/absent.json", endpoint_url=moto_s3.endpoint_url)
    with pytest.raises(DataError, match="file missing"):
        read_bytes(tmp_path / "absent.json")


def test_download_refuses_keys_leaving_the_folder(s3_bucket: str, moto_s3, tmp_path: Path):
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="tree/ok.txt", Body=b"ok")
    client.put_object(Bucket=s3_bucket, Key="tree/../../escape.txt", Body=b"no")
    target = tmp_path / "target"
    with pytest.raises(DataError, match=r"escapes the dataset root"):
        download_tree(f"s3://{s3_bucket}/tree", target, client=client)
    assert not target.exists()  # refused before anything was written
    with pytest.raises(DataError, match="no objects below"):
        download_tree(f"s3://{s3_bucket}/typo", target, client=client)
    with pytest.raises(OSError, match=rf"s3://no-such-{s3_bucket}/x: cannot write: NoSuchBucket"):
        write_bytes_atomic(f"s3://no-such-{s3_bucket}/x", b"", client=client)


def test_dataloader_workers_read_through_the_opener(s3_dataset: str, moto_s3):
    torch_data = pytest.importorskip("torch.utils.data")
    opener = S3Opener(s3_dataset, endpoint_url=moto_s3.endpoint_url)
    dataset = LineDataset(s3_dataset, opener=opener)  # the parent's client now exists
    loader = torch_data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    seen = [item["sample_id"] for item in loader]
    assert seen == dataset.sample_ids
