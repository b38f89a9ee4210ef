"""``fmnist serve``: the application on an embedded Ray (or the cluster of RAY_ADDRESS) until Ctrl-C
or SIGTERM, or an update in place of the fmnist application that Ray already serves."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import ray
from ray import serve
from ray.serve import Application
from rich.console import Console

from fmnist.core.cluster import is_embedded, start_ray, wait_for_resources
from fmnist.core.errors import InputError, JobFailed
from fmnist.core.signals import signal_handler
from fmnist.serve.app import APP_NAME, DEFAULT_MAX_REPLICAS, ServeConfig, build_app
from fmnist.serve.haproxy import check_serve_reads_protobuf, haproxy_failure, haproxy_ingress


def serve_forever(config: ServeConfig, console: Console | None = None) -> None:
    """Serve ``config.checkpoint`` at http://host:port/ until Ctrl-C or SIGTERM (KeyboardInterrupt), then
    stop the application, and the embedded Ray if this call started one. Where the Ray it joins
    (RAY_ADDRESS) already serves an fmnist application, update that one in place instead, and return."""
    console = console or Console()
    application, checkpoint = build_app(config)
    started_ray = _start_ray(config, console)
    if not config.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines, which our one line replaces
    deployed = False
    # SIGTERM (kill, docker stop, systemd, `ray job stop`) stops it as Ctrl-C does. ray.init's handler
    # would too (sys.exit), but Ray's native one prints a stack dump first.
    with signal_handler(signal.SIGTERM, signal.default_int_handler):
        try:
            if APP_NAME in serve.status().applications:
                _update(application, checkpoint, console)
                return
            _start_serve(config, console)
            deployed = True
            _serve_until_stopped(application, checkpoint, config, console)
        finally:
            # On a cluster Serve outlives this driver (its controller is detached): remove our application,
            # and Serve goes on with any others. An embedded Ray takes Serve down with it.
            if deployed and not is_embedded():
                console.print(f"Removing the application {APP_NAME!r} (Serve drains its replicas first)")
                serve.delete(APP_NAME)
            if started_ray:
                ray.shutdown()


def _start_ray(config: ServeConfig, console: Console) -> bool:
    """Join RAY_ADDRESS's cluster, whose ingress is set where its Ray starts (docs/serving.md), or start
    an embedded Ray with HAProxy's settings; whether this call started Ray."""
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return start_ray(config.verbose)
    _check_port_free(config.host, config.port)  # on one's own machine: a clear line, not a failing proxy
    check_serve_reads_protobuf()
    with haproxy_ingress() as no_haproxy:
        started_ray = start_ray(config.verbose)
    if no_haproxy:
        console.print(no_haproxy, style="dim", soft_wrap=True)
    return started_ray


def _start_serve(config: ServeConfig, console: Console) -> None:
    """Serve's HTTP ingress, once the cluster has room for the replicas."""
    replicas = 1 if config.replicas == "auto" else config.replicas  # autoscaling starts from 1
    what = f"serving with {replicas} replica{'s' * (replicas > 1)}"
    wait_for_resources({"CPU": 1, "GPU": int(config.use_gpu)}, replicas, what,
                       "ask for fewer (--replicas)" + (" or leave out --use-gpu" if config.use_gpu else ""),
                       config.resource_timeout_s, console)
    try:
        serve.start(http_options={"host": config.host, "port": config.port},
                    logging_config={"enable_access_log": False})  # the proxy's line per request, as the replica's
    except ray.exceptions.RayTaskError as e:
        if "HAProxy" not in str(e.cause):
            raise
        raise JobFailed(haproxy_failure(str(e.cause))) from None


def _serve_until_stopped(application: Application, checkpoint: str, config: ServeConfig, console: Console) -> None:
    serve.run(application, name=APP_NAME, route_prefix="/")  # returns once the replicas are up
    scaling = (f"; replicas follow the load, 1 to {config.max_replicas or DEFAULT_MAX_REPLICAS}"
               if config.replicas == "auto" else "")
    console.print(f"Serving {checkpoint} at "
                  f"http://{config.host}:{config.port}/  (POST /predict; Ctrl-C to stop{scaling})", soft_wrap=True)
    console.file.flush()  # now, not at exit: a log collector or a script waits for this line
    while True:
        time.sleep(1)


def _update(application: Application, checkpoint: str, console: Console) -> None:
    """Switch the running fmnist application to ``application``'s checkpoint: the new user_config
    reaches each replica's reconfigure, which swaps the model between two requests; none is refused.
    Its HTTP address stays as it was started."""
    console.print(f"Updating the running application {APP_NAME!r} to {checkpoint} ...")
    serve.run(application, name=APP_NAME, route_prefix="/")  # returns once every replica serves it
    console.print(f"Updated: {APP_NAME!r} serves {checkpoint}", soft_wrap=True)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot serve on {host}:{port} ({e.strerror}); pass another --port or --host") from None
