"""The Serve deployment: a replica answers /predict a batch at a time, and the page at /.

    HTTP (HAProxy, or Serve's proxy)  ->  replica: the request's image(s) sized from their headers, then decoded
        (fmnist.serve.requests), large ones in a thread
        -> @serve.batch: images of concurrent requests stacked into one forward pass of the model
        -> JSON: label, class name, probabilities, checkpoint

Routes: POST /predict, GET / (a page to try an image), and Serve's own GET /-/healthz; each replica's
figures go to Ray's Prometheus metrics (ServeMetrics).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ray import serve
from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from fmnist.core.checkpoints import load_numpy_checkpoint, resolve_checkpoint
from fmnist.core.model_config import IMAGE_PIXELS
from fmnist.core.numpy_model import NumpyClassifier
from fmnist.serve.page import page
from fmnist.serve.requests import (BadRequest, decode_images, decode_request, error, open_request, pixel_count,
                                   prediction, read_body)

if TYPE_CHECKING:
    import torch

# A batch holds the images waiting when the previous one ends, up to MAX_BATCH: under load they
# gather while it runs, and a lone request waits for no company.
MAX_BATCH = 64
BATCH_WAIT_S = 0.0
# Threads a replica decodes requests in: a request decoding a large image takes one, and the others
# go on beside it.
DECODE_THREADS = 4
# A body this small, of images this few pixels, is opened and decoded on the event loop: in tens of
# microseconds, less than handing it to a thread and back costs (with 32 clients, those hand-overs
# halved the requests a second). At most about 1 ms, for the dearest PNG of 128 x 128 pixels.
INLINE_BODY_BYTES = 64 * 2**10
INLINE_PIXELS = 128 * 128


@dataclass(frozen=True)
class ServedModel:
    """What a replica answers with, swapped whole by an update: a request sees one model throughout."""

    model: NumpyClassifier | torch.nn.Module
    class_names: tuple[str, ...]
    checkpoint: str  # its URI, in every answer
    page: str


class ServeMetrics:
    """The replica's figures, in Ray's Prometheus metrics (ray_fmnist_*; Serve adds the application,
    deployment and replica as tags)."""

    def __init__(self):
        self.requests = metrics.Counter("fmnist_requests", "HTTP requests answered, by route and status code",
                                        tag_keys=("route", "status"))
        self.latency_ms = metrics.Histogram(
            "fmnist_request_latency_ms", "time from a request's arrival at the replica to its answer, in ms",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], tag_keys=("route",))
        self.batch_size = metrics.Histogram("fmnist_batch_size", "images in each forward pass of the model",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.images_decoded = metrics.Counter("fmnist_images_decoded", "images decoded from requests")

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency_ms.observe(1000 * seconds, tags={"route": route})


@serve.deployment(
    name="Classifier",
    # Room on a replica for a full batch to gather (Serve's default of 5 would cap batches at 5).
    max_ongoing_requests=2 * MAX_BATCH,
    # Ctrl-C should stop the server in seconds; a request takes milliseconds.
    graceful_shutdown_timeout_s=2,
    graceful_shutdown_wait_loop_s=0.5,
    logging_config={"enable_access_log": False},  # a log line written and flushed per request
)
class Classifier:
    """A replica: the model of the checkpoint its user_config names, answering /predict a batch at a
    time, and the page at /. A new user_config switches the model in place (reconfigure)."""

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu
        self.served: ServedModel | None = None  # Serve calls reconfigure before the first request
        # Decoding runs in threads, not on the event loop, so that the replica goes on answering while
        # one request decodes a large image (Pillow releases Python's lock as it decodes).
        self.decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fmnist-decode")
        self.metrics = ServeMetrics()

    async def reconfigure(self, config: dict) -> None:
        """Serve this checkpoint from now on (Serve calls it with the deployment's user_config)."""
        self.served = await asyncio.get_running_loop().run_in_executor(
            self.decoders, load_served_model, config["checkpoint"], self.use_gpu)

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        route = request.url.path.rstrip("/") or "/"
        response = await self.answer(request, route)
        self.metrics.record(route if route in ("/", "/predict") else "other", response.status_code,
                            time.perf_counter() - started)
        return response

    async def answer(self, request: Request, route: str) -> Response:
        served = self.served
        if route == "/" and request.method in ("GET", "HEAD"):
            return HTMLResponse(served.page)
        if route != "/predict":
            return error(404, f"no route {route}; POST /predict, or GET / for the page")
        if request.method != "POST":
            return error(405, "use POST /predict with a PNG/JPEG body or JSON {\"images\": [base64, ...]}")
        try:
            images, many = await self.decode(await read_body(request), request.headers.get("content-type", ""))
        except BadRequest as e:
            return error(e.status, str(e))
        self.metrics.images_decoded.inc(len(images))
        answers = await asyncio.gather(*(self.predict(image) for image in images))
        predictions = [prediction(log_probs, model.class_names, model.checkpoint) for log_probs, _, model in answers]
        # X-Batch-Size: how many images the largest batch this request rode in held.
        headers = {"X-Batch-Size": str(max(size for _, size, _ in answers))}
        return JSONResponse({"predictions": predictions} if many else predictions[0], headers=headers)

    async def decode(self, body: bytes, content_type: str) -> tuple[list[np.ndarray], bool]:
        """decode_request: in a decoding thread, unless the body and its pixels are small enough to
        take less time here than the hand-over would."""
        loop = asyncio.get_running_loop()
        if len(body) > INLINE_BODY_BYTES:
            return await loop.run_in_executor(self.decoders, decode_request, body, content_type)
        opened, many = open_request(body, content_type)
        if pixel_count(opened) <= INLINE_PIXELS:
            return decode_images(opened, many), many
        return await loop.run_in_executor(self.decoders, decode_images, opened, many), many

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, int, ServedModel]]:
        """(28, 28) images of concurrent requests -> each one's log-probabilities, the batch's size,
        and the model that answered."""
        served = self.served
        # On the event loop: a forward pass of at most MAX_BATCH images takes well under a millisecond,
        # less than a thread's hand-over and back, and the requests that wait meanwhile make the next
        # batch (in a thread, batches shrank to a third and 32 clients got 0.6x the answers).
        log_probs = served.model.log_probabilities(np.stack(images).reshape(-1, IMAGE_PIXELS))
        self.metrics.batch_size.observe(len(images))
        return [(row, len(images), served) for row in log_probs]


def load_served_model(checkpoint: str, use_gpu: bool) -> ServedModel:
    """The model of a checkpoint URI, as a replica answers with it: numpy on CPUs, as batch scoring
    (no torch in the replica), or the torch model on the replica's GPU."""
    resolved = resolve_checkpoint(checkpoint)
    model = load_numpy_checkpoint(resolved)
    class_names = model.config.class_names
    if use_gpu:
        from fmnist.core.model import Classifier as TorchClassifier

        model = TorchClassifier.from_numpy(model).to("cuda")
    return ServedModel(model, class_names, resolved.uri, page(class_names, resolved.uri))
