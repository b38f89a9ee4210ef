"""fmnist: distributed training and batch scoring of a Fashion-MNIST classifier on Ray."""

from fmnist.model_config import CLASS_NAMES

__all__ = ["CLASS_NAMES", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # fmnist.load_model imports torch on first use: scoring workers import this package without it.
    if name == "load_model":
        from fmnist.checkpoints import load_model
        return load_model
    raise AttributeError(f"module 'fmnist' has no attribute {name!r}")
