"""The classifier's forward pass in numpy, for scoring on CPUs.

A scoring worker that imports torch spends 1.5 s of its start on it, and on one thread numpy's
matrix products score a batch faster than torch does here (bench/RESULTS.md, "Batch scoring").
Evaluation mode only: dropout is off. tests/test_model.py holds it to the torch model's outputs.
"""

from __future__ import annotations

import numpy as np

from fmnist.core.model_config import IMAGE_PIXELS, ModelConfig


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; Abramowitz & Stegun 7.1.26, within 1.5e-7 of it: float32's own precision.
    t = 1 / (1 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1 - poly * np.exp(-x * x))


ACTIVATION_FUNCTIONS = {  # as torch.nn.functional's, with its defaults
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(np.float32(2)))),
    "silu": lambda x: 0.5 * x * (1 + np.tanh(x / 2)),  # x * sigmoid(x), without exp's overflow
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
}


class NumpyClassifier:
    """The weights of a Classifier as (in, out) matrices and biases; log-probabilities out."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], config: ModelConfig):
        self.layers = layers  # hidden layers, then the output layer
        self.config = config

    @classmethod
    def from_state_dict(cls, state: dict, config: ModelConfig) -> "NumpyClassifier":
        """The network of a Classifier's state dict ({name: (out, in) weight or (out,) bias}) as numpy
        arrays; ValueError for a state dict that is not of ``config``'s network."""
        names = [f"hidden.{i}" for i in range(len(config.hidden))] + ["output"]  # Classifier's layers
        widths = (IMAGE_PIXELS, *config.hidden, len(config.class_names))
        expected = {}
        for name, inputs, outputs in zip(names, widths, widths[1:]):
            expected |= {f"{name}.weight": (outputs, inputs), f"{name}.bias": (outputs,)}
        if not isinstance(state, dict):
            raise ValueError("not a state dict")
        for key, shape in expected.items():
            if key not in state:
                raise ValueError(f"no {key} in the weights")
            if getattr(state[key], "shape", None) != shape:
                raise ValueError(f"{key} is {getattr(state[key], 'shape', '?')} in the weights, {shape} in the model")
        if state.keys() - expected.keys():
            raise ValueError(f"{', '.join(map(str, state.keys() - expected.keys()))} in the weights, not in the model")
        return cls([(state[f"{name}.weight"].T.copy(), state[f"{name}.bias"]) for name in names], config)

    def log_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 784) uint8 pixels -> (N, classes) float32 log-probabilities."""
        x = (pixels.astype(np.float32) / 255 - np.float32(self.config.mean)) / np.float32(self.config.std)
        activation = ACTIVATION_FUNCTIONS[self.config.activation]
        for weight, bias in self.layers[:-1]:
            x = activation(x @ weight + bias)
        weight, bias = self.layers[-1]
        logits = x @ weight + bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
