"""Online serving under load: `fmnist serve` (Ray Serve, 1 and 2 replicas) against a plain peer.

    .venv/bin/python bench/bench_serve.py --checkpoint runs/NAME [--requests 1000] [--clients 1,8,32]
        [--replicas 1,2] [--python-proxy 1] [--hostile] [--hostile-seconds 20]

A closed-loop client on 127.0.0.1: C clients, each on its own keep-alive connection, send single-image
PNG POSTs to /predict back to back, --requests in all per level. The peer is what one would write
by hand: one process of uvicorn + Starlette, the same decoding and numpy model per request (the
functions fmnist.serve.requests holds), no batching. Each server runs as its own process, started and
stopped here; the client shares the machine's cores with it. `fmnist serve` takes HTTP through
HAProxy; --python-proxy N also measures N replicas behind Serve's Python proxy
(RAY_SERVE_ENABLE_HA_PROXY=0), for comparison.

The hostile mix (last in a default run; --hostile runs it alone; --hostile-seconds 0 leaves it out)
asks whether one client sending the costliest requests the limits admit hurts the others. On
`fmnist serve`, 1 replica, HAProxy: phase A, 4 honest closed-loop clients send the single-image PNG
for --hostile-seconds; phase B, the same 4 for as long, beside 1 hostile closed-loop client that
sends, in turn, the costliest JSON bodies within MAX_BODY_BYTES, MAX_IMAGES, MAX_IMAGE_PIXELS and
MAX_REQUEST_PIXELS, and a few-KB PNG declaring 12,000 x 12,000 pixels (a 413). The goals, printed
PASS/FAIL: the honest p99 in B at most 3x that in A, no honest request over 1 s, all answered 200.
It costs one more server start and 2 x --hostile-seconds (about a minute at the default), so it is
in the default run.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peer(checkpoint: str, port: int) -> None:
    """The hand-written server: one uvicorn process, one forward pass per request."""
    import numpy as np
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from fmnist.core.checkpoints import load_numpy_checkpoint, resolve_checkpoint
    from fmnist.core.model_config import IMAGE_PIXELS
    from fmnist.serve.requests import BadRequest, decode_request, error, prediction, read_body

    resolved = resolve_checkpoint(checkpoint)
    model = load_numpy_checkpoint(resolved)

    async def predict(request: Request) -> JSONResponse:
        try:
            images, many = decode_request(await read_body(request), request.headers.get("content-type", ""))
        except BadRequest as e:
            return error(e.status, str(e))
        log_probs = model.log_probabilities(np.stack(images).reshape(-1, IMAGE_PIXELS))
        answers = [prediction(row, model.config.class_names, resolved.uri) for row in log_probs]
        return JSONResponse({"predictions": answers} if many else answers[0])

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, body: bytes, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode})"
        try:
            if post(http.client.HTTPConnection("127.0.0.1", port, timeout=5), body)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer on port {port} in {timeout_s} s")


def post(connection: http.client.HTTPConnection, body: bytes, content_type: str = "image/png") -> tuple[int, int]:
    """The answer's status, and its X-Batch-Size (0 where the server sends none: the peer)."""
    connection.request("POST", "/predict", body, {"Content-Type": content_type})
    response = connection.getresponse()
    response.read()
    return response.status, int(response.getheader("X-Batch-Size", "0"))


def load(port: int, body: bytes, clients: int, requests: int) -> dict:
    """``requests`` POSTs from ``clients`` closed-loop clients: throughput, latency percentiles, and
    the median and largest batch the answers rode in."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, batches = [], []
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            start = time.perf_counter()
            status, batch_size = post(connection, body)
            mine.append(time.perf_counter() - start)
            batches.append(batch_size)
            if status != 200:
                failures.append(status)
        connection.close()
        with lock:
            latencies.extend(mine)
            batch_sizes.extend(batches)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert not failures, f"{len(failures)} requests failed: {failures[:5]}"
    quantiles = statistics.quantiles(latencies, n=100)
    return {"rps": requests / seconds, "p50_ms": 1000 * quantiles[49], "p99_ms": 1000 * quantiles[98],
            "batch": f"{statistics.median(batch_sizes):.0f} / {max(batch_sizes)}" if max(batch_sizes) else "-"}


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by a server process and its descendants (Ray's
    processes, named by their role: ray::ProxyActor, ray::ServeReplica:...), by name."""
    import psutil

    used: dict[str, float] = {}
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            name = "server" if process is root else process.name()
            if name.startswith("ray::"):  # an actor's title names the method it runs: keep the actor's name
                name = name.split(".")[0]  # (ray::ServeController, not ray::ServeController.listen_for_change)
            times = process.cpu_times()
            used[name] = used.get(name, 0) + times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return used


