"""The tutorial's fully-connected classifier, with its widths, activation and dropout as options."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.core.model_config import ACTIVATIONS, CLASS_NAMES, IMAGE_PIXELS, ModelConfig
from fmnist.core.numpy_model import NumpyClassifier

__all__ = ["CLASS_NAMES", "IMAGE_PIXELS", "Classifier", "ModelConfig", "normalize"]
ACTIVATION_FUNCTIONS = dict(zip(ACTIVATIONS, (F.relu, F.gelu, F.silu, F.leaky_relu)))


class Classifier(nn.Module):
    """784 -> hidden... -> 10, the activation and dropout after each hidden layer, log-probabilities out."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        widths = (IMAGE_PIXELS, *config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, widths[1:]))
        self.output = nn.Linear(widths[-1], len(config.class_names))
        self.dropout = nn.Dropout(p=config.dropout)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # (N, 1, 28, 28) or (N, 784) -> (N, 784)
        for layer in self.hidden:
            x = self.dropout(self.activation(layer(x)))
        return F.log_softmax(self.output(x), dim=1)

    @torch.inference_mode()
    def log_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 784) uint8 pixels -> (N, classes) log-probabilities, run on the model's device: as
        NumpyClassifier's, for scoring."""
        device = next(self.parameters()).device  # uint8 over to it, a quarter of float32's bytes
        return self(normalize(torch.from_numpy(pixels).to(device), self.config)).cpu().numpy()

    @classmethod
    def from_numpy(cls, network: NumpyClassifier) -> "Classifier":
        """The eval-mode torch model of a NumpyClassifier's weights (as a checkpoint is read)."""
        model = cls(network.config)
        with torch.no_grad():
            for layer, (weight, bias) in zip((*model.hidden, model.output), network.layers):
                layer.weight.copy_(torch.from_numpy(weight.T))
                layer.bias.copy_(torch.from_numpy(bias))
        return model.eval()


def normalize(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """uint8 images of any shape (N, ...) -> float32 (N, 784) as the model was trained on."""
    x = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
    return (x - config.mean) / config.std
