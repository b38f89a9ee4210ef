"""Ray Train's trainer for the training loop, less the parts of Ray Train a run does not use.

Ray Train's controller is an actor process that the workers wait for: it unpickles the trainer's
callbacks and scaling policy first, so this module imports neither torch nor the training loop.
Left out (bench/RESULTS.md has the seconds each cost; tests/test_laptop.py and
tests/test_training.py notice if a Ray upgrade renames or reshapes any of it):

- torch's process group, for one worker on CPUs, which has no one to share gradients with:
  Ray Train's torch backend would have its controller import torch (1.5 s) before any worker
  starts. GPUs and DDP on more workers keep it.
- the datasets manager, an actor that hands out Ray Data shards: the loop gets arrays from the
  object store instead.
- on an embedded Ray (one's own machine, which no autoscaler grows): the request for the
  workers' resources to Ray's autoscaling coordinator, an actor whose start the controller
  waits for; and the placement-group cleaner, which asks a dashboard this Ray does not have
  whether the controller lives. On a cluster the cleaner's state-API calls get 1 s: when a run
  ends, Ray waits for it up to 12 s where a call hangs.
- Ray Train's Ctrl-C handler, which fit() on the main thread installs for good: Ctrl-C raises
  KeyboardInterrupt as anywhere else, and the caller stops the run with ``abort()``.
"""

from __future__ import annotations

import ray
from ray.train import BackendConfig, ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from fmnist.cluster import is_embedded


def _backend_config(scaling_config: ScalingConfig) -> BackendConfig:
    """torch's process group (gloo on CPUs, NCCL on GPUs), unless one worker on CPUs needs none."""
    if scaling_config.num_workers == 1 and not scaling_config.use_gpu:
        return BackendConfig()
    from ray.train.torch import TorchConfig  # imports torch

    return TorchConfig(backend="nccl" if scaling_config.use_gpu else "gloo")


class _FixedNodesPolicy(FixedScalingPolicy):
    """Ray Train's fixed worker count, without asking an autoscaler for nodes (none can be added)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass


class Trainer(DataParallelTrainer):
    """Data-parallel training of ``train_loop_per_worker`` on Ray Train, as TorchTrainer runs it."""

    def __init__(self, train_loop_per_worker, *, scaling_config: ScalingConfig, **kwargs):
        super().__init__(train_loop_per_worker, backend_config=_backend_config(scaling_config),
                         scaling_config=scaling_config, **kwargs)
        self._controller = None

    def _create_default_callbacks(self):
        callbacks = []
        for callback in super()._create_default_callbacks():
            if isinstance(callback, DatasetsCallback) and not self.datasets:
                continue
            if isinstance(callback, PlacementGroupCleanerCallback):
                if is_embedded():
                    continue
                callback = PlacementGroupCleanerCallback(get_actor_timeout_s=1)
            callbacks.append(callback)
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if is_embedded():
            controller_init_kwargs["scaling_policy"] = _FixedNodesPolicy(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:
        self._controller = controller  # for abort(), in place of Ray Train's handler

    def abort(self) -> None:
        """Stop the run that fit() runs on the main thread, its workers first (from any thread; once is enough)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the controller ends its own process as it aborts
