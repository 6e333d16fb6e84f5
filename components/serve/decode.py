"""Request bodies -> uint8 RGB images (one image, or the views of one part), refusing bad input
with an HTTP status and a reason.

Sizes are checked from headers before any pixel is decoded: a PNG/JPEG header claiming
100000 x 100000 pixels or an .npy header (also inside an .npz) with a huge shape is refused
without allocating it; an .npz member is decompressed only up to the size its header states.
Pillow's own decompression-bomb guard is set to the same limit as a second line of defence.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

PNG, JPEG, NPY, NPZ = "image/png", "image/jpeg", "application/x-npy", "application/x-npz"
CONTENT_TYPES = (PNG, JPEG, NPY, NPZ)
#: Most views one part request may hold.
MAX_VIEWS = 64
# Pillow modes that convert to RGB without losing meaning (16-bit and float modes do not).
_CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr"}
_FORMATS = {PNG: "PNG", JPEG: "JPEG"}


class BadInput(Exception):
    """The body cannot be served (or a limit refuses it now); ``status`` is the HTTP status to
    answer with; ``close`` when the body was not read to its end, so the connection cannot
    carry another request."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header; BadInput 415 when not one we take."""
    bare = (content_type or "").split(";", 1)[0].strip().lower()
    if bare == "image/jpg":
        bare = JPEG
    if bare not in CONTENT_TYPES:
        raise BadInput(
            415,
            f"Content-Type {content_type or '(none)'!r} is not supported; send one of "
            + ", ".join(CONTENT_TYPES),
        )
    return bare


def _check_dims(height: int, width: int, max_pixels: int, what: str) -> None:
    if height < 1 or width < 1:
        raise BadInput(400, f"{what}: zero-size image ({height}x{width})")
    if height * width > max_pixels:
        raise BadInput(
            413,
            f"{what}: {height}x{width} = {height * width} pixels exceeds the limit of "
            f"{max_pixels} pixels",
        )