@contextmanager
def running(command: list[str], port: int, body: bytes, env: dict):
    """A server started, answering ``body`` on ``port``, and warmed up; stopped after (Ctrl-C, as a user
    would stop it). Yields its process."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_ready(port, body, proc)
        load(port, body, 8, 200)  # warm-up: connections, replicas' first batches
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def measure(name: str, command: list[str], port: int, body: bytes, levels: list[int], requests: int,
            env: dict) -> list[tuple]:
    rows = []
    with running(command, port, body, env) as proc:
        for clients in levels:
            before, client_before = cpu_seconds(proc.pid), time.process_time()
            figures = load(port, body, clients, requests)
            used = {k: v - before.get(k, 0) for k, v in cpu_seconds(proc.pid).items()}
            used["the client"] = time.process_time() - client_before
            rows.append((name, clients, figures))
            top = sorted(used.items(), key=lambda kv: -kv[1])[:4]
            print(f"{name:24s} {clients:3d} clients  {figures['rps']:7.0f} req/s  "
                  f"p50 {figures['p50_ms']:6.1f} ms  p99 {figures['p99_ms']:6.1f} ms  "
                  f"batch median / max {figures['batch']}  CPU ms per request: "
                  + ", ".join(f"{k} {1000 * v / requests:.2f}" for k, v in top), flush=True)
    return rows


def serve_command(checkpoint: str, port: int, replicas: int) -> list[str]:
    return [sys.executable, str(REPO / "workflows" / "serve.py"), "--checkpoint", checkpoint,
            "--port", str(port), "--replicas", str(replicas)]


def throughput(args: argparse.Namespace, body: bytes, env: dict) -> None:
    """The peer, then `fmnist serve` at each replica count and ingress, at each client level; one table."""
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    port = free_port()
    rows += measure("peer (uvicorn+Starlette)", [sys.executable, __file__, "--checkpoint", args.checkpoint,
                                                 "--peer", str(port)], port, body, levels, args.requests, env)
    servers = [(int(r), "HAProxy") for r in args.replicas.split(",") if r]
    servers += [(int(r), "Python proxy") for r in args.python_proxy.split(",") if r]
    for replicas, ingress in servers:
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="ray") as ray_tmpdir:
            settings = {"RAY_TMPDIR": ray_tmpdir, **({"RAY_SERVE_ENABLE_HA_PROXY": "0"} if ingress != "HAProxy" else {})}
            rows += measure(f"fmnist serve, {replicas} replica{'s' * (replicas > 1)}, {ingress}",
                            serve_command(args.checkpoint, port, replicas),
                            port, body, levels, args.requests, {**env, **settings})
    peer_rps = {clients: f["rps"] for name, clients, f in rows if name.startswith("peer")}
    print("\n| server | clients | req/s | vs peer | p50 ms | p99 ms | batch median / max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, clients, f in rows:
        print(f"| {name} | {clients} | {f['rps']:.0f} | {f['rps'] / peer_rps[clients]:.2f}x | "
              f"{f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['batch']} |")


# ----------------------------------------------------------------------------- the hostile mix

HONEST_CLIENTS = 4
SLOW_S = 1.0  # an honest request slower than this fails a goal
P99_RATIO_GOAL = 3.0  # the honest p99 beside the hostile client, at most this times the p99 without
BOMB_SIDE = 12_000  # the side a few-KB PNG declares: far over MAX_IMAGE_PIXELS, refused from its header
BOMB = f"{BOMB_SIDE:,} x {BOMB_SIDE:,} PNG"
GRAY, RGBA = 0, 6  # PNG colour types
PAETH = 4  # the PNG row filter that costs the decoder most to undo


def png_of_zeros(width: int, height: int, bit_depth: int, color_type: int, row_filter: int) -> bytes:
    """A valid PNG of all-zero pixels, every row under ``row_filter``; written here because Pillow
    writes neither 16-bit RGBA nor a chosen filter. Zeros deflate about 1000:1: the body stays small
    however many pixels it declares."""
    channels = {GRAY: 1, RGBA: 4}[color_type]
    row = bytes([row_filter]) + bytes(math.ceil(width * channels * bit_depth / 8))
    compressor = zlib.compressobj()
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = (width.to_bytes(4, "big") + height.to_bytes(4, "big")
              + bytes([bit_depth, color_type, 0, 0, 0]))  # deflate, adaptive filtering, no interlacing
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def hostile_requests() -> list[tuple[str, str, bytes]]:
    """The hostile client's requests, sent in turn: (what, Content-Type, body).

    The costliest decoding the limits admit. decode_request, timed in one thread (2026-12-07, median
    of 5), on MAX_REQUEST_PIXELS as one 4096 x 4096 image: 8-bit grayscale noise, 0.15 s (finer noise
    does not fit MAX_BODY_BYTES); 8-bit RGBA zeros, 0.28 s (the conversion to L on top); 16-bit RGBA
    zeros, 0.44 s (128 MB to inflate and unpack); the same with the Paeth filter on every row, 0.78 s:
    the costliest, in 0.2 MB on the wire (Adam7 interlacing added 4%, not worth writing). MAX_IMAGES
    images of 256 x 256 in that form decode in about as long (0.81 s), and take the other path through
    the replica too: 256 images into the model's batches beside the honest ones, and 256 answers.
    Before each, the 12,000 x 12,000 PNG: a 413 from its header (first, so that even a short phase
    sends one).
    """
    from fmnist.core.images import MAX_IMAGE_PIXELS
    from fmnist.serve.requests import MAX_BODY_BYTES, MAX_IMAGES, MAX_REQUEST_PIXELS

    side = math.isqrt(min(MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS))
    small_side = math.isqrt(MAX_REQUEST_PIXELS // MAX_IMAGES)
    large = png_of_zeros(side, side, 16, RGBA, PAETH)
    small = png_of_zeros(small_side, small_side, 16, RGBA, PAETH)
    bomb = (BOMB, "image/png", png_of_zeros(BOMB_SIDE, BOMB_SIDE, 1, GRAY, 0))
    requests = [bomb, (f"1 x {side} x {side}", "application/json", images_json([large])),
                bomb, (f"{MAX_IMAGES} x {small_side} x {small_side}", "application/json",
                       images_json([small] * MAX_IMAGES))]
    assert all(len(body) <= MAX_BODY_BYTES for _, _, body in requests)
    return requests


def images_json(pngs: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(png).decode() for png in pngs]}).encode()


def closed_loop(port: int, requests: list[tuple[str, str, bytes]], deadline: float, log: list) -> None:
    """One client on its own keep-alive connection: ``requests`` sent in turn, each when the previous
    is answered, until ``deadline``; (what, status, seconds) of each in ``log``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for what, content_type, body in itertools.cycle(requests):
        if time.perf_counter() >= deadline:
            break
        start = time.perf_counter()
        try:
            status = post(connection, body, content_type)[0]
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__  # counted as an answer that is not 200; the next request reconnects
            connection.close()
        log.append((what, status, time.perf_counter() - start))
    connection.close()


