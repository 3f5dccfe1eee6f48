"""PyTorch twins of the package's models, with the same weights: the ground for cross-checks.

Needs the ``peers`` extra (torch). A twin is an ``nn.Sequential`` in NCHW layout, written out here
module by module (an independent second implementation of each architecture), whose children carry
the Flax layer names (``twin.conv2``). The first dense layer after the flatten has its rows permuted
from NHWC to NCHW order, so that ``twin(to_nchw(x))`` equals ``model.apply`` on ``x``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from lenet_jax import models


def torch_twin(model, params, dtype="float64"):
    """A ``torch.nn.Sequential`` computing the same function as ``model`` with ``params``.

    Args:
      model: a ``LeNet5``, ``LeNet5ReLU``, ``CNN`` or ``MiniVGG``.
      params: its ``"params"`` collection.
      dtype: torch dtype name of the twin's parameters.

    Returns:
      The twin, in eval mode, on the CPU.
    """
    import torch
    from torch import nn

    def conv(name, padding="valid"):
        k = np.asarray(params[name]["kernel"], np.float64)  # HWIO
        m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding=padding)
        m.weight.data = torch.tensor(k.transpose(3, 2, 0, 1).copy())
        m.bias.data = torch.tensor(np.asarray(params[name]["bias"], np.float64))
        return m

    def dense(name, hwc=None):
        k = np.asarray(params[name]["kernel"], np.float64)  # [in, out]
        if hwc is not None:  # rows in NHWC order -> NCHW order
            h, w, c = hwc
            k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        m = nn.Linear(k.shape[0], k.shape[1])
        m.weight.data = torch.tensor(k.T.copy())
        m.bias.data = torch.tensor(np.asarray(params[name]["bias"], np.float64))
        return m

    if isinstance(model, models.LeNet5):
        act = nn.Tanh if model.activation == "tanh" else nn.ReLU
        pool = nn.AvgPool2d if model.pool == "avg" else nn.MaxPool2d
        side = ((model.image_size - 4) // 2 - 4) // 2
        layers = [
            ("conv1", conv("conv1")), ("act1", act()), ("pool1", pool(2)),
            ("conv2", conv("conv2")), ("act2", act()), ("pool2", pool(2)),
            ("flatten", nn.Flatten()),
            ("fc1", dense("fc1", (side, side, 16))), ("act3", act()),
            ("fc2", dense("fc2")), ("act4", act()),
            ("fc3", dense("fc3")),
        ]  # fmt: skip
    elif isinstance(model, models.CNN):
        side = ((model.image_size - 2) // 2 - 2) // 2
        layers = [
            ("conv1", conv("conv1")), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", conv("conv2")), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", dense("fc1", (side, side, 64))), ("act3", nn.ReLU()),
            ("fc2", dense("fc2")),
        ]  # fmt: skip
    elif isinstance(model, models.MiniVGG):
        side = model.image_size // 4
        layers = [
            ("conv1", conv("conv1", "same")), ("act1", nn.ReLU()),
            ("conv2", conv("conv2", "same")), ("act2", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv3", conv("conv3", "same")), ("act3", nn.ReLU()),
            ("conv4", conv("conv4", "same")), ("act4", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", dense("fc1", (side, side, 128))), ("act5", nn.ReLU()),
            ("fc2", dense("fc2")), ("act6", nn.ReLU()),
            ("fc3", dense("fc3")),
        ]  # fmt: skip
    else:
        raise ValueError(f"no torch twin for {type(model).__name__}")
    return nn.Sequential(OrderedDict(layers)).to(getattr(torch, dtype)).eval()


def to_nchw(x):
    """NHWC numpy array -> NCHW."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def to_nhwc(x):
    """NCHW numpy array -> NHWC."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))
