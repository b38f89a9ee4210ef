"""What /predict accepts: a request's body read within its limits, its images opened and checked
from their headers, then decoded as batch scoring decodes (fmnist.core.images); a refusal is a
BadRequest (4xx and one line), never a server error."""

from __future__ import annotations

import base64
import json

import numpy as np
import PIL.Image
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from fmnist.core.images import MAX_IMAGE_PIXELS, ImageTooLarge, UnreadableImage, decode_image, open_image

MAX_BODY_BYTES = 4 * 2**20  # larger bodies answer 413: ample for a PNG/JPEG of any sensible size
MAX_IMAGES = 256  # images in one JSON request
# Decoded pixels in one request, all its images together (each is within MAX_IMAGE_PIXELS too): one
# request costs a replica at most about one largest image's decoding (under 1 s of a core here).
MAX_REQUEST_PIXELS = MAX_IMAGE_PIXELS
IMAGE_TYPES = ("image/png", "image/jpeg")


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request: Request) -> bytes:
    """The request's body, refused (413) past MAX_BODY_BYTES before more of it is read."""
    too_large = BadRequest(413, f"the body is over the limit of {MAX_BODY_BYTES:,} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:
        raise BadRequest(400, "the client closed the connection before the end of the body") from None
    return bytes(body)


def decode_request(body: bytes, content_type: str) -> tuple[list[np.ndarray], bool]:
    """A /predict body -> its (28, 28) uint8 images, by the code batch scoring reads images with;
    and whether it was the JSON form ({"images": [base64, ...]}) rather than one PNG/JPEG."""
    opened, many = open_request(body, content_type)
    return decode_images(opened, many), many


def open_request(body: bytes, content_type: str) -> tuple[list[PIL.Image.Image], bool]:
    """A /predict body's images, opened: each one's size read from its header and checked, the
    request's pixels in all too, and nothing decoded yet (decode_images does that)."""
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        raise BadRequest(400, "the body is empty; send a PNG/JPEG image, or JSON {\"images\": [base64, ...]}")
    if kind in IMAGE_TYPES:
        return [_open(body, "the body")], False
    if kind != "application/json":
        raise BadRequest(400, f"Content-Type {kind or '(none)'} is not one of image/png, image/jpeg, "
                              "application/json")
    opened = [_open(data, f"images[{i}]") for i, data in enumerate(_json_images(body))]
    pixels = pixel_count(opened)
    if pixels > MAX_REQUEST_PIXELS:
        for image in opened:
            image.close()
        raise BadRequest(413, f"the images hold {pixels:,} pixels in all; the limit for one request is "
                              f"{MAX_REQUEST_PIXELS:,}")
    return opened, True


def decode_images(opened: list[PIL.Image.Image], many: bool) -> list[np.ndarray]:
    """Opened images (of a JSON request if ``many``) -> their (28, 28) uint8 pixels."""
    return [_decode(image, f"images[{i}]" if many else "the body") for i, image in enumerate(opened)]


def pixel_count(images: list[PIL.Image.Image]) -> int:
    return sum(image.width * image.height for image in images)


def _json_images(body: bytes) -> list[bytes]:
    """The base64-decoded entries of a JSON body's 'images' list."""
    try:
        encoded = json.loads(body)["images"]
    # RecursionError: JSON nested thousands of levels deep. UnicodeDecodeError is a ValueError.
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        raise BadRequest(400, "the JSON body is not an object with a list 'images' of base64 strings") from None
    if not isinstance(encoded, list) or not encoded or not all(isinstance(e, str) for e in encoded):
        raise BadRequest(400, "'images' must be a non-empty list of base64 strings")
    if len(encoded) > MAX_IMAGES:
        raise BadRequest(413, f"{len(encoded)} images in one request; the limit is {MAX_IMAGES}")
    images = []
    for i, text in enumerate(encoded):
        try:
            images.append(base64.b64decode(text, validate=True))
        except ValueError:  # binascii.Error, and non-ASCII characters in the string
            raise BadRequest(400, f"images[{i}] is not valid base64") from None
    return images


def _open(data: bytes, what: str) -> PIL.Image.Image:
    try:
        return open_image(data)
    except ImageTooLarge as e:
        raise BadRequest(413, f"{what} is {e}") from None
    except UnreadableImage as e:
        raise BadRequest(400, f"{what} is not a PNG/JPEG image ({e})") from None


def _decode(image: PIL.Image.Image, what: str) -> np.ndarray:
    try:
        return decode_image(image)
    except UnreadableImage as e:
        raise BadRequest(400, f"{what} is not a PNG/JPEG image ({e})") from None


def prediction(log_probs: np.ndarray, class_names: tuple[str, ...], checkpoint: str) -> dict:
    """One image's answer from its log-probabilities, the class chosen on them as scoring chooses."""
    label = int(log_probs.argmax())
    return {"label": label, "class_name": class_names[label],
            "probabilities": np.exp(log_probs).tolist(), "checkpoint": checkpoint}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
