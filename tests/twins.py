"""PyTorch twins of the package's models, with the same weights: the ground for cross-checks.

Needs the ``peers`` extra (torch). A twin is an ``nn.Sequential`` in NCHW layout, written out here
module by module (an independent second implementation of each architecture), whose children carry
the Flax layer names (``twin.conv2``). The first dense layer after the flatten has its rows permuted
from NHWC to NCHW order, so that ``twin(to_nchw(x))`` equals ``model.apply`` on ``x``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np

from lenet_jax import models

# --------------------------------------------------------------------------- transformers
# A transformer's twin is a second implementation whose modules LXT's own patches rewrite, as LXT
# does for its Hugging Face models (``lxt.efficient.patches``): the attention wrapped by
# ``wrap_attention_forward`` (gradients of q, k divided by 4, of v by 2) or, for CP-LRP,
# ``cp_wrap_attention_forward`` (q, k detached); LayerNorm and RMSNorm by ``layer_norm_forward`` and
# ``rms_norm_forward`` (the statistic detached; the RMSNorm patch computes in float32); the GELU MLP
# by ``mlp_forward`` (identity rule on the activation); the SwiGLU MLP by ``gated_mlp_forward`` (or
# ``cp_gated_mlp_forward``); ε on every ``nn.Linear`` and ``nn.Conv2d`` through zennit with LXT's
# ``monkey_patch_zennit``. Relevance is input × gradient seeded with ``one_hot(target)`` on the
# logits, so the output relevance is ``one_hot(target) * logit``, as ``explain.lrp``'s.


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
        side = (((model.input_size or 28) - 4) // 2 - 4) // 2
        layers = [
            ("conv1", conv("conv1")), ("act1", act()), ("pool1", pool(2)),
            ("conv2", conv("conv2")), ("act2", act()), ("pool2", pool(2)),
            ("flatten", nn.Flatten()),
            ("fc1", dense("fc1", (side, side, 16))), ("act3", act()),
            ("fc2", dense("fc2")), ("act4", act()),
            ("fc3", dense("fc3")),
        ]  # fmt: skip
    elif isinstance(model, models.CNN):
        side = (((model.input_size or 28) - 2) // 2 - 2) // 2
        layers = [
            ("conv1", conv("conv1")), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", conv("conv2")), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", dense("fc1", (side, side, 64))), ("act3", nn.ReLU()),
            ("fc2", dense("fc2")),
        ]  # fmt: skip
    elif isinstance(model, models.MiniVGG):
        side = (model.input_size or 28) // 4
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


def _twin_classes(variant: str):
    """Torch modules for one LXT variant (``"attn_lrp"`` or ``"cp_lrp"``), patched by LXT."""
    import torch
    from lxt.efficient import patches
    from torch import nn as tnn

    class LayerNorm(tnn.LayerNorm):
        pass

    class RMSNorm(tnn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(dim))
            self.variance_epsilon = eps

    class MLP(tnn.Module):
        def __init__(self, dim, mlp_dim):
            super().__init__()
            self.up_proj, self.down_proj = tnn.Linear(dim, mlp_dim), tnn.Linear(mlp_dim, dim)
            self.act_fn = tnn.GELU()

    class GatedMLP(tnn.Module):
        def __init__(self, dim, mlp_dim):
            super().__init__()
            self.gate_proj = tnn.Linear(dim, mlp_dim, bias=False)
            self.up_proj = tnn.Linear(dim, mlp_dim, bias=False)
            self.down_proj = tnn.Linear(mlp_dim, dim, bias=False)
            self.act_fn = tnn.SiLU()

    def eager_attention(module, query, key, value, mask):
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ value

    wrap = (
        patches.wrap_attention_forward
        if variant == "attn_lrp"
        else patches.cp_wrap_attention_forward
    )
    attention = wrap(eager_attention)
    patches.patch_method(patches.layer_norm_forward, LayerNorm)
    patches.patch_method(patches.rms_norm_forward, RMSNorm)
    patches.patch_method(patches.mlp_forward, MLP)
    gated = patches.gated_mlp_forward if variant == "attn_lrp" else patches.cp_gated_mlp_forward
    patches.patch_method(gated, GatedMLP)

    class Attention(tnn.Module):
        def __init__(self, dim, heads, bias, causal):
            super().__init__()
            self.heads, self.causal = heads, causal
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
                tnn.Linear(dim, dim, bias=bias) for _ in range(4)
            )

        def forward(self, x):
            b, t, d = x.shape

            def split(h):
                return h.view(b, t, self.heads, d // self.heads).transpose(1, 2)

            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
            mask = torch.ones(t, t, dtype=torch.bool).tril() if self.causal else None
            out = attention(self, q, k, v, mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, d))

    return LayerNorm, RMSNorm, MLP, GatedMLP, Attention


def transformer_twin(kind: str, params, variant: str, heads: int, dtype: str = "float64"):
    """The torch twin of a ``"vit"`` (the package's ``ViT``, or the same layout from NNX) or a
    ``"decoder"`` (a causal RMSNorm/SwiGLU decoder on embeddings), patched for LXT's ``variant``
    (``"attn_lrp"`` or ``"cp_lrp"``), in eval mode with ``dtype`` parameters."""
    import torch
    from torch import nn as tnn

    LayerNorm, RMSNorm, MLP, GatedMLP, Attention = _twin_classes(variant)
    t = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731
    decoder = kind == "decoder"

    def linear(m, p, kernel=None):
        k = np.asarray(p["kernel"] if kernel is None else kernel, np.float64)
        m.weight.data = t(k.reshape(-1, m.weight.shape[0]).T.copy())
        if m.bias is not None:
            m.bias.data = t(np.asarray(p["bias"]).reshape(-1))
        return m

    def norm(p, dim):
        m = RMSNorm(dim) if decoder else LayerNorm(dim, eps=1e-6)
        m.weight.data = t(p["scale"])
        if not decoder:
            m.bias.data = t(p["bias"])
        return m

    class Block(tnn.Module):
        def __init__(self, p):
            super().__init__()
            dim = np.shape(p["attn"]["query"]["kernel"])[0]
            mlp_dim = np.shape((p["gate"] if decoder else p["mlp_in"])["kernel"])[1]
            self.ln1, self.ln2 = norm(p["ln1"], dim), norm(p["ln2"], dim)
            self.attn = Attention(dim, heads, bias=not decoder, causal=decoder)
            for name, key in [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")]:
                linear(getattr(self.attn, name), p["attn"][key])
            out = np.asarray(p["attn"]["out"]["kernel"])  # [H, hd, D]
            linear(self.attn.o_proj, p["attn"]["out"], out.reshape(-1, out.shape[-1]))
            if decoder:
                self.mlp = GatedMLP(dim, mlp_dim)
                for name, key in [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]:
                    linear(getattr(self.mlp, name), p[key])
            else:
                self.mlp = MLP(dim, mlp_dim)
                linear(self.mlp.up_proj, p["mlp_in"])
                linear(self.mlp.down_proj, p["mlp_out"])

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            blocks = sorted(k for k in params if k.startswith("block_"))
            self.blocks = tnn.ModuleList(Block(params[k]) for k in blocks)
            dim = np.shape(params["head"]["kernel"])[0]
            self.ln = norm(params["ln"], dim)
            self.head = linear(
                tnn.Linear(dim, np.shape(params["head"]["kernel"])[1]), params["head"]
            )
            if not decoder:
                k = np.asarray(params["embed"]["kernel"], np.float64)  # HWIO
                self.embed = tnn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride=k.shape[:2])
                self.embed.weight.data = t(k.transpose(3, 2, 0, 1).copy())
                self.embed.bias.data = t(params["embed"]["bias"])
                self.register_buffer("cls", t(params["cls"]))
                self.register_buffer("pos", t(params["pos"]))

        def forward(self, x):
            if not decoder:  # NHWC images
                x = self.embed(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
            for block in self.blocks:
                x = block(x)
            x = self.ln(x)
            return self.head(x[:, -1] if decoder else x[:, 0])

    return Twin().to(getattr(torch, dtype)).eval()


@contextlib.contextmanager
def _lxt_zennit():
    """LXT's zennit patch (ε rules in the gradient × input framework), undone afterwards: it
    rewrites zennit's ``BasicHook`` for the whole process."""
    from lxt.efficient import monkey_patch_zennit
    from zennit.core import BasicHook

    saved = {name: BasicHook.__dict__[name] for name in ("forward", "backward")}
    monkey_patch_zennit()
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(BasicHook, name, fn)


def lxt_relevance(twin, x, target, epsilon=1e-6) -> np.ndarray:
    """LXT's relevance of ``x`` (input × modified gradient) for ``target`` ``[B]`` on a
    ``transformer_twin``: zennit's ε on every ``nn.Linear`` and ``nn.Conv2d`` through LXT's
    ``monkey_patch_zennit``, seeded with ``one_hot(target)`` on the logits."""
    import torch
    from torch import nn as tnn
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon

    dtype = next(twin.parameters()).dtype
    xt = torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True)
    composite = LayerMapComposite(
        [(tnn.Linear, Epsilon(epsilon=epsilon)), (tnn.Conv2d, Epsilon(epsilon=epsilon))]
    )
    with _lxt_zennit(), composite.context(twin) as model:
        logits = model(xt)
        seed = torch.nn.functional.one_hot(
            torch.tensor(np.asarray(target, np.int64)), logits.shape[-1]
        )
        (logits * seed).sum().backward()
    return (xt * xt.grad).detach().numpy()


def twin_logits(twin, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return twin(torch.tensor(np.asarray(x), dtype=next(twin.parameters()).dtype)).numpy()
