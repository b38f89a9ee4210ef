"""fmnist: distributed training and batch scoring of a Fashion-MNIST classifier on Ray."""

from importlib.metadata import PackageNotFoundError, version

from fmnist.core.model_config import CLASS_NAMES

__all__ = ["CLASS_NAMES", "load_model"]
try:
    __version__ = version("fmnist")  # pyproject.toml's, as installed
except PackageNotFoundError:  # a checkout that was never installed, e.g. a job's --working-dir
    __version__ = "0+unknown"


def __getattr__(name: str):
    # fmnist.load_model imports torch on first use: scoring workers import this package without it.
    if name == "load_model":
        from fmnist.core.checkpoints import load_model
        return load_model
    raise AttributeError(f"module 'fmnist' has no attribute {name!r}")
