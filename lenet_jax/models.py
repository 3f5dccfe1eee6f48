"""The package's models: idiomatic Flax Linen modules (``nn.Conv``, ``nn.Dense``, ``nn.avg_pool``).

A model is only a model: the dataset it reads belongs to the run (its checkpoint records it), and
``ModelInput`` — a dataset at the model's input size — turns that dataset's images into the
model's input. ``dataset_options`` gives what the explainers need of a dataset (the zᴮ bounds and
the black baseline). ``cpu_kernels`` swaps in the CPU forms LeNet-5 trains with (``lenet_jax.cpu_kernels``); the
parameters are the same either way, and the explanation methods trace the reference form (then
run its convolutions in the forms ``cpu_kernels`` chooses).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lenet_jax import cpu_kernels
from lenet_jax.data import get_dataset, normalized_range, preprocess


class ImageClassifier(nn.Module):
    """What the package's models share: the ``cpu_kernels`` switch, and the input size their
    architecture needs (``input_size``; ``None``: the size of the dataset's images).

    Attributes:
      cpu_kernels: compute with ``lenet_jax.cpu_kernels`` (training on CPU); same function.
    """

    cpu_kernels: bool = False
    input_size: ClassVar[int | None] = None

    # The layer functions, reference or CPU form.
    def conv(self, features, kernel_size, *, name, padding="VALID", kernel_init):
        fn = cpu_kernels.training_conv if self.cpu_kernels else lax.conv_general_dilated
        return nn.Conv(
            features,
            kernel_size,
            padding=padding,
            kernel_init=kernel_init,
            conv_general_dilated=fn,
            name=name,
        )

    def tanh(self, x):
        return cpu_kernels.tanh(x) if self.cpu_kernels else nn.tanh(x)

    def avg_pool(self, x, window):
        pool = cpu_kernels.avg_pool if self.cpu_kernels else nn.avg_pool
        return pool(x, (window, window), strides=(window, window))


class LeNet5(ImageClassifier):
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
    input_size: ClassVar[int | None] = 32  # MNIST's 28x28 digits are padded to LeNet-5's 32x32

    def __post_init__(self):
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"unknown activation {self.activation!r}; choose 'tanh' or 'relu'")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"unknown pool {self.pool!r}; choose 'avg' or 'max'")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """``[B, 32, 32, C]`` normalized images -> ``[B, num_classes]`` logits."""
        init = nn.initializers.xavier_uniform()
        act = self.tanh if self.activation == "tanh" else nn.relu
        pool = self.avg_pool if self.pool == "avg" else _max_pool
        x = pool(act(self.conv(6, (5, 5), kernel_init=init, name="conv1")(x)), 2)
        x = pool(act(self.conv(16, (5, 5), kernel_init=init, name="conv2")(x)), 2)
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(120, kernel_init=init, name="fc1")(x))
        x = act(nn.Dense(84, kernel_init=init, name="fc2")(x))
        return nn.Dense(self.num_classes, kernel_init=init, name="fc3")(x)


class LeNet5ReLU(LeNet5):
    """The "modern" LeNet-5: ReLU and max pooling, otherwise ``LeNet5`` (61,706 parameters)."""

    activation: str = "relu"
    pool: str = "max"


def _max_pool(x, window):
    return nn.max_pool(x, (window, window), strides=(window, window))


class CNN(ImageClassifier):
    """A small ReLU CNN, as in flax's MNIST example: two conv + max-pool blocks and two dense layers
    (225,034 parameters on MNIST's native 28x28).

    conv1 32@3x3 -> ReLU -> max-pool 2 -> conv2 64@3x3 -> ReLU -> max-pool 2 -> flatten ->
    fc1 128 -> ReLU -> fc2 10. He (Kaiming) uniform kernels, suited to ReLU.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """``[B, H, W, C]`` normalized images -> ``[B, num_classes]`` logits."""
        init = nn.initializers.he_uniform()
        x = _max_pool(nn.relu(self.conv(32, (3, 3), kernel_init=init, name="conv1")(x)), 2)
        x = _max_pool(nn.relu(self.conv(64, (3, 3), kernel_init=init, name="conv2")(x)), 2)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128, kernel_init=init, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=init, name="fc2")(x)


class MiniVGG(ImageClassifier):
    """MiniVGG on 32x32 inputs (2,355,338 parameters on three channels): two VGG blocks and a
    dense head.

    conv1 32@3x3 -> conv2 64@3x3 -> max-pool 2 -> dropout 0.35 -> conv3 128@3x3 -> conv4 128@3x3 ->
    max-pool 2 -> dropout 0.45 -> flatten -> fc1 256 -> dropout 0.5 -> fc2 64 -> fc3 10; ReLU after
    every conv and hidden dense layer, "same" padding. He (Kaiming) uniform kernels.
    """

    num_classes: int = 10
    input_size: ClassVar[int | None] = 32  # CIFAR-10's size; MNIST-like 28x28 images are padded

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """``[B, 32, 32, C]`` normalized images -> ``[B, num_classes]`` logits."""
        init = nn.initializers.he_uniform()

        def conv(features, name):
            return self.conv(features, (3, 3), padding="SAME", kernel_init=init, name=name)

        for block, (a, b, rate) in enumerate([(32, 64, 0.35), (128, 128, 0.45)]):
            x = nn.relu(conv(a, f"conv{2 * block + 1}")(x))
            x = nn.relu(conv(b, f"conv{2 * block + 2}")(x))
            x = nn.Dropout(rate, deterministic=not train, name=f"drop{block + 1}")(_max_pool(x, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256, kernel_init=init, name="fc1")(x))
        x = nn.Dropout(0.5, deterministic=not train, name="drop3")(x)
        x = nn.relu(nn.Dense(64, kernel_init=init, name="fc2")(x))
        return nn.Dense(self.num_classes, kernel_init=init, name="fc3")(x)


class EncoderBlock(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(self.num_heads, deterministic=True, name="attn")(h)
        x = x + h
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(self.mlp_dim, name="mlp_in")(h)
        h = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h, approximate=False))
        return x + h


