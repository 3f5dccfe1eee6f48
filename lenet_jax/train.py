"""Model-free training: the train state, the optimizer, one jitted step, epochs per backend.

On CPU the jitted step is dispatched from a Python loop; on GPU/TPU a whole epoch runs as one jitted
``lax.scan`` with the dataset resident on the device (XLA's CPU backend runs the scanned epoch several
times slower than the dispatched step, the GPU backend many times faster). Shuffling, batching and
preprocessing happen on the device either way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from lenet_jax import parallel
from lenet_jax.data import preprocess as mnist_preprocess


class TrainState(train_state.TrainState):
    """Params, optimizer state, step count and the PRNG key for dropout (a pytree)."""

    key: jax.Array


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def _setting(default, help: str, *, choices=None, check=None, what: str = ""):
    """A ``TrainConfig`` field with its documentation and its check: the one place a training
    setting is defined (``scripts/train.py`` makes its flags from these)."""
    metadata = {"help": help, "choices": choices, "check": check, "what": what}
    return dataclasses.field(default=default, metadata=metadata)


def _positive(v):
    return v > 0 and math.isfinite(v)


def _at_least(low, high=math.inf, *, below=False):
    """``low <= v <= high`` (``v < high`` with ``below``)."""
    return lambda v: low <= v and (v < high if below else v <= high)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run. The defaults are LeNet-5's recipe (SGD, lr 0.01, momentum
    0.9, batch 64, 10 epochs); ``lenet_jax.recipes`` holds each model's."""

    optimizer: str = _setting("sgd", "optimizer", choices=("sgd", "adam"))
    lr: float = _setting(0.01, "learning rate (peak)", check=_positive, what="a positive number")
    momentum: float = _setting(
        0.9, "SGD momentum", check=_at_least(0, 1, below=True), what="a number in [0, 1)"
    )
    schedule: str = _setting(
        "constant", "learning-rate schedule", choices=("constant", "cosine", "onecycle")
    )
    warmup_epochs: float = _setting(
        0.0, "linear warm-up, epochs (<= epochs)", check=_at_least(0), what="a number >= 0"
    )
    weight_decay: float = _setting(0.0, "weight decay", check=_at_least(0), what="a number >= 0")
    label_smoothing: float = _setting(
        0.0, "label smoothing", check=_at_least(0, 1, below=True), what="a number in [0, 1)"
    )
    augment_shift: float = _setting(
        0.0, "random shifts, pixels", check=_at_least(0, 8), what="a number in [0, 8]"
    )
    augment_rotate: float = _setting(
        0.0, "random rotations, degrees", check=_at_least(0, 45), what="a number in [0, 45]"
    )
    batch_size: int = _setting(64, "batch size", check=_at_least(1), what="a positive integer")
    epochs: int = _setting(10, "epochs", check=_at_least(1), what="a positive integer")
    seed: int = _setting(0, "random seed (initialization, shuffling, dropout, augmentation)")
    eval_batch_size: int = _setting(
        1000, "batch size of the test-set evaluation", check=_at_least(1), what="a positive integer"
    )
    loop: str = _setting(
        "auto",
        "python: dispatch the jitted step (fast on CPU); scan: one jitted epoch (fast on GPU); "
        "auto picks by backend",
        choices=("auto", "python", "scan"),
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if (meta["choices"] and value not in meta["choices"]) or (
                meta["check"] and not meta["check"](value)
            ):
                raise ValueError(f"invalid {f.name}: {value!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"invalid warmup_epochs: {self.warmup_epochs!r} > epochs")


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer for ``config``, with its learning-rate schedule."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        lr = config.lr
        if warmup:
            ramp = optax.linear_schedule(0.0, config.lr, warmup)
            lr = optax.join_schedules([ramp, optax.constant_schedule(config.lr)], [warmup])
    elif config.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1))
    else:
        lr = optax.cosine_onecycle_schedule(total, config.lr)
    if config.optimizer == "adam":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lr, momentum=config.momentum or None),
    )


def training_model(model):
    """The form of ``model`` that trains and predicts: on the CPU backend the one with
    ``cpu_kernels`` (``lenet_jax.cpu_kernels``: the same function, faster on XLA:CPU), elsewhere the
    reference. The one place that choice is made."""
    if hasattr(model, "cpu_kernels"):
        return model.clone(cpu_kernels=jax.default_backend() == "cpu")
    return model


