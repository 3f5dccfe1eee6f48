"""The package's models explained: a method of ``lenet_jax.explain`` as a function of the parameters,
with the options the model's dataset fills in (the zᴮ bounds, the black baseline) and its default LRP
composite. The glue behind the CLIs, the explorer, the evaluation and the benchmark; a user's own
model needs none of it (it calls ``lenet_jax.explain`` directly)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lenet_jax import explain, models


def explainer(name: str, model, x_spec, dataset: str = "mnist", **options) -> explain.Explainer:
    """``explainer(params, x, target=None) -> attribution``: method ``name`` prepared
    (``explain.prepare``) for a package model reading images of ``dataset`` (the run's), batches
    shaped like ``x_spec``.

    The dataset fills the options the method takes and ``options`` leaves unset
    (``models.dataset_options``: the zᴮ bounds of LRP, the black baseline of Integrated Gradients
    and occlusion).
    """
    opts = with_dataset_options(name, model, dataset, options)
    return explain.prepare(models.apply_fn(model), x_spec, name, **opts)


def with_dataset_options(
    name: str, model, dataset: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` with what ``dataset`` fills in among the options method ``name`` takes and
    ``options`` leaves unset (``models.dataset_options``: the zᴮ bounds of LRP, the black
    baseline of Integrated Gradients and occlusion), and LRP's composite
    (``models.default_composite``: AttnLRP for the ViT)."""
    accepted = explain.method_options(name)
    opts = dict(options)
    defaults = {**models.dataset_options(dataset), "composite": models.default_composite(model)}
    for key, value in defaults.items():
        if key in accepted and opts.get(key) is None:
            opts[key] = value
    return opts
