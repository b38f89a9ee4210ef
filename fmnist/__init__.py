"""fmnist: distributed training and batch scoring of a Fashion-MNIST classifier on Ray."""

from fmnist.checkpoints import load_model
from fmnist.model import CLASS_NAMES

__all__ = ["CLASS_NAMES", "load_model"]
__version__ = "0.1.0"
