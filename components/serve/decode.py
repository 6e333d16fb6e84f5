"""Request bodies -> one uint8 RGB image, refusing bad input with an HTTP status and a reason.

Sizes are checked from headers before any pixel is decoded: a PNG/JPEG header claiming
100000 x 100000 pixels or an .npy header with a huge shape is refused without allocating it.
Pillow's own decompression-bomb guard is set to the same limit as a second line of defence.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

PNG, JPEG, NPY = "image/png", "image/jpeg", "application/x-npy"
CONTENT_TYPES = (PNG, JPEG, NPY)
# Pillow modes that convert to RGB without losing meaning (16-bit and float modes do not).
_CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr"}
_FORMATS = {PNG: "PNG", JPEG: "JPEG"}


class BadInput(Exception):
    """The body cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


def _decode_npy(body: bytes, max_pixels: int) -> np.ndarray:
    stream = io.BytesIO(body)
    try:
        major, _ = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BadInput(400, f"{NPY} body is not a valid .npy array: {exc}") from None
    if dtype != np.uint8:
        raise BadInput(400, f"{NPY} body: dtype {dtype} must be uint8 (H, W, 3) RGB")
    if len(shape) != 3 or shape[2] != 3:
        raise BadInput(400, f"{NPY} body: shape {tuple(shape)} must be (H, W, 3) RGB")
    _check_dims(int(shape[0]), int(shape[1]), max_pixels, f"{NPY} body")
    offset = stream.tell()
    expected = int(np.prod(shape))
    if len(body) - offset != expected:
        raise BadInput(
            400,
            f"{NPY} body: {len(body) - offset} data bytes, shape {tuple(shape)} needs {expected}",
        )
    array = np.frombuffer(body, dtype=np.uint8, count=expected, offset=offset)
    # A copy: frombuffer views the immutable body, and torch wants writable arrays.
    return array.reshape(shape, order="F" if fortran else "C").copy()


def decode_image(body: bytes, content_type: str | None, max_pixels: int) -> np.ndarray:
    """A (H, W, 3) uint8 RGB array from a request body; BadInput (4xx) for anything else."""
    kind = media_type(content_type)
    if not body:
        raise BadInput(400, "empty body; send the image bytes")
    if kind == NPY:
        return _decode_npy(body, max_pixels)
    return _decode_picture(body, kind, max_pixels)


__all__ = ["CONTENT_TYPES", "BadInput", "decode_image", "media_type"]
