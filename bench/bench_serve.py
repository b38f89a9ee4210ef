"""Online serving under load: `fmnist serve` (Ray Serve, 1 and 2 replicas) against a plain peer.

    .venv/bin/python bench/bench_serve.py --checkpoint runs/NAME [--requests 1000] [--clients 1,8,32]
        [--replicas 1,2] [--python-proxy 1]

A closed-loop client on 127.0.0.1: C clients, each on its own keep-alive connection, send single-image
PNG POSTs to /predict back to back, --requests in all per level. The peer is what one would write
by hand: one process of uvicorn + Starlette, the same decoding and numpy model per request (the
functions fmnist.serving uses), no batching. Each server runs as its own process, started and
stopped here; the client shares the machine's cores with it. `fmnist serve` takes HTTP through
HAProxy; --python-proxy N also measures N replicas behind Serve's Python proxy
(RAY_SERVE_ENABLE_HA_PROXY=0), for comparison.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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

    from fmnist.checkpoints import load_numpy_checkpoint, resolve_checkpoint
    from fmnist.model_config import IMAGE_PIXELS
    from fmnist.serving import BadRequest, decode_request, error, prediction, read_body

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


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, int]:
    """The answer's status, and its X-Batch-Size (0 where the server sends none: the peer)."""
    connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
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
            times = process.cpu_times()
            used[name] = used.get(name, 0) + times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return used


def measure(name: str, command: list[str], port: int, body: bytes, levels: list[int], requests: int,
            env: dict) -> list[tuple]:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    rows = []
    try:
        wait_ready(port, body, proc)
        load(port, body, 8, 200)  # warm-up: connections, replicas' first batches
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
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=1000, help="requests per level (default %(default)s)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per level (default %(default)s)")
    parser.add_argument("--replicas", default="1,2", help="Serve replica counts to measure (default %(default)s)")
    parser.add_argument("--python-proxy", default="1", help="replica counts to measure behind Serve's Python "
                                                            "proxy too ('' for none; default %(default)s)")
    parser.add_argument("--peer", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)  # run the peer
    args = parser.parse_args()
    if args.peer is not None:
        return peer(args.checkpoint, args.peer)

    import io

    from PIL import Image

    from fmnist.data import load_test_split

    images, _ = load_test_split(None)
    out = io.BytesIO()
    Image.fromarray(images[0]).save(out, format="PNG")
    body = out.getvalue()
    levels = [int(c) for c in args.clients.split(",")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    # A handled SIGINT is reset to its default in the child: Ctrl-C reaches the server even where
    # this script runs as a background job (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
                            [sys.executable, str(REPO / "workflows" / "serve.py"), "--checkpoint", args.checkpoint,
                             "--port", str(port), "--replicas", str(replicas)],
                            port, body, levels, args.requests, {**env, **settings})
    peer_rps = {clients: f["rps"] for name, clients, f in rows if name.startswith("peer")}
    print("\n| server | clients | req/s | vs peer | p50 ms | p99 ms | batch median / max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, clients, f in rows:
        print(f"| {name} | {clients} | {f['rps']:.0f} | {f['rps'] / peer_rps[clients]:.2f}x | "
              f"{f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['batch']} |")


if __name__ == "__main__":
    main()
