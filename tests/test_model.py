"""The classifier: shapes, log-probabilities, options."""

import numpy as np
import pytest
import torch

from conftest import assert_float32_close, assert_same_classes
from fmnist import CLASS_NAMES
from fmnist.core.model import Classifier, ModelConfig, normalize
from fmnist.core.model_config import ACTIVATIONS
from fmnist.core.numpy_model import NumpyClassifier


def test_default_architecture_is_the_tutorials():
    model = Classifier()
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 256), (256, 128), (128, 64), (64, 10)]
    assert model.dropout.p == 0.2
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"


def test_flat_and_image_shaped_inputs_give_log_probabilities():
    model = Classifier().eval()
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(out, model(x.reshape(5, 784)))


def test_widths_and_dropout_are_options():
    model = Classifier(ModelConfig(hidden=(32,), dropout=0.5))
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 32), (32, 10)]
    x = torch.randn(64, 784)
    assert not torch.equal(model.train()(x), model(x))  # dropout on in training mode
    assert torch.equal(model.eval()(x), model(x))


def test_normalize_maps_pixels_to_minus_one_one():
    images = torch.tensor([[[0, 255], [51, 204]]], dtype=torch.uint8)
    out = normalize(images, ModelConfig())
    assert out.shape == (1, 4)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, -0.6, 0.6]]))


def test_the_activation_is_an_option_and_old_configs_mean_relu():
    x = torch.randn(4, 784)
    outputs = {}
    for activation in ACTIVATIONS:
        torch.manual_seed(0)
        outputs[activation] = Classifier(ModelConfig(hidden=(8,), activation=activation)).eval()(x)
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == 4  # same weights, four networks
    old = ModelConfig().to_dict()
    del old["activation"]  # a checkpoint saved before the option existed
    assert ModelConfig.from_dict(old).activation == "relu"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_numpy_forward_pass_gives_the_torch_models_outputs(activation):
    # CPU scoring runs the network in numpy (fmnist.core.numpy_model): same log-probabilities, same predictions.
    torch.manual_seed(0)
    model = Classifier(ModelConfig(hidden=(64, 32), activation=activation, mean=0.3, std=0.4)).eval()
    with torch.no_grad():
        for layer in (*model.hidden, model.output):
            layer.weight.mul_(3)  # larger pre-activations than at initialization, as after training
    pixels = torch.randint(0, 256, (500, 784), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(normalize(pixels, model.config)).numpy()
    np.testing.assert_array_equal(model.log_probabilities(pixels.numpy()), expected)  # the GPU actors' path
    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    got = NumpyClassifier.from_state_dict(weights, model.config).log_probabilities(pixels.numpy())
    assert got.dtype == np.float32 and got.shape == (500, 10)
    assert_float32_close(got, expected)
    assert_same_classes(got.argmax(axis=1), expected)