class ViT(ImageClassifier):
    """A small Vision Transformer (Dosovitskiy et al., 2021) as Flax users write one: 7x7 patches
    embedded by ``nn.Conv``, a class token and learned position embeddings (``self.param``),
    ``depth`` pre-LayerNorm blocks (``nn.MultiHeadDotProductAttention``, a GELU MLP), a final
    LayerNorm and a dense head on the class token (72,074 parameters on MNIST's 28x28).

    Explain it with ``composite="attn_lrp"`` (AttnLRP) or ``"cp_lrp"``.
    """

    patch: int = 7
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        """``[B, H, W, C]`` normalized images -> ``[B, num_classes]`` logits."""
        p = self.patch
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = x + pos
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


MODELS: dict[str, type[ImageClassifier]] = {
    "lenet5": LeNet5,
    "lenet5_relu": LeNet5ReLU,
    "cnn": CNN,
    "minivgg": MiniVGG,
    "vit": ViT,
}


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What a run feeds its model: the images of ``dataset``, padded to ``size`` x ``size`` and
    normalized with the dataset's mean and standard deviation."""

    dataset: str
    size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one input."""
        return (self.size, self.size, get_dataset(self.dataset).channels)

    def preprocess(self, images):
        """uint8 images of ``dataset`` -> the normalized ``[B, *shape]`` model input."""
        return preprocess(images, self.dataset, self.size)


def model_input(model: ImageClassifier, dataset: str) -> ModelInput:
    """``model``'s input for images of ``dataset`` (a name in ``lenet_jax.data.DATASETS``).

    Raises:
      ValueError: unknown dataset (the message lists the choices).
    """
    native = get_dataset(dataset).image_shape[0]
    return ModelInput(dataset, model.input_size or native)


def model_config(model: ImageClassifier) -> dict[str, Any]:
    """The JSON-able description of ``model``: its registry name and its attributes.

    ``cpu_kernels`` is left out: it changes how the model computes, not what.
    """
    names = {cls: name for name, cls in MODELS.items()}
    if type(model) not in names:
        raise ValueError(f"{type(model).__name__} is not in the model registry {sorted(MODELS)}")
    fields = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in ("parent", "name", "cpu_kernels")
    }
    return {"name": names[type(model)], **fields}


def build_model(config: dict[str, Any]) -> ImageClassifier:
    """Builds a model from ``model_config`` output (a ``dataset`` entry, which checkpoints written
    before the dataset moved to the run carry, is ignored: the run records it too)."""
    config = dict(config)
    config.pop("dataset", None)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)


def describe(config: dict[str, Any]) -> str:
    """``lenet5(activation='tanh', num_classes=10, pool='avg')`` for a model config."""
    args = ", ".join(
        f"{k}={v!r}" for k, v in sorted(config.items()) if k not in ("name", "dataset")
    )
    return f"{config.get('name')}({args})"


def init_params(model: ImageClassifier, key: jax.Array, dataset: str = "mnist"):
    """The ``"params"`` collection of a freshly initialized ``model`` reading ``dataset``."""
    shape = model_input(model, dataset).shape
    return model.init(key, jnp.zeros((1, *shape), jnp.float32))["params"]


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(p.size for p in jax.tree_util.tree_leaves(params))


def dataset_options(dataset: str) -> dict[str, float]:
    """What the explainers need to know of a dataset: ``low``/``high``, the normalized black and
    white pixel (the zᴮ rule's bounds), and ``baseline``, the black pixel (for Integrated Gradients
    and occlusion)."""
    black, white = normalized_range(dataset)
    return {"low": black, "high": white, "baseline": black}


def default_composite(model: ImageClassifier) -> str:
    """The LRP composite a model is explained with by default: AttnLRP (``"attn_lrp"``) for the
    ViT, zennit's ``"epsilon_plus_flat"`` for the CNNs."""
    return "attn_lrp" if isinstance(model, ViT) else "epsilon_plus_flat"


def apply_fn(model: ImageClassifier):
    """``(params, x) -> logits`` of ``model`` in evaluation mode, in its reference form: what
    ``explain.prepare`` takes."""
    return lambda params, x: explained(model, params)(x)


def explained(model: ImageClassifier, params):
    """The function the explainers take: ``x -> logits`` of ``model`` in evaluation mode, in its
    reference form (``functools.partial(model.apply, variables)``, so layers keep their names)."""
    return functools.partial(model.clone(cpu_kernels=False).apply, {"params": params})
