"""Connecting to Ray, and checking that what a job asks for exists before it waits for it."""

from __future__ import annotations

import logging
import os
import time

import ray

from fmnist.errors import InputError


def start_ray(verbose: bool = False) -> bool:
    """Join the cluster of a submitted job (RAY_ADDRESS), or start an embedded local Ray.

    Returns whether this call started it (then the caller shuts it down). Ray's own log
    lines are kept off the user's terminal unless ``verbose``.
    """
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        # Workers' print/log lines would interleave with our progress display.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return False
    ray.init(
        # A submitted job (or the user) names the cluster in RAY_ADDRESS; otherwise start our
        # own instance rather than join whatever `ray start` left running on this machine.
        address=os.environ.get("RAY_ADDRESS") or "local",
        include_dashboard=False,  # ignored when joining a cluster; saves an embedded one a second
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        configure_logging=True,
    )
    if not verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def one_per_gpu() -> int:
    """How many workers or actors "one per GPU" makes: the cluster's GPUs now, and 1 where it has
    none yet (an autoscaling cluster starts a GPU node for it)."""
    return max(1, int(ray.cluster_resources().get("GPU", 0)))


def wait_for_resources(bundle: dict[str, float], count: int, what: str, remedy: str, timeout_s: float) -> None:
    """Fail with one clear line if the cluster lacks ``count`` x ``bundle`` after ``timeout_s``.

    Ray would otherwise wait forever for workers that can never be placed. On an autoscaling
    cluster the request is passed to the autoscaler, and nodes have ``timeout_s`` to arrive.
    """
    requested = {k: v * count for k, v in bundle.items() if v}
    deadline = time.monotonic() + timeout_s
    asked_autoscaler = False
    while True:
        total = ray.cluster_resources()
        short = {k: v for k, v in requested.items() if total.get(k, 0) < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            have = ", ".join(f"{total.get(k, 0):g} {k}" for k in short)
            want = ", ".join(f"{v:g} {k}" for k, v in short.items())
            raise InputError(
                f"{what} needs {want} but the cluster has {have}; {remedy}, or add nodes"
            )
        if not asked_autoscaler:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[bundle] * count)
            asked_autoscaler = True
        time.sleep(1)
