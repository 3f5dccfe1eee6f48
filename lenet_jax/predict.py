"""Prediction and the test report: logits of many images in jitted batches, and their metrics."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import parallel
from lenet_jax.models import model_input
from lenet_jax.train import compute_metrics, summarize, training_model


def predict(model, params, images, dataset: str = "mnist", *, batch_size: int = 1000, mesh=None):
    """Logits for uint8 ``images`` of ``dataset`` (the run's), in jitted batches of one shape.

    With a ``mesh``, each batch is split over its devices.

    Returns:
      float32 ``[N, num_classes]`` numpy array.
    """
    apply = functools.partial(_logits, model, model_input(model, dataset))
    n = images.shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = jnp.concatenate([chunk, jnp.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        logits = parallel.sharded_call(apply, mesh, params, chunk)
        out.append(np.asarray(logits)[: chunk.shape[0] - pad])
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(model, inputs, params, images):
    """The logits of uint8 ``images``, in the model's ``training_model`` form (faster on the CPU)."""
    return training_model(model).apply({"params": params}, inputs.preprocess(images))


def classification_report(logits_NK: np.ndarray, labels_N: np.ndarray) -> dict[str, Any]:
    """Test metrics from logits.

    Returns:
      Dict with ``loss`` (mean cross-entropy), ``accuracy``, ``correct``, ``count``,
      ``top3_accuracy``, ``per_class_accuracy`` (list of K) and ``confusion`` (K x K list, rows =
      true class, columns = predicted).
    """
    logits = jnp.asarray(logits_NK)
    sums = compute_metrics(logits, jnp.asarray(labels_N))
    k = logits_NK.shape[1]
    pred = logits_NK.argmax(1)
    top3 = np.argsort(-logits_NK, axis=1)[:, :3]
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels_N, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {
        **summarize(sums),
        "correct": int((pred == labels_N).sum()),
        "count": int(labels_N.shape[0]),
        "top3_accuracy": float((top3 == labels_N[:, None]).any(1).mean()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