def hostile_phase(name: str, proc: subprocess.Popen, port: int, body: bytes, seconds: float,
                  hostile: list[tuple[str, str, bytes]]) -> tuple[list, list]:
    """HONEST_CLIENTS closed-loop clients sending ``body`` for ``seconds``, beside one sending ``hostile``
    (if any): each one's (what, status, seconds) per request. One line on the run's CPU, and the
    machine's load average before and after: others' work on the cores moves the latencies."""
    load_before = os.getloadavg()[0]
    deadline = time.perf_counter() + seconds
    honest_logs, hostile_log = [[] for _ in range(HONEST_CLIENTS)], []
    clients = [(log, [("honest", "image/png", body)]) for log in honest_logs]
    clients += [(hostile_log, hostile)] if hostile else []
    threads = [threading.Thread(target=closed_loop, args=(port, requests, deadline, log)) for log, requests in clients]
    before, client_before = cpu_seconds(proc.pid), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    used = {k: v - before.get(k, 0) for k, v in cpu_seconds(proc.pid).items()}
    used["the client"] = time.process_time() - client_before
    top = sorted(used.items(), key=lambda kv: -kv[1])[:4]
    honest = [record for log in honest_logs for record in log]
    print(f"{name}: {len(honest)} honest requests, {len(hostile_log)} hostile; load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}; CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in top),
          flush=True)
    return honest, hostile_log


def latency_row(phase: str, client: str, log: list, seconds: float) -> dict:
    latencies = sorted(s for _, _, s in log)
    # A percentile of fewer than 100 answers would be the largest by another name.
    p99 = 1000 * statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else None
    statuses = Counter(status for _, status, _ in log)
    return {"phase": phase, "client": client, "requests": len(log), "rps": len(log) / seconds,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": p99, "max_ms": 1000 * latencies[-1],
            "over": sum(s > SLOW_S for s in latencies), "statuses": statuses}


