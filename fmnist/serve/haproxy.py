"""The HTTP ingress of an embedded Ray: Serve's HAProxy where this Ray has it, else Serve's Python proxy."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from fmnist.core import ray_compat
from fmnist.core.errors import InputError

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
        # for a cluster's node: HAProxy does not start where something else holds them. A stopping
        # replica waits drain_s for load balancers to let go of it (Ray's default: 30 s); on one machine
        # the only one is our own HAProxy, which stops with it.
        **ray_compat.haproxy_env(stats_port, metrics_port, drain_s=1),
    }
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield why_not
    finally:
        for key in added:
            os.environ.pop(key, None)


def _why_no_haproxy() -> str | None:
    if ray_compat.ray_version() < HAPROXY_FROM_RAY:
        return (f"Ray {ray.__version__}: HTTP through Serve's Python proxy (its HAProxy ingress, about 6x "
                f"the requests/s, is used from Ray {'.'.join(map(str, HAPROXY_FROM_RAY))})")
    if not ray_compat.haproxy_binary():
        return ("No HAProxy binary (ray[serve] brings one on Linux; elsewhere install haproxy): HTTP through "
                "Serve's Python proxy, about 6x fewer requests/s")
    return None


def haproxy_failure(message: str) -> str:
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


def check_serve_reads_protobuf() -> None:
    """On a Ray this process starts, say so before Serve fails on this protobuf
    (ray_compat.serve_fails_on_this_protobuf)."""
    if ray_compat.serve_fails_on_this_protobuf():
        raise InputError(f"Ray {ray.__version__}'s Serve cannot deploy with protobuf "
                         f"{importlib.metadata.version('protobuf')} (ray-project/ray#64362, fixed in Ray 2.57); "
                         "pip install 'protobuf<7.34', or a newer Ray")
