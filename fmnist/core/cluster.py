"""Connecting to Ray, and checking that what a job asks for exists before it waits for it."""

from __future__ import annotations

import logging
import os
import time

import ray
from rich.console import Console

from fmnist.core import ray_compat
from fmnist.core.errors import InputError
from fmnist.core.storage import StoragePath, storage_env_vars


_embedded = False  # whether start_ray started this process's Ray as a local instance


def quiet_ray_logs(verbose: bool) -> None:
    """Keep Ray's own log lines off the user's terminal, unless ``verbose``."""
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)


def start_ray(verbose: bool = False) -> bool:
    """Join the cluster of a submitted job (RAY_ADDRESS), or start an embedded local Ray.

    Returns whether this call connected (then the caller shuts Ray down). Ray's own log
    lines are kept off the user's terminal unless ``verbose``.
    """
    global _embedded
    quiet_ray_logs(verbose)
    if ray.is_initialized():
        return False
    # A submitted job (or the user) names the cluster in RAY_ADDRESS; otherwise start our own
    # instance rather than join whatever `ray start` left running on this machine.
    address = os.environ.get("RAY_ADDRESS") or "local"
    storage_settings = _storage_settings_for_workers()
    ray.init(
        address=address,
        runtime_env={"env_vars": storage_settings} if storage_settings else None,
        include_dashboard=False,  # ignored when joining a cluster; saves an embedded one a second
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        configure_logging=True,
    )
    _embedded = address == "local"
    if not verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def _storage_settings_for_workers() -> dict[str, str]:
    """The driver's storage settings (AWS_*, ...) for every worker and task of this job.

    Under `ray job submit` the job's runtime environment may already set some: Ray refuses the
    same variable twice, and the job's own come first.
    """
    job_env = ray_compat.job_runtime_env_vars()
    return {k: v for k, v in storage_env_vars().items() if k not in job_env}


def is_embedded() -> bool:
    """Whether Ray is a local instance that start_ray started in this process: one machine whose
    cores the job may use as it likes, and no autoscaler to wait for. Otherwise it is a cluster."""
    return _embedded and ray.is_initialized()


def file_task_options(location: StoragePath | None) -> dict:
    """Ray options for tasks that read or write a job's files (its input, its output) at ``location``.

    Object storage is read and written from any node (Ray's default scheduling). Local paths,
    on a cluster, from the driver's node, whose disk they are on (other nodes may not see it);
    those tasks reserve no CPU there: the head node may have none, or the actors hold them.
    """
    if is_embedded() or location is None or not location.is_local:
        return {}
    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": here}}  # a label Ray gives every node


def one_per_gpu() -> int:
    """How many workers or actors "one per GPU" makes: the cluster's GPUs now, and 1 where it has
    none yet (an autoscaling cluster starts a GPU node for it)."""
    return max(1, int(ray.cluster_resources().get("GPU", 0)))


def wait_for_resources(bundle: dict[str, float], count: int, what: str, remedy: str, timeout_s: float,
                       console: Console) -> None:
    """Fail with one clear line if the cluster's nodes lack room for ``count`` x ``bundle`` after ``timeout_s``.

    Ray would otherwise wait forever for workers that can never be placed. On an autoscaling
    cluster the request is passed to the autoscaler, and nodes have ``timeout_s`` to arrive; on an
    embedded Ray (one's own machine) no node will, and the answer is now.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: v for k, v in bundle.items() if v}
    if not bundle:
        return
    if is_embedded():
        timeout_s = 0
    deadline = time.monotonic() + timeout_s
    request = None
    try:
        while True:
            room = room_for(bundle)
            if room >= count:
                return
            if time.monotonic() >= deadline:
                # Nodes can be added to a cluster, not to one's own machine (embedded Ray).
                more = "" if is_embedded() else ", or add nodes"
                raise InputError(f"{what} needs {_shortfall(bundle, count, room)}; {remedy}{more}")
            if request is None:
                # The autoscaler's request_resources() is one cluster-wide request that each call
                # replaces (and withdrawing it would withdraw other jobs' too). A pending placement
                # group is this job's own demand: the autoscaler adds nodes for it, and removing
                # it withdraws this job's request only (Ray also removes it if the driver dies).
                request = placement_group([bundle] * count, strategy="SPREAD")
                console.print(f"Waiting up to {timeout_s:g} s for the cluster to make room for {what} ...")
            elif _created(request):
                return  # the room is there; the group's removal below frees it for the job's workers
            time.sleep(1)
    finally:
        if request is not None:
            remove_placement_group(request)


def _created(group) -> bool:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(group).get("state") == "CREATED"


def room_for(bundle: dict[str, float]) -> int:
    """How many ``bundle``s the cluster's live nodes hold, each within one node (an empty node's worth)."""
    room = 0
    for node in ray.nodes():
        if node["Alive"]:
            have = node["Resources"]
            room += min(int(have.get(k, 0) / v + 1e-6) for k, v in bundle.items())  # Ray counts in 1e-4 units
    return room


def _shortfall(bundle: dict[str, float], count: int, room: int) -> str:
    """What is asked and what the cluster has, in the resources it lacks."""
    total = ray.cluster_resources()
    short = {k: v * count for k, v in bundle.items() if total.get(k, 0) < v * count}
    where = "this machine" if is_embedded() else "the cluster"
    if short:
        want = ", ".join(f"{v:g} {k}" for k, v in short.items())
        return f"{want} but {where} has {', '.join(f'{total.get(k, 0):g} {k}' for k in short)}"
    each = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    return f"{each} on one node for each, but the cluster's nodes have room for {room}"