def create_train_state(model, params, tx, key: jax.Array) -> TrainState:
    """A fresh ``TrainState`` for ``model`` (in its ``training_model`` form) with ``params`` and
    optimizer ``tx``."""
    apply = training_model(model).apply
    state = TrainState.create(apply_fn=apply, params=params, tx=tx, key=key)
    return state.replace(step=jnp.zeros((), jnp.int32))  # an array from the start: one compilation


# --------------------------------------------------------------------------- metrics


def compute_metrics(logits_BK, labels_B, weights_B=None, *, label_smoothing: float = 0.0):
    """Summed metrics of a batch, shared by training and evaluation.

    Args:
      logits_BK: ``[B, K]`` logits.
      labels_B: ``[B]`` int labels.
      weights_B: ``[B]`` 0/1 weights (padding rows get 0); default all ones.
      label_smoothing: smoothing of the one-hot targets in the loss.

    Returns:
      Dict of scalars: ``loss_sum``, ``correct`` and ``count`` (sums, so batches add up exactly).
    """
    if weights_B is None:
        weights_B = jnp.ones(labels_B.shape, logits_BK.dtype)
    onehot = jax.nn.one_hot(labels_B, logits_BK.shape[-1], dtype=logits_BK.dtype)
    targets = optax.smooth_labels(onehot, label_smoothing)
    loss_B = optax.softmax_cross_entropy(logits_BK, targets)
    correct_B = (jnp.argmax(logits_BK, -1) == labels_B).astype(logits_BK.dtype)
    return {
        "loss_sum": jnp.sum(loss_B * weights_B),
        "correct": jnp.sum(correct_B * weights_B),
        "count": jnp.sum(weights_B),
    }


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """``{"loss", "accuracy"}`` means from summed metrics."""
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count}


# --------------------------------------------------------------------------- the step


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    label_smoothing: float = 0.0,
    augment: Callable | None = None,
):
    """One optimizer step on a preprocessed batch (pure; jit it or call it inside a jitted loop).

    Args:
      state: the train state.
      batch: ``{"image": [B, H, W, C] float32, "label": [B] int, "weight": [B] 0/1}``.
      label_smoothing: smoothing of the one-hot targets.
      augment: ``augment(key, images) -> images``, applied on device with a key derived from the
        state's key and step (so a resumed run draws the same augmentations); ``None`` for none.

    Returns:
      ``(new_state, metrics)`` with the summed metrics of ``compute_metrics``.
    """
    step_key = jax.random.fold_in(state.key, state.step)
    dropout_key, augment_key = jax.random.split(step_key)
    if augment is not None:
        batch = {**batch, "image": augment(augment_key, batch["image"])}

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key}
        )
        m = compute_metrics(
            logits, batch["label"], batch["weight"], label_smoothing=label_smoothing
        )
        return m["loss_sum"] / jnp.maximum(m["count"], 1.0), m

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metrics


def epoch_batches(key: jax.Array, epoch: int, n: int, batch_size: int, shuffle: bool = True):
    """Index batches of one epoch, made on the device.

    The last batch is padded with index 0 and weight 0, so every batch has the same shape (one
    compilation) and every example is used exactly once.

    Returns:
      ``(idx, weight)``: int32 ``[S, batch_size]`` and float32 ``[S, batch_size]``, S = ceil(n/B).
    """
    steps = -(-n // batch_size)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n) if shuffle else jnp.arange(n)
    pad = steps * batch_size - n
    idx = jnp.concatenate([order, jnp.zeros(pad, order.dtype)]).astype(jnp.int32)
    weight = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    return idx.reshape(steps, batch_size), weight.reshape(steps, batch_size)


def _gather(preprocess, images, labels, idx, weight):
    return {"image": preprocess(images[idx]), "label": labels[idx], "weight": weight}


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _zero_metrics():
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}


