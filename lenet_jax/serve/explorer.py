"""The explorer's computation, free of any web framework: requests in, JSON-ready answers out.

Every explanation function is compiled at start-up for one image of the model's input shape and a
traced target, so no request compiles anything (``Explorer.traces`` counts the traces).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, explain, models
from lenet_jax.attribution import explainer, with_dataset_options
from lenet_jax.data import DataError, get_dataset, load_dataset
from lenet_jax.image_files import decode_image

# The methods a request gets when it names none: every one but occlusion (the slowest by far).
DEFAULT_METHODS = tuple(m for m in explain.METHODS if m != "occlusion")
# What the page's methods compute; the library's defaults otherwise.
OPTIONS = {"occlusion": {"window": 4, "stride": 2}}


class RequestError(ValueError):
    """A request the explorer cannot answer; the message is one line for the user."""


class Explorer:
    """A trained run, ready to explain single drawings.

    Args:
      run_dir: the run folder (its newest checkpoint is used, or ``epoch``'s).
      data_dir, data_source: where the test set comes from, for the random and misclassified
        digits; without it those buttons are off and everything else works.
      log: called with progress messages at start-up.
    """

    def __init__(self, run_dir, *, epoch=None, data_dir=None, data_source=None, log=print):
        self.run_dir = Path(run_dir)
        self.model, self.params, self.meta = checkpoint.load_params(run_dir, epoch)
        self.dataset = get_dataset(self.meta["dataset"])
        self.inputs = models.model_input(self.model, self.dataset.name)
        if self.dataset.image_shape != (28, 28, 1):
            raise ValueError(
                f"the explorer draws gray 28x28 digits; this run's {self.model.name} takes "
                f"{self.dataset.title} images of shape {self.dataset.image_shape}"
            )
        self.default_composite = models.default_composite(self.model)  # AttnLRP for a ViT
        self.traces = 0  # how often any function was traced: only at start-up
        self.feature_layer = self._feature_layer()
        t0 = time.perf_counter()
        log(f"Compiling {len(explain.METHODS) + len(explain.COMPOSITES)} explanation functions ...")
        self._compile()
        log(f"Compiled in {time.perf_counter() - t0:.1f} s")
        self.test_images, self.test_labels, self.wrong = self._test_set(data_dir, data_source)

    # ------------------------------------------------------------------ start-up

    def _feature_layer(self) -> str | None:
        """The last convolution with a spatial extent: its feature maps' relevance is shown."""
        x = jnp.zeros((1, *self.inputs.shape), jnp.float32)
        rels = jax.eval_shape(
            lambda v: explain.lrp_layerwise(self._f(self.params), v, **self._lrp_options()), x
        )
        nodes = explain.lrp_nodes(self._f(self.params), x)
        maps = [k for k, kind in nodes.items() if kind == "conv" and k in rels]
        maps = [k for k in maps if len(rels[k].shape) == 4 and rels[k].shape[1] > 1]
        return maps[-1] if maps else None

    def _f(self, params):
        return models.explained(self.model, params)

    def _lrp_options(self, **options) -> dict:
        """LRP's options with the model's dataset bounds (zᴮ), as the command lines use them."""
        return with_dataset_options("lrp", self.model, self.dataset.name, options)

    def _compile(self) -> None:
        """Traces every function for one image and a traced target, then compiles them all, in
        parallel threads (XLA's compiler releases the GIL)."""
        x = jax.ShapeDtypeStruct((1, *self.inputs.shape), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        lowered = {("probabilities", None): self._jit(self._probabilities_of).lower(self.params, x)}
        for name in explain.METHODS:
            if name != "lrp":
                lowered["method", name] = self._jit(self._map_of(name)).lower(self.params, x, t)
        for name in explain.COMPOSITES:
            lowered["lrp", name] = self._jit(self._lrp_of(name)).lower(self.params, x, t)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            done = pool.map(lambda low: low.compile(), lowered.values())
            compiled = dict(zip(lowered, done, strict=True))
        self._probabilities = compiled["probabilities", None]
        self._methods = {name: fn for (kind, name), fn in compiled.items() if kind == "method"}
        self._lrp = {name: fn for (kind, name), fn in compiled.items() if kind == "lrp"}

    def _jit(self, fn):
        def counted(*args):
            self.traces += 1
            return fn(*args)

        return jax.jit(counted)

    def _probabilities_of(self, params, x):
        return jax.nn.softmax(self._f(params)(x))[0]

    def _map_of(self, name: str):
        spec = jax.ShapeDtypeStruct((1, *self.inputs.shape), jnp.float32)
        fn = explainer(name, self.model, spec, self.dataset.name, **OPTIONS.get(name, {}))

        def heatmap(params, x, target):
            out = fn(params, x, target)[0]
            return out.sum(-1) if out.ndim == 3 else out  # [H, W]

        return heatmap

    def _lrp_of(self, composite: str):
        options = self._lrp_options(composite=composite)
        layer = self.feature_layer

        def relevance(params, x, target):
            f = self._f(params)
            rels = explain.lrp_layerwise(f, x, target, **options)
            heat = rels["input"][0].sum(-1)
            logit = f(x)[0, target[0]]
            maps = rels[layer][0].sum((0, 1)) if layer else jnp.zeros((0,), heat.dtype)
            return heat, maps, heat.sum(), logit

        return relevance

    def _test_set(self, data_dir, data_source):
        """The test images, labels and misclassified indices, or empty arrays without a source."""
        from lenet_jax.predict import predict

        try:
            images, labels = load_dataset(
                self.dataset.name, "test", data_dir=data_dir, source=data_source, progress=False
            )
        except DataError:
            return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int32), np.zeros((0,), int)
        pred = predict(self.model, self.params, jnp.asarray(images), self.dataset.name).argmax(1)
        return images, labels, np.flatnonzero(pred != labels)

    # ------------------------------------------------------------------ requests

    def info(self) -> dict[str, Any]:
        """What ``GET /api/info`` answers: the model, its classes and what can be asked."""
        return {
            "run": self.run_dir.name,
            "model": models.describe(self.meta["model"]),
            "dataset": self.dataset.name,
            "dataset_title": self.dataset.title,
            "classes": list(self.dataset.classes),
            "image_size": 28,
            "input_size": int(self.inputs.size),
            "methods": list(explain.METHODS),
            "default_methods": list(DEFAULT_METHODS),
            "signed": dict(explain.SIGNED),
            "composites": list(explain.COMPOSITES),
            "default_composite": self.default_composite,
            "feature_layer": self.feature_layer,
            "test_digits": len(self.test_labels),
            "misclassified": len(self.wrong),
            "test_accuracy": self.meta.get("test", {}).get("accuracy"),
        }

    def digit(self, kind: str, rng: np.random.Generator) -> dict[str, Any]:
        """A random test digit (``kind="random"``) or a random misclassified one."""
        pool = {"random": np.arange(len(self.test_labels)), "misclassified": self.wrong}.get(kind)
        if pool is None:
            raise RequestError(f"unknown kind {kind!r}; choose random or misclassified")
        if len(pool) == 0:
            raise RequestError(f"no {kind} test digit: the test set could not be loaded")
        i = int(rng.choice(pool))
        image = self.test_images[i] / 255.0
        return {"index": i, "label": int(self.test_labels[i]), "image": image.tolist()}

    def explain(self, request: Any) -> dict[str, Any]:
        """Answers ``POST /api/explain`` (the contract: ``lenet_jax/serve/app.py``).

        Raises:
          RequestError: anything wrong with the request, in one line.
        """
        started = time.perf_counter()
        if not isinstance(request, dict):
            raise RequestError("the body must be a JSON object")
        unknown = set(request) - {"image", "png", "methods", "target", "composite"}
        if unknown:
            raise RequestError(f"unknown field {sorted(unknown)[0]!r}")
        image = self._image(request)
        methods = self._methods_of(request.get("methods"))
        composite = request.get("composite")
        composite = self.default_composite if composite is None else composite
        if not isinstance(composite, str) or composite not in explain.COMPOSITES:
            raise RequestError(
                f"unknown composite {composite!r}; choose one of {list(explain.COMPOSITES)}"
            )
        x = self.inputs.preprocess(jnp.asarray(image * 255.0, jnp.float32)[None])
        probs = np.asarray(self._probabilities(self.params, x))
        predicted = int(probs.argmax())
        target = self._target_of(request.get("target"), predicted)
        t = jnp.asarray([target], jnp.int32)
        answer: dict[str, Any] = {
            "probabilities": probs.tolist(),
            "predicted": predicted,
            "target": target,
            "heatmaps": {},
        }
        for name in methods:
            if name == "lrp":
                heat, maps, total, logit = self._lrp[composite](self.params, x, t)
                answer["lrp"] = {
                    "composite": composite,
                    "layer": self.feature_layer,
                    "feature_maps": np.asarray(maps).tolist(),
                    "relevance_sum": float(total),
                    "logit": float(logit),
                }
            else:
                heat = self._methods[name](self.params, x, t)
            answer["heatmaps"][name] = np.asarray(heat).tolist()
        if "png" in request:
            answer["image"] = image.tolist()
        answer["ms"] = 1000 * (time.perf_counter() - started)
        return answer

    def _image(self, request: dict) -> np.ndarray:
        """The request's 28x28 image, float in [0, 1] (ink = 1)."""
        if ("image" in request) == ("png" in request):
            raise RequestError('give exactly one of "image" (28x28 floats in [0, 1]) and "png"')
        if "png" in request:
            data = request["png"]
            if not isinstance(data, str):
                raise RequestError('"png" must be a base64 string')
            try:
                raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
            except binascii.Error as e:
                raise RequestError(f'"png" is not base64: {e}') from None
            try:  # a PNG, a JPEG or any picture Pillow reads, its size checked first
                return decode_image(raw, self.dataset.name) / 255.0
            except ValueError as e:
                raise RequestError(str(e).splitlines()[0]) from None
        image = _numbers(request["image"])
        if image.shape != (28, 28):
            raise RequestError(f'"image" must be 28x28, got shape {list(image.shape)}')
        if not np.isfinite(image).all():
            raise RequestError('"image" holds NaN or infinite values')
        if image.min() < 0 or image.max() > 1:
            raise RequestError('"image" values must lie in [0, 1] (ink = 1)')
        return image

    @staticmethod
    def _methods_of(methods) -> list[str]:
        if methods is None:
            return list(DEFAULT_METHODS)
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise RequestError('"methods" must be a list of method names')
        bad = [m for m in methods if m not in explain.METHODS]
        if bad:
            raise RequestError(f"unknown method {bad[0]!r}; choose from {list(explain.METHODS)}")
        return list(dict.fromkeys(methods))

    def _target_of(self, target, predicted: int) -> int:
        if target is None:
            return predicted
        k = len(self.dataset.classes)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
            raise RequestError(f'"target" must be null or a class 0..{k - 1}, got {target!r}')
        return target


def _numbers(value) -> np.ndarray:
    """A JSON array of arrays of numbers as float64: strings, booleans and numbers beyond float64
    (``1e400`` arrives as an int) are refused."""
    rows = value if isinstance(value, list) else None
    if rows is None or not all(isinstance(row, list) for row in rows):
        raise RequestError('"image" must be 28 rows of 28 numbers')
    for row in rows:
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise RequestError(f'"image" must hold numbers, got {type(v).__name__} {v!r:.20}')
    try:
        return np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except OverflowError:
        raise RequestError('"image" holds a number too large for a float') from None
    except ValueError:  # rows of different lengths
        raise RequestError('"image" must be 28 rows of 28 numbers') from None
