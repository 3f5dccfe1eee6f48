"""PyTorch twins of the Flax models, with the same weights: the ground for cross-checks.

Needs the ``peers`` extra (torch). The twin is an ``nn.Sequential`` in NCHW layout whose layers mirror
``model.layers``; the first dense layer after a flatten has its rows permuted from NHWC to NCHW order,
so that ``twin(x.transpose(0, 3, 1, 2))`` equals ``model.apply`` on ``x``.
"""

from __future__ import annotations

import numpy as np


def torch_twin(model, params, dtype="float64"):
    """A ``torch.nn.Sequential`` computing the same function as ``model`` with ``params``.

    Args:
      model: a ``SequentialModel``.
      params: its ``"params"`` collection.
      dtype: torch dtype name of the twin's parameters.

    Returns:
      The twin, in eval mode, on the CPU.
    """
    import torch
    from torch import nn

    tdtype = getattr(torch, dtype)
    modules = []
    shape = model.input_shape  # (H, W, C) of the current activation
    for layer in model.layers:
        p = params.get(layer.name) if layer.has_params else None
        if layer.kind == "conv":
            k = np.asarray(p["kernel"], np.float64)  # HWIO
            m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding=layer.padding.lower())
            m.weight.data = torch.tensor(k.transpose(3, 2, 0, 1))
            m.bias.data = torch.tensor(np.asarray(p["bias"], np.float64))
            shape = _conv_out(shape, k.shape, layer.padding)
        elif layer.kind == "dense":
            k = np.asarray(p["kernel"], np.float64)  # [in, out]
            if len(shape) == 3 and shape[0] * shape[1] * shape[2] == k.shape[0]:
                h, w, c = shape  # rows in NHWC order -> NCHW order
                k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
            m = nn.Linear(k.shape[0], k.shape[1])
            m.weight.data = torch.tensor(k.T.copy())
            m.bias.data = torch.tensor(np.asarray(p["bias"], np.float64))
            shape = (k.shape[1],)
        elif layer.kind == "activation":
            m = {"tanh": nn.Tanh, "relu": nn.ReLU}[layer.fn]()
        elif layer.kind in ("avg_pool", "max_pool"):
            cls = nn.AvgPool2d if layer.kind == "avg_pool" else nn.MaxPool2d
            m = cls(layer.window)
            shape = (shape[0] // layer.window, shape[1] // layer.window, shape[2])
        elif layer.kind == "flatten":
            m = nn.Flatten()
        elif layer.kind == "dropout":
            m = nn.Dropout(layer.rate)
        else:
            raise ValueError(f"no torch twin for layer kind {layer.kind!r}")
        modules.append(m)  # after a flatten, ``shape`` stays (H, W, C) for the row permutation
    return nn.Sequential(*modules).to(tdtype).eval()


def _conv_out(shape, kernel_shape, padding):
    h, w, _ = shape
    kh, kw, _, co = kernel_shape
    if padding == "VALID":
        return (h - kh + 1, w - kw + 1, co)
    return (h, w, co)


def to_nchw(x):
    """NHWC numpy array -> NCHW."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def to_nhwc(x):
    """NCHW numpy array -> NHWC."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))