@dataclasses.dataclass(eq=False)
class Step:
    """How a batch is made and stepped: preprocessing, augmentation, label smoothing, devices.

    Holds its jitted forms, compiled on first use: pass the same ``Step`` to every epoch.

    Attributes:
      label_smoothing: smoothing of the one-hot targets.
      preprocess: uint8 images -> model inputs (``models.ModelInput.preprocess``); default MNIST
        for LeNet-5.
      augment: see ``train_step``.
      mesh: a ``lenet_jax.parallel.data_mesh``: the batch is split over its devices (data
        parallelism; pass the state and data replicated on it); ``None`` for one device.
    """

    label_smoothing: float = 0.0
    preprocess: Callable | None = None
    augment: Callable | None = None
    mesh: Any = None

    def accumulate(self, state, sums, images, labels, idx_B, weight_B):
        """Gathers one batch from device-resident data, steps, and adds its metrics to ``sums``."""
        preprocess = self.preprocess or mnist_preprocess
        batch = _gather(preprocess, images, labels, idx_B, weight_B)
        batch = parallel.constrain_batch(batch, self.mesh)
        state, metrics = train_step(state, batch, self.label_smoothing, self.augment)
        return state, _add(sums, metrics)

    @functools.cached_property
    def python_step(self):
        """The jitted CPU step ``(state, sums, images, labels, idx, weight, i) -> (state, sums)``
        on batch ``i``; the state and the running sums are donated."""

        def step(state, sums, images, labels, idx, weight, i):
            return self.accumulate(state, sums, images, labels, idx[i], weight[i])

        return jax.jit(step, donate_argnums=(0, 1))

    @functools.cached_property
    def scan_epoch(self):
        """The jitted accelerator epoch ``(state, images, labels, idx, weight) -> (state, sums)``:
        ``lax.scan`` of the step over all batches; the state is donated."""

        def epoch(state, images, labels, idx, weight):
            def body(carry, xs):
                return self.accumulate(*carry, images, labels, *xs), None

            (state, sums), _ = jax.lax.scan(body, (state, _zero_metrics()), (idx, weight))
            return state, sums

        return jax.jit(epoch, donate_argnums=(0,))


def resolve_loop(loop: str) -> str:
    """``"python"`` on CPU and ``"scan"`` elsewhere when ``loop == "auto"``."""
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" else "scan"


def train_epoch(
    state: TrainState,
    images,
    labels,
    *,
    epoch: int,
    data_key: jax.Array,
    batch_size: int,
    step: Step | None = None,
    loop: str = "auto",
    progress: Callable[[int, dict], None] | None = None,
):
    """Trains one epoch over device-resident uint8 ``images [N, H, W(, C)]`` and ``labels [N]``.

    Args:
      state: the train state (donated: do not reuse the argument).
      epoch: the epoch number; with ``data_key`` it fixes the shuffling.
      step: how batches are made and stepped (pass the same ``Step`` every epoch to compile once);
        default ``Step()``. With its mesh, ``state``, ``images`` and ``labels`` live replicated on
        it (``lenet_jax.parallel.replicate``).
      loop: ``"python"`` (dispatch the jitted step), ``"scan"`` (one jitted epoch) or ``"auto"``.
      progress: called as ``progress(steps_done, running_sums)`` about every 50 steps.

    Returns:
      ``(state, sums)`` with the summed metrics of the epoch.
    """
    step = Step() if step is None else step
    parallel.check_batch(batch_size, step.mesh)
    idx, weight = epoch_batches(data_key, epoch, images.shape[0], batch_size)
    if step.mesh is not None:
        idx, weight = parallel.replicate((idx, weight), step.mesh)
    steps = idx.shape[0]
    if resolve_loop(loop) == "scan":
        state, sums = step.scan_epoch(state, images, labels, idx, weight)
        if progress:
            progress(steps, sums)
        return state, sums
    sums = _zero_metrics()
    if step.mesh is not None:
        sums = parallel.replicate(sums, step.mesh)
    # XLA's CPU devices are threads of one pool: with many sharded steps queued, the threads of one
    # step's all-reduce can wait behind the next steps' work until the rendezvous times out, so a
    # mesh on the CPU runs its steps one at a time.
    sync = step.mesh is not None and jax.default_backend() == "cpu"
    for i in range(steps):
        state, sums = step.python_step(state, sums, images, labels, idx, weight, i)
        if sync:
            jax.block_until_ready(sums)
        if progress and ((i + 1) % 50 == 0 or i + 1 == steps):
            progress(i + 1, sums)
    return state, sums
