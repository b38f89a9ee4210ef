"""Shared fixtures: one Ray instance for the whole session, and one real training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from fmnist.data import find_data_dir
from s3_server import S3Server

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def one_error_line(capsys) -> str:
    """What a refused command printed: exactly one 'error: ...' line on stderr, which it returns."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto) for the session; its endpoint and credentials are set in the environment
    before Ray starts, so the driver and every Ray worker (and subprocess) reach it."""
    server = S3Server()
    os.environ.update(server.env)
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Each ray.init costs seconds: every test that needs Ray shares this one."""
    if not ray.is_initialized():
        # More CPUs than cores: training workers, scoring actors and Ray Data tasks of a test
        # must all fit at once. The workers get the S3 settings explicitly, as a cluster's would.
        ray.init(address="local", num_cpus=6, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": s3_server.env})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real Fashion-MNIST, found as the product finds it (CI installs the Debian package)."""
    return find_data_dir()


@pytest.fixture(scope="session")
def trained_run(ray_session, real_data_dir, tmp_path_factory):
    """A real 1-epoch, 2-worker training on the real data; returns its TrainResult."""
    from fmnist.training import TrainConfig, train

    storage = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(epochs=1, num_workers=2, storage_path=str(storage), name="trained",
                             data_dir=str(real_data_dir), seed=0))


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No FMNIST_DATA_DIR and an empty cache, so only explicit paths count."""
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return os.environ
