"""Transformers as Flax users write them, and PyTorch twins explained by LXT 2.1's AttnLRP.

The Flax side: the package's Linen ``ViT``, the same ViT in NNX (``nnx.MultiHeadAttention``,
``nnx.LayerNorm``), and a causal decoder on embedding inputs (``nn.RMSNorm``, a causal mask, a
SwiGLU MLP, the last token to the head). All three share one parameter layout, so one torch twin
builder takes any of them.

The torch side is a second implementation of each architecture whose modules LXT's own patches
rewrite, as LXT does for its Hugging Face models (``lxt.efficient.patches``): the attention wrapped
by ``wrap_attention_forward`` (gradients of q, k divided by 4, of v by 2) or, for CP-LRP,
``cp_wrap_attention_forward`` (q, k detached); LayerNorm and RMSNorm by ``layer_norm_forward`` and
``rms_norm_forward`` (the statistic detached; the RMSNorm patch computes in float32); the GELU MLP
by ``mlp_forward`` (identity rule on the activation); the SwiGLU MLP by ``gated_mlp_forward`` (or
``cp_gated_mlp_forward``); ε = 1e-6 on every ``nn.Linear`` and ``nn.Conv2d`` through zennit with
LXT's ``monkey_patch_zennit``. Relevance is input × gradient, seeded with ``one_hot(target)`` on the
logits, so the output relevance is ``one_hot(target) * logit`` as ours.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenet_jax.models import ViT


class DecoderBlock(nn.Module):
    """A Llama-style block: RMSNorm, causal self-attention, RMSNorm, SwiGLU MLP (no biases)."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.RMSNorm(name="ln1")(x)
        attn = nn.MultiHeadDotProductAttention(
            self.num_heads, use_bias=False, deterministic=True, name="attn"
        )
        x = x + attn(h, mask=mask)
        h = nn.RMSNorm(name="ln2")(x)
        gate = nn.Dense(self.mlp_dim, use_bias=False, name="gate")(h)
        up = nn.Dense(self.mlp_dim, use_bias=False, name="up")(h)
        return x + nn.Dense(x.shape[-1], use_bias=False, name="down")(nn.silu(gate) * up)


class Decoder(nn.Module):
    """A causal text classifier on token embeddings ``[B, T, D]``: the last token's state, after a
    final RMSNorm, to a dense head."""

    depth: int = 2
    num_heads: int = 2
    mlp_dim: int = 24
    num_classes: int = 7

    @nn.compact
    def __call__(self, emb):
        x = emb
        for i in range(self.depth):
            x = DecoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x)
        return nn.Dense(self.num_classes, name="head")(nn.RMSNorm(name="ln")(x)[:, -1])


class NNXBlock(nnx.Module):
    def __init__(self, dim, heads, mlp_dim, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x)), approximate=False))


class NNXViT(nnx.Module):
    """The package's ViT written in NNX, with the same attribute names."""

    def __init__(self, *, channels=1, patch=7, dim=16, depth=2, heads=2, mlp_dim=24, tokens=16,
                 num_classes=10, rngs):  # fmt: skip
        self.patch, self.dim = patch, dim
        self.embed = nnx.Conv(channels, dim, (patch, patch), strides=(patch, patch),
                              padding="VALID", rngs=rngs)  # fmt: skip
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)) * 0.1)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, tokens + 1, dim)) * 0.1)
        for i in range(depth):
            setattr(self, f"block_{i}", NNXBlock(dim, heads, mlp_dim, rngs))
        self.depth = depth
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, self.dim))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
        for i in range(self.depth):
            x = getattr(self, f"block_{i}")(x)
        return self.head(self.ln(x)[:, 0])


def small_vit():
    return ViT(dim=16, depth=2, num_heads=2, mlp_dim=24)


def randomized(params, seed, scale=0.3):
    """``params`` in float64 with every leaf perturbed (non-zero biases, norm scales not 1)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        jnp.asarray(p, jnp.float64) + scale * jax.random.normal(k, p.shape, jnp.float64)
        for p, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, out)


# ----------------------------------------------------------------------------- the torch twins


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
            self.weight = tnn.Parameter(torch.ones(dim, dtype=torch.float64))
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


def torch_twin(kind: str, params, variant: str, heads: int):
    """The torch twin of a ``"vit"`` (Linen or NNX parameters) or ``"decoder"``, in float64."""
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
                self.cls, self.pos = t(params["cls"]), t(params["pos"])

        def forward(self, x):
            if not decoder:  # NHWC images
                x = self.embed(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
            for block in self.blocks:
                x = block(x)
            x = self.ln(x)
            return self.head(x[:, -1] if decoder else x[:, 0])

    return Twin().double().eval()


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
    """LXT's relevance of ``x`` (input × modified gradient) for ``target`` ``[B]``."""
    import torch
    from torch import nn as tnn
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon

    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
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
        return twin(torch.tensor(np.asarray(x, np.float64))).numpy()
