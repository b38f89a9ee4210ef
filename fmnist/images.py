"""Image files and encoded image bytes -> 28x28 uint8 grayscale, the form the model reads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (28, 28)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class UnreadableImage(Exception):
    """A file or byte string that is not a PNG/JPEG image Pillow can decode."""


def read_image(source: str | Path | bytes) -> np.ndarray:
    """A PNG/JPEG file (path) or its bytes -> (28, 28) uint8 grayscale.

    A 28x28 grayscale image comes back pixel for pixel; anything else is converted to
    grayscale (ITU-R 601 luma) and resized to 28x28, aspect ratio not kept. Lanczos keeps the
    model's predictions best among Pillow's classic filters (bench/bench_resize.py).
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            image = image.convert("L")
            if image.size != IMAGE_SIZE:
                image = image.resize(IMAGE_SIZE, Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    # Pillow reports a damaged file as any of these, depending on where the damage is.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        message = str(e).replace(repr(stream), "")  # Pillow names a byte stream by its address
        raise UnreadableImage(" ".join(message.split()) or type(e).__name__) from None

