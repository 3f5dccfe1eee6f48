"""Transformers as Flax users write them, for the AttnLRP tests against LXT 2.1.

The Flax side: the package's Linen ``ViT``, the same ViT in NNX (``nnx.MultiHeadAttention``,
``nnx.LayerNorm``), and a causal decoder on embedding inputs (``nn.RMSNorm``, a causal mask, a
SwiGLU MLP, the last token to the head). All three share one parameter layout, so one torch twin
builder takes any of them.

Their PyTorch twins, patched by LXT: ``twins.transformer_twin``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
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
