"""Bad input to /predict: always a 4xx with a JSON error, the server alive, its memory bounded."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.serve.process import start_server

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPZ = "application/x-npz"
NPY_MAGIC = b"\x93NUMPY"
MAX_BODY_MB = 2
# Growth of the server's resident memory over the whole fuzz run that counts as bounded:
# a leak of the refused bodies (or a decoded 100000x100000 image) would be far above it.
RSS_GROWTH_LIMIT_KB = 150 * 1024


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return PNG_MAGIC + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npy_claiming(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header = header + b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 16


def _zip(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npz(compress: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _corrupt_npz() -> bytes:
    """A deflated .npz whose member's compressed bytes are overwritten after its header."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    body = bytearray(_npz(compress=True, view=image))
    body[120:200] = b"\xff" * 80
    return bytes(body)


def _good_png() -> bytes:
    buffer = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    with start_server(str(tiny_model_dir), max_body_mb=MAX_BODY_MB, max_pixels=4_000_000) as handle:
        http = _session()
        # Warm up: the first inference allocates the model's working memory.
        for _ in range(3):
            answer = http.post(
                f"{handle.url}/predict", data=_good_png(), headers={"Content-Type": "image/png"}
            )
            assert answer.status_code == 200
        handle.rss_before_kb = _rss_kb(handle.pid)
        yield handle


NAN_ARRAY = np.full((8, 8, 3), np.nan, dtype=np.float32)
CASES = {
    "wrong content type": (b"hello", "text/plain", 415),
    "no content type": (b"hello", None, 415),
    "json body": (b'{"image": [1, 2]}', "application/json", 415),
    "empty body": (b"", "image/png", 400),
    "random bytes as png": (bytes(range(256)) * 4, "image/png", 400),
    "random bytes as jpeg": (bytes(range(255, -1, -1)) * 4, "image/jpeg", 400),
    "random bytes as npy": (bytes(range(256)), "application/x-npy", 400),
    "truncated png": (_good_png()[:60], "image/png", 400),
    "png sent as jpeg": (_good_png(), "image/jpeg", 400),
    "png claiming 100000x100000": (_png_claiming(100_000, 100_000), "image/png", 413),
    "png claiming 0x0": (_png_claiming(0, 0), "image/png", 400),
    "zero-size npy": (_npy(np.zeros((0, 0, 3), np.uint8)), "application/x-npy", 400),
    "nan float npy": (_npy(NAN_ARRAY), "application/x-npy", 400),
    "int16 npy": (_npy(np.zeros((8, 8, 3), np.int16)), "application/x-npy", 400),
    "2-channel npy": (_npy(np.zeros((8, 8, 2), np.uint8)), "application/x-npy", 400),
    "2-d npy": (_npy(np.zeros((8, 8), np.uint8)), "application/x-npy", 400),
    "object npy (pickle)": (
        _npy(np.array([{"a": 1}], dtype=object)),
        "application/x-npy",
        400,
    ),
    "npy claiming 100000x100000x3": (
        _npy_claiming((100_000, 100_000, 3)),
        "application/x-npy",
        413,
    ),
    "truncated npy": (_npy(np.zeros((8, 8, 3), np.uint8))[:-5], "application/x-npy", 400),
    "body over the size limit": (b"\x00" * (MAX_BODY_MB * 1024 * 1024 + 1), "image/png", 413),
    # A part's views (.npz): every array checked from its header before it is decompressed.
    "npz that is not a zip": (b"PK\x03\x04" + bytes(range(64)), NPZ, 400),
    "npz without arrays": (_zip({}), NPZ, 400),
    "npz with a text member": (_zip({"notes.txt": b"hello"}), NPZ, 400),
    "npz of int16 views": (_npz(view=np.zeros((8, 8, 3), np.int16)), NPZ, 400),
    "npz with a 2-d view": (_npz(view=np.zeros((8, 8), np.uint8)), NPZ, 400),
    "npz of object arrays (pickle)": (
        _zip({"view.npy": _npy(np.array([{"a": 1}], dtype=object))}),
        NPZ,
        400,
    ),
    "npz claiming 100000x100000x3": (
        _zip({"view.npy": _npy_claiming((100_000, 100_000, 3))}),
        NPZ,
        413,
    ),
    "npz bomb (3000x3000 zeros, compressed)": (
        _npz(compress=True, view=np.zeros((3000, 3000, 3), np.uint8)),
        NPZ,
        413,
    ),
    "npz views over the pixel limit together": (
        _npz(compress=True, **{f"v{i}": np.zeros((1000, 1000, 3), np.uint8) for i in range(5)}),
        NPZ,
        413,
    ),
    "npz with too many views": (
        _npz(**{f"v{i}": np.zeros((2, 2, 3), np.uint8) for i in range(65)}),
        NPZ,
        400,
    ),
    "truncated npz member": (
        _zip({"view.npy": _npy(np.zeros((8, 8, 3), np.uint8))[:-5]}),
        NPZ,
        400,
    ),
    "npz member with a corrupt stream": (_corrupt_npz(), NPZ, 400),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_reason(server, case: str) -> None:
    body, content_type, status = CASES[case]
    # requests adds no Content-Type of its own to a bytes body.
    headers = {"Content-Type": content_type} if content_type else {}
    answer = _session().post(f"{server.url}/predict", data=body, headers=headers)
    assert answer.status_code == status, (case, answer.text)
    assert answer.json()["error"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prefix=st.sampled_from(
        [b"", PNG_MAGIC, NPY_MAGIC + b"\x01\x00", b"\xff\xd8\xff", b"PK\x03\x04"]
    ),
    tail=st.binary(max_size=2048),
    content_type=st.sampled_from(
        ["image/png", "image/jpeg", "application/x-npy", NPZ, "image/gif"]
    ),
)
def test_random_bodies_get_4xx(server, prefix: bytes, tail: bytes, content_type: str) -> None:
    answer = _session().post(
        f"{server.url}/predict", data=prefix + tail, headers={"Content-Type": content_type}
    )
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"]


def test_server_alive_and_memory_bounded_after_fuzzing(server) -> None:
    """Runs after the fuzz tests of this module (pytest keeps file order)."""
    http = _session()
    assert server.alive()
    assert http.get(f"{server.url}/healthz").status_code == 200
    answer = http.post(
        f"{server.url}/predict", data=_good_png(), headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 200
    metrics = http.get(f"{server.url}/metrics").text
    assert 'cta_requests_total{code="500"}' not in metrics
    growth = _rss_kb(server.pid) - server.rss_before_kb
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} kB"
