"""Image files and encoded image bytes -> 28x28 uint8 grayscale, the form the model reads."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (28, 28)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # as Pillow names them (its JPEG reader opens phones' MPO files too)
# The most pixels (width x height, read from the header) an image may have to be decoded: 4096 x 4096,
# more than a 12-megapixel phone photo. A PNG of a few KB can declare 12,000 x 12,000 pixels, and
# decoding costs time and memory by the pixel (0.2-0.8 s of a core per 16 Mpx here, by format).
MAX_IMAGE_PIXELS = 4096 * 4096


class UnreadableImage(Exception):
    """A file or byte string that is not a PNG/JPEG image Pillow can decode."""


class ImageTooLarge(UnreadableImage):
    """An image whose header declares more than MAX_IMAGE_PIXELS pixels: refused before decoding."""


def open_image(source: str | Path | bytes) -> Image.Image:
    """A PNG/JPEG file (path) or its bytes, opened: its header read, its size checked against
    MAX_IMAGE_PIXELS, its pixels not yet decoded (decode_image does that)."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        image = Image.open(stream, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # past Pillow's own limit (179 Mpx): no size to show
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(f"{int(pixels[1]):,} pixels" if pixels else "more pixels") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes means unreadable
        raise _unreadable(e, stream) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(f"{width:,} x {height:,} pixels")
    return image


def decode_image(image: Image.Image) -> np.ndarray:
    """An opened image -> (28, 28) uint8 grayscale; the image is closed.

    A 28x28 grayscale image comes back pixel for pixel; anything else is converted to
    grayscale (ITU-R 601 luma) and resized to 28x28, aspect ratio not kept. Lanczos keeps the
    model's predictions best among Pillow's classic filters (bench/bench_resize.py).
    """
    try:
        with image:
            image = image.convert("L")
            if image.size != IMAGE_SIZE:
                image = image.resize(IMAGE_SIZE, Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    # Pillow reports damage as OSError, ValueError, SyntaxError and others, depending on where it is.
    except Exception as e:  # noqa: BLE001 - any failure to decode untrusted bytes means unreadable
        raise _unreadable(e, image.fp) from None


def read_image(source: str | Path | bytes) -> np.ndarray:
    """A PNG/JPEG file (path) or its bytes -> (28, 28) uint8 grayscale (open_image, then decode_image)."""
    return decode_image(open_image(source))


def _unreadable(error: Exception, stream) -> UnreadableImage:
    message = str(error).replace(repr(stream), "")  # Pillow names a byte stream by its address
    return UnreadableImage(" ".join(message.split()) or type(error).__name__)


def _too_large(size: str) -> ImageTooLarge:
    side = math.isqrt(MAX_IMAGE_PIXELS)
    return ImageTooLarge(f"{size}, over the limit of {MAX_IMAGE_PIXELS:,} ({side} x {side})")

