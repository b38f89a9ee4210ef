"""The fmnist Serve application: the deployment with its replicas, resources and checkpoint.

``serve run fmnist.serve.app:app checkpoint=...`` and ``serve deploy`` configs build it with ``app``;
``fmnist serve`` with ``build_app``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve import Application

from fmnist.core import ray_compat
from fmnist.core.checkpoints import load_numpy_checkpoint, resolve_checkpoint
from fmnist.core.errors import InputError
from fmnist.serve.deployment import Classifier

APP_NAME = "fmnist"


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
    Ray has them (max_surge_percent: Ray 2.60 has it, 2.59 and before not; without it Serve stops an
    old replica before it starts the new one)."""
    return {"max_surge_percent": 100} if ray_compat.deployment_has_max_surge() else {}


def app(args: dict[str, str]) -> Application:
    """The builder for ``serve run fmnist.serve.app:app checkpoint=C [replicas=N|auto] [max_replicas=N]
    [use_gpu=true]`` and serve deploy configs (whose ``args`` are these)."""
    known = {"checkpoint", "replicas", "max_replicas", "use_gpu"}
    if set(args) - known or "checkpoint" not in args:
        raise ValueError("fmnist.serve.app:app takes checkpoint=C [replicas=N|auto] [max_replicas=N] "
                         f"[use_gpu=true|false], got {args}")
    replicas = str(args.get("replicas", 1))
    max_replicas = args.get("max_replicas")
    return build_app(ServeConfig(
        checkpoint=str(args["checkpoint"]), replicas=replicas if replicas == "auto" else int(replicas),
        max_replicas=None if max_replicas is None else int(max_replicas),
        use_gpu=str(args.get("use_gpu", "false")).lower() in ("1", "true", "yes")))[0]
