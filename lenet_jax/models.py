"""Flax Linen models built from a discoverable layer sequence (see ``lenet_jax.layers``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lenet_jax.data import get_dataset, preprocess
from lenet_jax.layers import (
    Activation,
    AvgPool,
    Conv,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool,
)


class ParamLayer(nn.Module):
    """A conv or dense layer as a Linen submodule: ``kernel``/``bias`` params, ``spec.apply``."""

    spec: Conv | Dense
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        if isinstance(self.spec, Conv):
            kernel_shape = (*self.spec.kernel_size, x.shape[-1], self.spec.features)
        else:
            kernel_shape = (x.shape[-1], self.spec.features)
        params = {
            "kernel": self.param("kernel", self.kernel_init, kernel_shape, jnp.float32),
            "bias": self.param("bias", nn.initializers.zeros, (self.spec.features,), jnp.float32),
        }
        return self.spec.apply(params, x)


class SequentialModel(nn.Module):
    """A Linen module whose forward pass is its ``layers`` sequence, applied in order.

    Subclasses define ``layers`` (a tuple of ``lenet_jax.layers`` descriptions) and ``image_size``.
    Conv and dense layers become ``ParamLayer`` submodules named after the layer, with the standard
    ``kernel``/``bias`` parameters (the layouts of ``nn.Conv``/``nn.Dense``); every layer computes
    with its pure ``apply``, so ``lenet_jax.layers.forward`` equals ``model.apply`` exactly.

    Attributes:
      dataset: the dataset (a name in ``lenet_jax.data.DATASETS``) whose images the model reads:
        it fixes the input channels and the normalization, so preprocessing, the zB bounds of LRP
        and the black baselines follow the model.
    """

    dataset: str = "mnist"

    def __post_init__(self):
        get_dataset(self.dataset)  # a clear error for an unknown name
        super().__post_init__()

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The layer sequence, input to output (``lenet_jax.layers`` descriptions)."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """Side of the square input; the dataset's images are padded to it (default: theirs)."""
        return get_dataset(self.dataset).image_shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one input."""
        return (self.image_size, self.image_size, get_dataset(self.dataset).channels)

    def preprocess(self, images):
        """uint8 images of ``dataset`` -> the normalized ``[B, *input_shape]`` model input."""
        return preprocess(images, self.dataset, self.image_size)

    def kernel_init(self):
        """The kernel initializer of the conv and dense layers (LeCun normal by default)."""
        return nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """Maps ``[B, H, W, C]`` inputs to ``[B, num_classes]`` logits.

        Args:
          x: normalized NHWC inputs.
          train: enables dropout (needs a ``"dropout"`` PRNG key in ``apply``).
        """
        for layer in self.layers:
            if layer.has_params:
                x = ParamLayer(layer, self.kernel_init(), name=layer.name)(x)
            elif isinstance(layer, Dropout):
                x = nn.Dropout(layer.rate, deterministic=not train, name=layer.name)(x)
            else:
                x = layer.apply(None, x)
        return x


class LeNet5(SequentialModel):
    """LeNet-5 (LeCun et al., 1998) on 32x32 inputs: 61,706 parameters on one channel.

    conv1 6@5x5 -> tanh -> avg-pool 2 -> conv2 16@5x5 -> tanh -> avg-pool 2 -> flatten ->
    fc1 120 -> tanh -> fc2 84 -> tanh -> fc3 10. Kernels use Xavier (Glorot) uniform init, suited
    to tanh; biases start at zero.

    Attributes:
      activation: ``"tanh"`` (faithful) or ``"relu"``.
      pool: ``"avg"`` (faithful) or ``"max"``.
      num_classes: size of the output layer.
    """

    activation: str = "tanh"
    pool: str = "avg"
    num_classes: int = 10

    def __post_init__(self):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"unknown pool {self.pool!r}; choose 'avg' or 'max'")
        super().__post_init__()

    @property
    def image_size(self) -> int:
        """32: MNIST's 28x28 digits are padded to LeNet-5's 32x32."""
        return 32

    def kernel_init(self):
        """Xavier (Glorot) uniform, suited to tanh."""
        return nn.initializers.xavier_uniform()

    @property
    def layers(self) -> tuple[Layer, ...]:
        """conv1, act1, pool1, conv2, act2, pool2, flatten, fc1, act3, fc2, act4, fc3."""
        act, pool = self.activation, AvgPool if self.pool == "avg" else MaxPool
        return (
            Conv("conv1", 6, (5, 5)),
            Activation("act1", act),
            pool("pool1", 2),
            Conv("conv2", 16, (5, 5)),
            Activation("act2", act),
            pool("pool2", 2),
            Flatten("flatten"),
            Dense("fc1", 120),
            Activation("act3", act),
            Dense("fc2", 84),
            Activation("act4", act),
            Dense("fc3", self.num_classes),
        )


class LeNet5ReLU(LeNet5):
    """The "modern" LeNet-5: ReLU and max pooling, otherwise ``LeNet5`` (61,706 parameters)."""

    activation: str = "relu"
    pool: str = "max"


class CNN(SequentialModel):
    """The seed-001 CNN: two conv + max-pool blocks and two dense layers, ReLU (225,034 parameters
    on MNIST's native 28x28).

    conv1 32@3x3 -> ReLU -> max-pool 2 -> conv2 64@3x3 -> ReLU -> max-pool 2 -> flatten ->
    fc1 128 -> ReLU -> fc2 10. He (Kaiming) uniform kernels, suited to ReLU.
    """

    num_classes: int = 10

    def kernel_init(self):
        """He uniform, suited to ReLU."""
        return nn.initializers.he_uniform()

    @property
    def layers(self) -> tuple[Layer, ...]:
        """conv1, act1, pool1, conv2, act2, pool2, flatten, fc1, act3, fc2."""
        return (
            Conv("conv1", 32, (3, 3)),
            Activation("act1", "relu"),
            MaxPool("pool1", 2),
            Conv("conv2", 64, (3, 3)),
            Activation("act2", "relu"),
            MaxPool("pool2", 2),
            Flatten("flatten"),
            Dense("fc1", 128),
            Activation("act3", "relu"),
            Dense("fc2", self.num_classes),
        )


class MiniVGG(SequentialModel):
    """MiniVGG from seed 004 on 32x32 inputs (2,355,338 parameters on CIFAR-10's three channels).

    conv1 32@3x3 -> conv2 64@3x3 -> max-pool 2 -> dropout 0.35 -> conv3 128@3x3 -> conv4 128@3x3 ->
    max-pool 2 -> dropout 0.45 -> flatten -> fc1 256 -> dropout 0.5 -> fc2 64 -> fc3 10; ReLU after
    every conv and hidden dense layer, "same" padding. He (Kaiming) uniform kernels.
    """

    dataset: str = "cifar10"
    num_classes: int = 10

    def kernel_init(self):
        """He uniform, suited to ReLU."""
        return nn.initializers.he_uniform()

    @property
    def image_size(self) -> int:
        """32 (CIFAR-10's size; MNIST-like 28x28 images are padded)."""
        return 32

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Four 3x3 convs in two blocks, then three dense layers."""
        return (
            Conv("conv1", 32, (3, 3), "SAME"),
            Activation("act1", "relu"),
            Conv("conv2", 64, (3, 3), "SAME"),
            Activation("act2", "relu"),
            MaxPool("pool1", 2),
            Dropout("drop1", 0.35),
            Conv("conv3", 128, (3, 3), "SAME"),
            Activation("act3", "relu"),
            Conv("conv4", 128, (3, 3), "SAME"),
            Activation("act4", "relu"),
            MaxPool("pool2", 2),
            Dropout("drop2", 0.45),
            Flatten("flatten"),
            Dense("fc1", 256),
            Activation("act5", "relu"),
            Dropout("drop3", 0.5),
            Dense("fc2", 64),
            Activation("act6", "relu"),
            Dense("fc3", self.num_classes),
        )


MODELS: dict[str, type[SequentialModel]] = {
    "lenet5": LeNet5,
    "lenet5_relu": LeNet5ReLU,
    "cnn": CNN,
    "minivgg": MiniVGG,
}


def model_config(model: SequentialModel) -> dict[str, Any]:
    """The JSON-able description of ``model``: its registry name and its attributes."""
    names = {cls: name for name, cls in MODELS.items()}
    if type(model) not in names:
        raise ValueError(f"{type(model).__name__} is not in the model registry {sorted(MODELS)}")
    fields = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in ("parent", "name")
    }
    return {"name": names[type(model)], **fields}


def build_model(config: dict[str, Any]) -> SequentialModel:
    """Builds a model from ``model_config`` output."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)


def describe(config: dict[str, Any]) -> str:
    """``lenet5(activation='tanh', num_classes=10, pool='avg')`` for a model config."""
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(config.items()) if k != "name")
    return f"{config.get('name')}({args})"


def init_params(model: SequentialModel, key: jax.Array):
    """The ``"params"`` collection of a freshly initialized ``model``."""
    return model.init(key, jnp.zeros((1, *model.input_shape), jnp.float32))["params"]


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
