"""Gradient-based attributions and occlusion, batched with ``vmap`` and jit-friendly.

All take ``(f, x, target=None, **options)``, with ``f`` the model (``x [B, ...] -> logits [B, K]``)
and ``x`` its input batch, and return an array of ``x.shape``. The explained score is the target
class's logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.explain.common import (
    attribution_method,
    auto_batch_size,
    chunked_map,
    prepare,
    target_logit,
)


def _grad_of_target(f, x, target_B):
    """``d logit[target] / dx`` for every sample, ``x.shape``."""
    score = target_logit(f, target_B)
    return jax.grad(lambda v: jnp.sum(score(v)))(x)


def _chunked_grad(f, fast, x, t, batch_size):
    """``_grad_of_target`` of ``fast`` (``f`` as the methods run it) in chunks within
    ``common.MEMORY_BUDGET`` (or of ``batch_size``)."""
    size = auto_batch_size(f, x, 1, batch_size)
    return chunked_map(lambda a: _grad_of_target(fast, a[0], a[1]), (x, t), size)


@attribution_method
def saliency(f, x, target=None, *, absolute: bool = True, batch_size: int | None = None):
    """Gradient of the target logit w.r.t. the input (Simonyan et al., 2014).

    Args:
      absolute: return ``|gradient|`` (captum's ``Saliency`` default); ``False`` keeps the sign.
      batch_size: images per chunk (``lax.map``); ``None``: chunks within
        ``common.MEMORY_BUDGET`` (the whole batch when it fits).

    Returns:
      ``[B, H, W, C]``.
    """
    fast, t = prepare(f, x, target)
    g = _chunked_grad(f, fast, x, t, batch_size)
    return jnp.abs(g) if absolute else g


@attribution_method
def gradient_x_input(f, x, target=None, *, batch_size: int | None = None):
    """Gradient ⊙ input (Shrikumar et al., 2016), ``[B, H, W, C]``; ``batch_size`` as
    ``saliency``'s."""
    fast, t = prepare(f, x, target)
    return x * _chunked_grad(f, fast, x, t, batch_size)


@attribution_method
def smoothgrad(
    f,
    x,
    target=None,
    *,
    n_samples: int = 50,
    noise_level: float = 0.15,
    variant: str = "smoothgrad",
    key: jax.Array | None = None,
    batch_size: int | None = None,
):
    """SmoothGrad (Smilkov et al., 2017): gradients averaged over noisy copies of each input.

    The noise is Gaussian with ``σ = noise_level · (max(x_i) − min(x_i))`` per image, the convention
    of the SmoothGrad paper and zennit; the paper recommends 10–20%. The target is fixed on the clean
    input. All noisy copies run in one ``vmap``.

    Args:
      n_samples: noisy copies per image.
      noise_level: σ relative to each image's value range; 0 gives the plain gradient.
      variant: ``"smoothgrad"`` (mean gradient), ``"squared"`` (SmoothGrad², mean of squares) or
        ``"vargrad"`` (variance of the gradients).
      key: PRNG key of the noise (default ``jax.random.key(0)``: same noise, same result);
        ``smoothgrad_noise`` returns the noisy inputs it draws.
      batch_size: images per chunk (``lax.map``); ``None``: chunks that keep the noisy copies
        within ``common.MEMORY_BUDGET``.

    Returns:
      ``[B, H, W, C]`` (signed for ``"smoothgrad"``).
    """
    if variant not in ("smoothgrad", "squared", "vargrad"):
        raise ValueError(
            f"unknown SmoothGrad variant {variant!r}; choose smoothgrad, squared or vargrad"
        )
    _check_noise(n_samples, noise_level)
    fast, t = prepare(f, x, target)
    keys = _image_keys(key, x.shape[0])

    def chunk(args):
        xc, tc, kc = args  # [b, H, W, C], [b], [b] keys
        noisy = _noisy_copies(xc, kc, n_samples, noise_level)  # [b, n, H, W, C]
        grads = _flat_grad(fast, noisy, tc)
        uniform = np.full(n_samples, 1.0 / n_samples)
        if variant == "smoothgrad":
            return _weighted_sum(uniform, grads)
        if variant == "squared":
            return _weighted_sum(uniform, jnp.square(grads))
        mean = _weighted_sum(uniform, grads)
        return _weighted_sum(uniform, jnp.square(grads - mean[:, None]))

    return chunked_map(chunk, (x, t, keys), auto_batch_size(f, x, n_samples, batch_size))


def smoothgrad_noise(x, *, n_samples: int = 50, noise_level: float = 0.15, key=None):
    """The noisy inputs ``smoothgrad`` averages over, for the same options and key.

    Image ``i`` gets ``n_samples`` copies ``x_i + σ_i · N(0, 1)`` with
    ``σ_i = noise_level · (max(x_i) − min(x_i))``, drawn from the ``i``-th of ``key`` split
    ``B`` ways (so an image's noise does not depend on the chunking).

    Returns:
      ``[B, n_samples, H, W, C]``.
    """
    _check_noise(n_samples, noise_level)
    return _noisy_copies(x, _image_keys(key, x.shape[0]), n_samples, noise_level)


def _check_noise(n_samples, noise_level):
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")


def _image_keys(key, n):
    return jax.random.split(jax.random.key(0) if key is None else key, n)


def _noisy_copies(x_B, keys_B, n_samples, noise_level):
    def copies(xi, ki):
        sigma = noise_level * (jnp.max(xi) - jnp.min(xi))
        return xi[None] + sigma * jax.random.normal(ki, (n_samples, *xi.shape), xi.dtype)

    return jax.vmap(copies)(x_B, keys_B)


def _weighted_sum(weights_N, xs_BN, unroll_max: int = 256):
    """``Σ_i weights[i] · xs[:, i]`` for ``[B, N, ...]`` and static weights ``[N]``.

    Written as ``N`` multiply-adds of slices, which XLA fuses into one loop; its CPU reduction (and
    dot) over the middle axis ran 25% of SmoothGrad's time. Beyond ``unroll_max`` terms, a tensordot.
    """
    weights_N = np.asarray(weights_N)
    if len(weights_N) > unroll_max:
        return jnp.tensordot(jnp.asarray(weights_N, xs_BN.dtype), xs_BN, axes=([0], [1]))
    total = 0
    for i, w in enumerate(weights_N.tolist()):
        total = total + w * xs_BN[:, i]
    return total


def _flat_grad(f, xs_BN, target_B):
    """Gradients of the target logits for ``[B, N, ...]`` inputs, in one ``[B*N]`` batch."""
    b, n = xs_BN.shape[:2]
    flat = xs_BN.reshape(b * n, *xs_BN.shape[2:])
    return _grad_of_target(f, flat, jnp.repeat(target_B, n)).reshape(xs_BN.shape)


@attribution_method
def integrated_gradients(
    f,
    x,
    target=None,
    *,
    baseline=None,
    n_steps: int = 50,
    method: str = "riemann_trapezoid",
    return_gap: bool = False,
    batch_size: int | None = None,
):
    """Integrated Gradients (Sundararajan et al., 2017) along the straight path from a baseline.

    Args:
      baseline: scalar or array broadcastable to ``x``; default 0, as captum's. For normalized
        images the black image is usually meant (``-mean/std``; for the package's datasets
        ``lenet_jax.data.normalized_range(name)[0]``).
      n_steps: points of the quadrature.
      method: ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``, ``"riemann_trapezoid"``
        or ``"gausslegendre"`` — the point sets of captum's ``IntegratedGradients``. The weights
        sum to 1; captum's ``riemann_trapezoid`` weights sum to ``(n−1)/n`` (its attributions are
        ours times ``(n−1)/n``).
      return_gap: also return the completeness gap ``f(x) − f(baseline) − Σ IG`` per sample.
      batch_size: images per chunk (``lax.map``); ``None``: chunks within
        ``common.MEMORY_BUDGET``.

    Returns:
      ``[B, H, W, C]`` attributions, or ``(attributions, gap [B])`` with ``return_gap``.
    """
    fast, t = prepare(f, x, target)
    x0 = jnp.broadcast_to(jnp.asarray(0.0 if baseline is None else baseline, x.dtype), x.shape)
    alphas, weights = _quadrature(method, n_steps)
    alphas = jnp.asarray(alphas, x.dtype)

    def chunk(args):
        xc, x0c, tc = args
        a = alphas.reshape((1, -1) + (1,) * (xc.ndim - 1))
        paths = x0c[:, None] + a * (xc - x0c)[:, None]
        grads = _flat_grad(fast, paths, tc)  # [b, n_steps, ...]
        return (xc - x0c) * _weighted_sum(weights, grads)

    ig = chunked_map(chunk, (x, x0, t), auto_batch_size(f, x, n_steps, batch_size))
    if not return_gap:
        return ig
    score = target_logit(fast, t)
    gap = score(x) - score(x0) - ig.reshape(ig.shape[0], -1).sum(1)
    return ig, gap


def _quadrature(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1] and weights summing to 1, as captum's ``approximation_methods``."""
    if n < 1:
        raise ValueError(f"n_steps must be >= 1, got {n}")
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (points + 1), 0.5 * weights
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return np.linspace(0, 1, n), w
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if method not in offsets:
        raise ValueError(
            f"unknown integration method {method!r}; choose one of "
            f"{sorted([*offsets, 'riemann_trapezoid', 'gausslegendre'])}"
        )
    return (np.arange(n) + offsets[method]) / n, np.full(n, 1.0 / n)


@attribution_method
def occlusion(
    f,
    x,
    target=None,
    *,
    window: int = 4,
    stride: int = 2,
    baseline=None,
    batch_size: int | None = None,
):
    """Occlusion (Zeiler & Fergus, 2014): the drop of the target logit when a window is occluded.

    Each pixel gets the mean drop over the windows that cover it (captum's ``Occlusion`` with
    ``sliding_window_shapes=(C, window, window)`` and ``strides=stride``). All occluded copies of a
    chunk of images are evaluated in one batched forward pass.

    Args:
      window: side of the square window.
      stride: step between windows.
      baseline: value put in the window: a scalar or one value per channel; default 0 (captum's).
      batch_size: images per chunk (``lax.map``); ``None``: chunks within
        ``common.MEMORY_BUDGET``.

    Returns:
      ``[B, H, W, C]`` (the same value in every channel of a pixel).
    """
    fast, t = prepare(f, x, target)
    if x.ndim != 4:
        raise ValueError(f"occlusion needs NHWC images [B, H, W, C], got shape {tuple(x.shape)}")
    h, w = x.shape[1:3]
    if not 1 <= window <= min(h, w) or stride < 1:
        raise ValueError(f"need 1 <= window <= {min(h, w)} and stride >= 1, got {window}, {stride}")
    base = 0.0 if baseline is None else baseline
    base = jnp.broadcast_to(jnp.asarray(base, x.dtype), x.shape[-1:]).reshape(1, 1, 1, 1, -1)
    rows = np.arange(0, h - window + 1, stride)
    cols = np.arange(0, w - window + 1, stride)
    masks = np.zeros((len(rows) * len(cols), h, w), np.float32)
    for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
        masks[k, r : r + window, c : c + window] = 1.0
    masks = jnp.asarray(masks, x.dtype)[..., None]  # [M, H, W, 1]
    coverage = jnp.maximum(masks.sum(0), 1.0)

    def chunk(args):
        xc, tc = args  # [b, H, W, C], [b]
        occluded = xc[:, None] * (1 - masks[None]) + base * masks[None]
        both = jnp.concatenate([xc[:, None], occluded], axis=1)
        m = both.shape[1]
        score = target_logit(fast, jnp.repeat(tc, m))
        scores = score(both.reshape(-1, *xc.shape[1:])).reshape(-1, m)
        drops = scores[:, :1] - scores[:, 1:]  # [b, M]
        heat = jnp.tensordot(drops, masks[..., 0], axes=1) / coverage[None, ..., 0]  # [b, H, W]
        return jnp.broadcast_to(heat[..., None], xc.shape)

    chunk_size = auto_batch_size(f, x, len(masks) + 1, batch_size)
    return chunked_map(chunk, (x, t), chunk_size)