def _decode_picture(body: bytes, kind: str, max_pixels: int) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Lazy: parses the header only, so the size check runs before decoding pixels.
            with Image.open(io.BytesIO(body), formats=[_FORMATS[kind]]) as picture:
                width, height = picture.size
                _check_dims(height, width, max_pixels, f"{kind} body")
                if picture.mode not in _CONVERTIBLE_MODES:
                    raise BadInput(
                        400, f"{kind} body: image mode {picture.mode!r} is not 8-bit RGB/grey"
                    )
                picture.load()
                rgb = picture.convert("RGB")
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(413, f"{kind} body: {exc}") from None
    except UnidentifiedImageError:
        raise BadInput(400, f"body is not a {_FORMATS[kind]} image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(400, f"{kind} body: cannot decode the image: {exc}") from None
    return np.array(rgb, dtype=np.uint8)  # writable, unlike np.asarray of an image


def _read_npy_header(stream: Any, what: str) -> tuple[tuple[int, ...], bool]:
    """(shape, fortran order) of a uint8 .npy header; BadInput for anything else."""
    try:
        major, _ = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BadInput(400, f"{what} is not a valid .npy array: {exc}") from None
    if dtype != np.uint8:
        raise BadInput(400, f"{what}: dtype {dtype} must be uint8 (H, W, 3) RGB")
    return tuple(int(n) for n in shape), bool(fortran)


def _npy_data(data: bytes, shape: tuple[int, ...], fortran: bool, what: str) -> np.ndarray:
    expected = int(np.prod(shape))
    if len(data) != expected:
        raise BadInput(400, f"{what}: {len(data)} data bytes, shape {shape} needs {expected}")
    array = np.frombuffer(data, dtype=np.uint8, count=expected)
    # A copy: frombuffer views the immutable body, and torch wants writable arrays.
    return array.reshape(shape, order="F" if fortran else "C").copy()


def _decode_npy(body: bytes, max_pixels: int) -> np.ndarray:
    what = f"{NPY} body"
    stream = io.BytesIO(body)
    shape, fortran = _read_npy_header(stream, what)
    if len(shape) != 3 or shape[2] != 3:
        raise BadInput(400, f"{what}: shape {shape} must be (H, W, 3) RGB")
    _check_dims(shape[0], shape[1], max_pixels, what)
    return _npy_data(body[stream.tell() :], shape, fortran, what)


def _check_view_shape(
    shape: tuple[int, ...], what: str, max_pixels: int, pixels_before: int, views_before: int
) -> tuple[int, int]:
    """(views, pixels) of one .npz member's header shape, with the part's views and pixels
    before it: at most MAX_VIEWS views and ``max_pixels`` pixels in all (BadInput else)."""
    if len(shape) not in (3, 4) or shape[-1] != 3:
        raise BadInput(400, f"{what}: shape {shape} must be (H, W, 3) or (B, H, W, 3) RGB")
    views = shape[0] if len(shape) == 4 else 1
    if views < 1:
        raise BadInput(400, f"{what}: no view in shape {shape}")
    if views_before + views > MAX_VIEWS:
        raise BadInput(400, f"{what}: the part has over {MAX_VIEWS} views")
    _check_dims(shape[-3], shape[-2], max_pixels, what)
    total = pixels_before + views * shape[-3] * shape[-2]
    if total > max_pixels:
        raise BadInput(
            413, f"{what}: the part's views hold {total} pixels, over the limit of {max_pixels}"
        )
    return views, total - pixels_before


def _npz_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    max_pixels: int,
    pixels_before: int,
    views_before: int,
) -> np.ndarray:
    """One array of a part's .npz: (H, W, 3) or (B, H, W, 3) uint8; with the part's views and
    pixels so far, at most MAX_VIEWS views and ``max_pixels`` pixels. The header is checked
    before any pixel is decompressed."""
    what = f"{NPZ} body: array {info.filename[:-4]!r}"
    with archive.open(info) as stream:
        shape, fortran = _read_npy_header(stream, what)
        _check_view_shape(shape, what, max_pixels, pixels_before, views_before)
        # Reads (decompresses) no more than the header announces, so a zip bomb stops here.
        data = stream.read(int(np.prod(shape)))
        if stream.read(1):
            raise BadInput(400, f"{what}: more data than its shape {shape} holds")
    return _npy_data(data, shape, fortran, what)


def _npz_archive(body: bytes) -> zipfile.ZipFile:
    """The zip of a part's .npz body: 1 to MAX_VIEWS distinct ``.npy`` members."""
    archive = zipfile.ZipFile(io.BytesIO(body))
    members = archive.infolist()
    if not members:
        raise BadInput(400, f"{NPZ} body holds no array; send one per view of the part")
    if len(members) > MAX_VIEWS:
        raise BadInput(400, f"{NPZ} body: {len(members)} arrays, at most {MAX_VIEWS} views")
    names = [info.filename for info in members]
    if len(set(names)) != len(names) or not all(n.endswith(".npy") for n in names):
        raise BadInput(400, f"{NPZ} body: members must be distinct .npy arrays, got {names}")
    return archive


@contextlib.contextmanager
def _npz_errors() -> Iterator[None]:
    """A broken archive as a 400 naming what could not be read (BadInput passes through)."""
    try:
        yield
    except BadInput:
        raise
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise BadInput(400, f"{NPZ} body is not a readable .npz archive: {exc}") from None
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise BadInput(400, f"{NPZ} body: cannot read the archive: {exc}") from None


