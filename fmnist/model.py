"""The tutorial's fully-connected classifier, with its widths, activation and dropout as options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_PIXELS = 28 * 28
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "leaky_relu": F.leaky_relu}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model and feed it, saved as JSON in every checkpoint."""

    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2
    activation: str = "relu"  # one of ACTIVATIONS
    # Pixels are scaled to [0, 1], then (x - mean) / std: the tutorial's Normalize((0.5,), (0.5,)).
    mean: float = 0.5
    std: float = 0.5
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config saved by to_dict; ValueError for one that no model can be built from."""
        config = cls(
            hidden=tuple(int(h) for h in d["hidden"]),
            dropout=float(d["dropout"]),
            activation=d.get("activation", "relu"),  # checkpoints from before the option: the tutorial's ReLU
            mean=float(d["mean"]),
            std=float(d["std"]),
            class_names=tuple(d["class_names"]),
        )
        if (min(config.hidden, default=1) < 1 or not 0 <= config.dropout < 1 or not config.std > 0
                or config.activation not in ACTIVATIONS
                or len(config.class_names) < 2 or not all(isinstance(c, str) for c in config.class_names)
                or isinstance(d["class_names"], str)):
            raise ValueError(f"a model needs positive hidden widths, dropout in [0, 1), an activation of "
                             f"{', '.join(ACTIVATIONS)}, std > 0 and a list of class names")
        return config


class Classifier(nn.Module):
    """784 -> hidden... -> 10, the activation and dropout after each hidden layer, log-probabilities out."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        widths = (IMAGE_PIXELS, *config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, widths[1:]))
        self.output = nn.Linear(widths[-1], len(config.class_names))
        self.dropout = nn.Dropout(p=config.dropout)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # (N, 1, 28, 28) or (N, 784) -> (N, 784)
        for layer in self.hidden:
            x = self.dropout(self.activation(layer(x)))
        return F.log_softmax(self.output(x), dim=1)


def normalize(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 images of any shape (N, ...) -> float32 (N, 784) as the model was trained on."""
    x = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
    return (x - config.mean) / config.std