def hostile_mix(checkpoint: str, body: bytes, seconds: float, env: dict) -> None:
    """Phase A, honest clients alone; phase B, beside the hostile client; on `fmnist serve`, 1 replica,
    HAProxy. A table, and the goals as PASS/FAIL lines."""
    hostile = hostile_requests()
    port = free_port()
    with (tempfile.TemporaryDirectory(prefix="ray") as ray_tmpdir,
          running(serve_command(checkpoint, port, 1), port, body, {**env, "RAY_TMPDIR": ray_tmpdir}) as proc):
        honest_a, _ = hostile_phase("A (honest only)", proc, port, body, seconds, [])
        honest_b, hostile_b = hostile_phase("B (beside the hostile client)", proc, port, body, seconds, hostile)
    a = latency_row("A", f"{HONEST_CLIENTS} honest", honest_a, seconds)
    b = latency_row("B", f"{HONEST_CLIENTS} honest", honest_b, seconds)
    kinds = dict.fromkeys(what for what, _, _ in hostile_b)  # those sent (not all, in a short phase), in order
    hostile_rows = {what: latency_row("B", f"hostile: {what}", [r for r in hostile_b if r[0] == what], seconds)
                    for what in kinds}
    print(f"\nThe hostile mix: fmnist serve, 1 replica, HAProxy; {seconds:g} s per phase; the hostile client sent "
          f"{len(hostile_b)} requests, {len(hostile_b) / seconds:.1f}/s")
    print("\n| phase | client | requests | req/s | p50 ms | p99 ms | max ms | over 1 s | statuses |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in [a, b, *hostile_rows.values()]:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        statuses = ", ".join(f"{status} x {n}" for status, n in sorted(r["statuses"].items(), key=str))
        print(f"| {r['phase']} | {r['client']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{p99} | {r['max_ms']:.1f} | {r['over']} | {statuses} |")
    print_goals(a, b, hostile_rows[BOMB])


def print_goals(a: dict, b: dict, bomb: dict) -> None:
    ratio = b["p99_ms"] / a["p99_ms"]
    honest = a["statuses"] + b["statuses"]
    goals = [
        (ratio <= P99_RATIO_GOAL, f"honest p99 beside the hostile client {b['p99_ms']:.1f} ms = {ratio:.2f}x "
                                  f"the {a['p99_ms']:.1f} ms without (at most {P99_RATIO_GOAL:g}x)"),
        (a["over"] + b["over"] == 0, f"honest requests over {SLOW_S:g} s: {a['over']} in A, {b['over']} in B (none)"),
        (set(honest) == {200}, f"honest answers: {dict(honest)} (all 200)"),
        (set(bomb["statuses"]) == {413} and bomb["max_ms"] < 1000 * SLOW_S,
         f"the {BOMB}s: {dict(bomb['statuses'])}, the slowest in {bomb['max_ms']:.0f} ms "
         f"(413, each under {SLOW_S:g} s)"),
    ]
    print()
    for ok, line in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=1000, help="requests per level (default %(default)s)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per level (default %(default)s)")
    parser.add_argument("--replicas", default="1,2", help="Serve replica counts to measure (default %(default)s)")
    parser.add_argument("--python-proxy", default="1", help="replica counts to measure behind Serve's Python "
                                                            "proxy too ('' for none; default %(default)s)")
    parser.add_argument("--hostile", action="store_true", help="run only the hostile mix")
    parser.add_argument("--hostile-seconds", type=float, default=20,
                        help="length of each phase of the hostile mix (0: leave it out; default %(default)s)")
    parser.add_argument("--peer", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)  # run the peer
    args = parser.parse_args()
    if args.peer is not None:
        return peer(args.checkpoint, args.peer)
    if args.hostile and args.hostile_seconds <= 0:
        parser.error("--hostile needs --hostile-seconds above 0")

    import io

    from PIL import Image

    from fmnist.core.data import load_test_split

    images, _ = load_test_split(None)
    out = io.BytesIO()
    Image.fromarray(images[0]).save(out, format="PNG")
    body = out.getvalue()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    # A handled SIGINT is reset to its default in the child: Ctrl-C reaches the server even where
    # this script runs as a background job (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not args.hostile:
        throughput(args, body, env)
    if args.hostile_seconds > 0:
        hostile_mix(args.checkpoint, body, args.hostile_seconds, env)


if __name__ == "__main__":
    main()
