"""Class activation maps on a named conv layer: Grad-CAM and Score-CAM.

Both take ``(f, x, target=None, *, layer=None, ...)`` like every method and return ``[B, H, W]`` maps
upsampled bilinearly to the input (``upsample=False`` gives the layer's resolution). ``layer`` names
a layer as LRP does (a module path; default the last convolution); its *output* is used (for a
convolution: before its activation), as pytorch-grad-cam does with a conv module as target layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.explain import engine
from lenet_jax.explain.common import attribution_method, auto_batch_size, chunked_map, prepare
from lenet_jax.explain.graph import evaluate, trace


def _layer_value(plan: engine.Plan, layer: str | None) -> int:
    """Id of the named layer's output (default: the last convolution's)."""
    convs = [n.name for n in plan.linear if n.kind == "conv"]
    if layer is None:
        if not convs:
            raise ValueError("the model has no convolution for a CAM; name a layer with layer=")
        layer = convs[-1]
    if layer not in plan.layers:
        raise ValueError(f"unknown layer {layer!r}; the convolutions are {convs}")
    i = plan.layers[layer]
    if len(plan.graph.shapes[i].shape) != 4:
        raise ValueError(
            f"layer {layer!r} is not a feature map [B, h, w, K]; choose one of {convs}"
        )
    return i


def layer_activations(f, x, layer: str | None = None):
    """``(A, head)``: the named layer's output ``[B, h, w, K]`` and ``A -> logits``.

    ``head`` recomputes the model from ``x`` with the layer's output replaced by its argument, so
    paths that bypass the layer (a residual skip) still see ``x``.

    Args:
      f: the model (``x -> logits``), as for every method.
      x: the input batch.
      layer: a layer name (a module path; default: the last convolution). For a convolution the
        output is the convolution's, before any activation or BatchNorm module after it, as
        pytorch-grad-cam's target layer.
    """
    graph = trace(f, x)
    i = _layer_value(engine.plan(graph), layer)
    acts = evaluate(graph, x)[i]
    return acts, lambda a: evaluate(graph, x, {i: a})[graph.output]


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool = False) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear interpolation from ``n_in`` to ``n_out`` samples.

    ``align_corners=False``: half-pixel centres, edges clamped (``jax.image.resize``'s bilinear
    upsampling, ``F.interpolate(..., align_corners=False)``, OpenCV's ``INTER_LINEAR``).
    ``align_corners=True``: the first and last samples coincide (``torch.nn.UpsamplingBilinear2d``,
    which pytorch-grad-cam's Score-CAM uses for its masks).
    """
    out = np.arange(n_out, dtype=np.float64)
    if align_corners:
        pos = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    else:
        pos = np.clip((out + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _upsample(maps_Bhw, size, align_corners: bool = False):
    """Bilinear resize of ``[B, h, w]`` (or ``[B, h, w, K]``) maps to ``size``: two small matmuls."""
    mh = interpolation_matrix(maps_Bhw.shape[1], size[0], align_corners).astype(maps_Bhw.dtype)
    mw = interpolation_matrix(maps_Bhw.shape[2], size[1], align_corners).astype(maps_Bhw.dtype)
    return jnp.einsum("Hh,bhw...,Ww->bHW...", mh, maps_Bhw, mw)


def _normalize(cam_BHW):
    lo = cam_BHW.min(axis=(1, 2), keepdims=True)
    hi = cam_BHW.max(axis=(1, 2), keepdims=True)
    return jnp.where(hi > lo, (cam_BHW - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


@attribution_method
def grad_cam(
    f,
    x,
    target=None,
    *,
    layer: str | None = None,
    upsample: bool = True,
    normalize: bool = False,
    batch_size: int | None = None,
):
    """Grad-CAM (Selvaraju et al., 2017): ``ReLU(Σ_k α_k A^k)``, ``α_k`` = spatial mean of
    ``∂ logit[target] / ∂A^k``.

    Args:
      layer: name of a conv layer (default: the last one).
      upsample: resize bilinearly to the input's ``H x W``.
      normalize: scale each map to [0, 1] (all-zero maps stay zero).
      batch_size: images per chunk (``lax.map``); ``None``: chunks within
        ``common.MEMORY_BUDGET`` (the whole batch when it fits).

    Returns:
      ``[B, H, W]`` (or ``[B, h, w]`` without ``upsample``).
    """
    _, t = prepare(f, x, target)  # the layer's values come from the graph evaluator (in CPU forms)

    def chunk(args):
        xc, tc = args
        acts, head = layer_activations(f, xc, layer)
        score = lambda a: jnp.sum(jnp.take_along_axis(head(a), tc[:, None], 1))  # noqa: E731
        alpha = jax.grad(score)(acts).mean(axis=(1, 2))  # [b, K]
        return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", acts, alpha))

    cam = chunked_map(chunk, (x, t), auto_batch_size(f, x, 1, batch_size))
    if upsample:
        cam = _upsample(cam, x.shape[1:3])
    return _normalize(cam) if normalize else cam


@attribution_method
def score_cam(
    f,
    x,
    target=None,
    *,
    layer: str | None = None,
    upsample: bool = True,
    normalize: bool = False,
    baseline_subtract: bool = False,
    align_corners: bool = False,
    batch_size: int | None = None,
):
    """Score-CAM (Wang et al., 2020): each channel's upsampled, min-max-normalized activation masks
    the input; the target logits of the masked inputs, softmaxed over channels, weight the channels.

    The default follows pytorch-grad-cam (masks multiply the *normalized* input; weights =
    ``softmax_k(logit_target(x ⊙ H_k))``; ``ReLU`` of the weighted sum of activations). With
    ``baseline_subtract`` the weights are the paper's increase of confidence,
    ``p_target(x ⊙ H_k) − p_target(0)``, where ``0`` is the all-masked input (no softmax over channels).
    A constant channel gets a zero mask (the division is guarded). The masks are upsampled with
    half-pixel centres, as the paper's code does; ``align_corners=True`` aligns the corner pixels
    instead, as pytorch-grad-cam's ``torch.nn.UpsamplingBilinear2d`` does (the two libraries' maps
    then agree to float rounding).

    Args:
      layer: name of a conv layer (default: the last one).
      upsample, normalize: as ``grad_cam``.
      baseline_subtract: the paper's weights instead of pytorch-grad-cam's.
      align_corners: upsample the masks with aligned corners (pytorch-grad-cam's masks).
      batch_size: images per chunk (``lax.map``); all K masked copies of an image run in one pass.
        ``None``: chunks within ``common.MEMORY_BUDGET``.

    Returns:
      ``[B, H, W]`` (or ``[B, h, w]`` without ``upsample``).
    """

    fast, t = prepare(f, x, target)
    hw = x.shape[1:3]

    def one_image(args):
        xi, ti = args
        acts = layer_activations(f, xi[None], layer)[0][0]  # [h, w, K]
        up = _upsample(acts[None], hw, align_corners)[0]  # [H, W, K]
        lo, hi = up.min(axis=(0, 1), keepdims=True), up.max(axis=(0, 1), keepdims=True)
        span = hi - lo
        masks = jnp.where(span > 0, (up - lo) / jnp.where(span > 0, span, 1.0), 0.0)
        masked = xi[None] * jnp.moveaxis(masks, -1, 0)[..., None]  # [K, H, W, C]
        logits = fast(masked)
        if baseline_subtract:
            base = jax.nn.softmax(fast(jnp.zeros_like(xi)[None]))[0, ti]
            weights = jax.nn.softmax(logits)[:, ti] - base
        else:
            weights = jax.nn.softmax(logits[:, ti])
        return jax.nn.relu(jnp.einsum("hwk,k->hw", acts, weights))

    acts = jax.eval_shape(lambda v: layer_activations(f, v, layer)[0], x[:1])
    channels = acts.shape[-1]  # masked copies per image
    chunk_size = auto_batch_size(f, x, channels + 1, batch_size)
    cam = chunked_map(lambda a: jax.vmap(one_image)(a), (x, t), chunk_size)
    if upsample:
        cam = _upsample(cam, hw)
    return _normalize(cam) if normalize else cam
