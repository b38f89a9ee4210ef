"""Where a run trains: Ray Train's local mode on one's own machine, or workers a cluster has room for."""

from __future__ import annotations

import os
from dataclasses import replace

import ray
from rich.console import Console

from fmnist.core.cluster import is_embedded, one_per_gpu, wait_for_resources
from fmnist.core.configs import CPU_WORKERS, TrainConfig
from fmnist.core.errors import InputError
from fmnist.train.run_dir import count


def runs_in_local_mode(config: TrainConfig) -> bool:
    """Whether ``config`` trains in Ray Train's local mode: one worker on one's own machine (no
    RAY_ADDRESS, and no Ray instance in this process already)."""
    return config.num_workers in (None, 1) and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()


def place_locally(config: TrainConfig) -> tuple[TrainConfig, str]:
    """``config`` placed on this machine: one worker, its GPU where it has one, every core as torch threads."""
    import torch

    has_gpu = torch.cuda.is_available()
    if config.use_gpu and not has_gpu:
        raise InputError("--use-gpu: this machine has no GPU that torch can use; pass --no-gpu, or run on a "
                         "cluster with RAY_ADDRESS")
    use_gpu = has_gpu if config.use_gpu is None else config.use_gpu
    cores = os.cpu_count() or 1
    cpus = config.cpus_per_worker or cores
    if cpus > cores:
        raise InputError(f"training with 1 worker needs {cpus} CPU but this machine has {cores} CPU; ask for fewer "
                         "(--num-workers, --cpus-per-worker)")
    why = "no Ray instance: one worker with every core is the fastest on one machine; --num-workers N for DDP"
    return replace(config, use_gpu=use_gpu, num_workers=1, cpus_per_worker=cpus), why


def place_on_cluster(config: TrainConfig, console: Console) -> TrainConfig:
    """``config`` with what it left to the cluster decided: GPUs or not, workers, CPUs (= torch threads)
    each; once the cluster has room for them."""
    total = ray.cluster_resources()
    use_gpu = config.use_gpu if config.use_gpu is not None else total.get("GPU", 0) > 0
    workers = config.num_workers or (one_per_gpu() if use_gpu else CPU_WORKERS)
    cpus = config.cpus_per_worker
    if cpus is None:
        # On an embedded local Ray the workers may as well share all cores; on a cluster keep
        # Ray Train's default of 1 so that workers pack onto nodes.
        cpus = max(1, int(total.get("CPU", 1)) // workers) if is_embedded() else 1
    config = replace(config, use_gpu=use_gpu, num_workers=workers, cpus_per_worker=cpus)
    check_batch_splits(config)  # with the worker count the cluster decided
    remedy = "ask for fewer (--num-workers, --cpus-per-worker)" + (" or --no-gpu" if use_gpu else "")
    wait_for_resources({"CPU": cpus, "GPU": int(use_gpu)}, workers, f"training with {count(workers, 'worker')}",
                       remedy, config.resource_timeout_s, console)
    return config


def check_batch_splits(config: TrainConfig) -> None:
    if config.num_workers and config.batch_size < config.num_workers:
        raise InputError(f"--batch-size {config.batch_size} is smaller than --num-workers {config.num_workers}; "
                         "each worker needs a sample of every batch")