def _decode_npz(body: bytes, max_pixels: int) -> list[tuple[str, np.ndarray]]:
    """The views of one part: every array of the archive, a (B, H, W, 3) one as B views named
    ``<key>/<i>``; at most MAX_VIEWS views and ``max_pixels`` pixels in all."""
    with _npz_errors():
        archive = _npz_archive(body)
        views: list[tuple[str, np.ndarray]] = []
        pixels = 0
        for info in archive.infolist():
            array = _npz_member(archive, info, max_pixels, pixels, len(views))
            key = info.filename[:-4]
            batch = array if array.ndim == 4 else array[None]
            views.extend(
                (key if array.ndim == 3 else f"{key}/{i}", image) for i, image in enumerate(batch)
            )
            pixels += int(np.prod(batch.shape[:3]))
    return views


def _picture_pixels(body: bytes, kind: str, max_pixels: int) -> int:
    # The format's own reader parses the header only, and without Image.open's bomb guard, so
    # an oversized image gets this module's 413 naming the limit rather than Pillow's error.
    reader = {PNG: PngImagePlugin.PngImageFile, JPEG: JpegImagePlugin.JpegImageFile}[kind]
    try:
        with reader(io.BytesIO(body)) as picture:
            width, height = picture.size  # from the header: nothing is decoded
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as exc:
        raise BadInput(400, f"{kind} body: cannot read the image header: {exc}") from None
    _check_dims(height, width, max_pixels, f"{kind} body")
    return height * width


def _npz_pixels(body: bytes, max_pixels: int) -> int:
    with _npz_errors():
        archive = _npz_archive(body)
        pixels = views = 0
        for info in archive.infolist():
            what = f"{NPZ} body: array {info.filename[:-4]!r}"
            with archive.open(info) as stream:
                shape, _ = _read_npy_header(stream, what)  # decompresses the header only
            count, added = _check_view_shape(shape, what, max_pixels, pixels, views)
            views, pixels = views + count, pixels + added
    return pixels


def header_pixels(body: bytes, content_type: str | None, max_pixels: int) -> int:
    """The pixels a body will decode to, read from its image or array headers alone (nothing
    is decoded or decompressed beyond a header); BadInput over ``max_pixels`` (413) or for a
    header that is not one we take. What the decoded-image budget reserves before decoding."""
    kind = media_type(content_type)
    if not body:
        raise BadInput(400, "empty body; send the image bytes")
    if kind == NPZ:
        return _npz_pixels(body, max_pixels)
    if kind == NPY:
        stream = io.BytesIO(body)
        shape, _ = _read_npy_header(stream, f"{NPY} body")
        if len(shape) != 3 or shape[2] != 3:
            raise BadInput(400, f"{NPY} body: shape {shape} must be (H, W, 3) RGB")
        _check_dims(shape[0], shape[1], max_pixels, f"{NPY} body")
        return shape[0] * shape[1]
    return _picture_pixels(body, kind, max_pixels)


def decode_image(body: bytes, content_type: str | None, max_pixels: int) -> np.ndarray:
    """A (H, W, 3) uint8 RGB array from a request body; BadInput (4xx) for anything else."""
    kind = media_type(content_type)
    if not body:
        raise BadInput(400, "empty body; send the image bytes")
    if kind == NPZ:
        raise BadInput(415, f"{NPZ} is a part of several views; send one image here")
    if kind == NPY:
        return _decode_npy(body, max_pixels)
    return _decode_picture(body, kind, max_pixels)


def decode_views(
    body: bytes, content_type: str | None, max_pixels: int
) -> tuple[list[tuple[str | None, np.ndarray]], bool]:
    """(views, is_part): one unnamed image for PNG / JPEG / .npy bodies, or the named views of
    one part for an .npz body; BadInput (4xx) for anything else."""
    if media_type(content_type) == NPZ:
        if not body:
            raise BadInput(400, "empty body; send the views of the part as an .npz archive")
        return list(_decode_npz(body, max_pixels)), True
    return [(None, decode_image(body, content_type, max_pixels))], False


__all__ = [
    "CONTENT_TYPES",
    "MAX_VIEWS",
    "BadInput",
    "decode_image",
    "decode_views",
    "header_pixels",
    "media_type",
]
