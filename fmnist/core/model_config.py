"""What defines the classifier, without torch: its classes, its input, and the config every checkpoint saves.

Scoring workers import this and the numpy forward pass (numpy_model) only: torch would cost
each of them 1.5 s of its start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_PIXELS = 28 * 28
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "leaky_relu")


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
