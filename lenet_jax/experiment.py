"""A whole run: data, training with per-epoch checkpoints, the final report and its figures."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, parallel
from lenet_jax.data import get_dataset, load_dataset
from lenet_jax.io import atomic_write_json
from lenet_jax.models import (
    ImageClassifier,
    build_model,
    count_params,
    init_params,
    model_config,
)
from lenet_jax.train import (
    TrainConfig,
    TrainingDiverged,
    classification_report,
    create_train_state,
    make_augment,
    make_optimizer,
    predict,
    summarize,
    train_epoch,
)


def new_run_dir(root: str | Path = "runs") -> Path:
    """``runs/YYYYmmdd-HHMMSS`` (with a suffix when taken), not yet created."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = Path(root) / stamp, 1
    while path.exists():
        path, i = Path(root) / f"{stamp}-{i}", i + 1
    return path


def latest_run(root: str | Path = "runs") -> Path | None:
    """The newest run folder under ``root`` holding a checkpoint, or ``None``."""
    runs = [p for p in Path(root).glob("*") if any(p.glob("checkpoints/epoch_*.json"))]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _log(msg: str) -> None:
    print(msg, flush=True)


def train_and_evaluate(
    model: ImageClassifier | None,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data_dir: str | Path | None = None,
    data_source: str | None = None,
    train_limit: int | None = None,
    figures: bool = True,
    progress: bool = True,
    mesh: Any = "auto",
) -> dict[str, Any]:
    """Trains ``model`` with ``config``, checkpointing to ``run_dir`` after every epoch.

    Args:
      model: the Linen model; ``None`` with ``resume`` takes the checkpoint's.
      config: hyperparameters (for ``resume``, the run's saved config is used instead).
      run_dir: the run folder (created).
      resume: continue from the newest intact checkpoint in ``run_dir``.
      data_dir, data_source: where the model's dataset comes from (``lenet_jax.data.load_dataset``).
      train_limit: train on the first N training images only (smoke runs).
      figures: write the PNG figures at the end.
      progress: show tqdm bars.
      mesh: ``"auto"`` splits every batch over all devices when there are several
        (``lenet_jax.parallel``); a ``jax.sharding.Mesh`` to choose; ``None`` for one device.

    Returns:
      The final metrics dict (also written to ``run_dir/metrics.json``).

    Raises:
      TrainingDiverged: the loss became NaN/inf; the last good checkpoint is kept.
      lenet_jax.checkpoint.CheckpointError: ``resume`` without a usable checkpoint, or one of
        another architecture.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    found = checkpoint.latest_checkpoint(run_dir) if resume else None
    if resume and found is None:
        raise checkpoint.CheckpointError(f"--resume: no intact checkpoint in {run_dir}")
    if model is None:
        if found is None:
            raise ValueError("a model is needed unless resuming a run")
        model = build_model(found[0]["model"])
    mcfg = model_config(model)
    if resume:
        checkpoint.check_model(found[0], mcfg)
        config = TrainConfig(**found[0]["config"])
        train_limit = found[0].get("train_limit")
    elif checkpoint.latest_checkpoint(run_dir) is not None:
        raise checkpoint.CheckpointError(
            f"{run_dir} already holds a run; use --resume to continue it or another --out"
        )

    ds = get_dataset(model.dataset)
    load = dict(data_dir=data_dir, source=data_source, progress=progress)
    train_x, train_y = load_dataset(ds.name, "train", **load)
    test_x, test_y = load_dataset(ds.name, "test", **load)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    mesh = parallel.default_mesh() if mesh == "auto" else mesh
    parallel.check_batch(config.batch_size, mesh)
    if mesh is None:
        images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    else:  # the whole training set on every device; each step splits its batch
        images, labels = (
            parallel.make_global(a, parallel.replicated(mesh)) for a in (train_x, train_y)
        )
    test_images = jnp.asarray(test_x)

    root = jax.random.key(config.seed)
    init_key, dropout_key, data_key = jax.random.split(root, 3)
    steps_per_epoch = -(-images.shape[0] // config.batch_size)
    tx = make_optimizer(config, steps_per_epoch)
    state = create_train_state(model, init_params(model, init_key), tx, dropout_key)
    history: list[dict] = []
    start_epoch = 1
    if found is not None:
        meta, payload = found
        state = checkpoint.restore_state(state, payload, meta, mcfg)
        history = meta.get("history", [])
        start_epoch = meta["epoch"] + 1
        _log(f"Resuming {run_dir} after epoch {meta['epoch']} (step {int(state.step)})")
    if mesh is not None:
        state = parallel.replicate(state, mesh)
        _log(f"Data parallel over {mesh.size} devices ({jax.devices()[0].device_kind})")

    base_meta = {
        "model": mcfg,
        "param_count": count_params(state.params),
        "dataset": ds.name,
        "classes": list(ds.classes),
        "normalization": {"mean": ds.mean, "std": ds.std, "image_size": model.image_size},
        "config": dataclasses.asdict(config),
        "train_limit": train_limit,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": 1 if mesh is None else mesh.size,
    }
    augment = make_augment(config, ds.name)
    fns: dict = {}
    for epoch in range(start_epoch, config.epochs + 1):
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"Epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stdout,
        )

        def on_progress(done, sums, bar=bar):
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{summarize(sums)['loss']:.4f}")

        t0 = time.perf_counter()
        state, sums = train_epoch(
            state,
            images,
            labels,
            epoch=epoch,
            data_key=data_key,
            batch_size=config.batch_size,
            loop=config.loop,
            fns=fns,
            progress=on_progress,
            label_smoothing=config.label_smoothing,
            preprocess=model.preprocess,
            augment=augment,
            mesh=mesh,
        )
        train_metrics = summarize(sums)
        seconds = time.perf_counter() - t0
        bar.close()
        if not np.isfinite(train_metrics["loss"]):
            raise TrainingDiverged(
                f"training loss became {train_metrics['loss']} in epoch {epoch}; "
                f"the last good checkpoint (epoch {epoch - 1}) is kept in {run_dir}"
            )
        test_report = classification_report(
            predict(model, state.params, test_images, config.eval_batch_size, mesh), test_y
        )
        history.append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "train": train_metrics,
                "test": {"loss": test_report["loss"], "accuracy": test_report["accuracy"]},
            }
        )
        _log(
            f"Epoch {epoch}, Loss: {train_metrics['loss']:.4f}, "
            f"Accuracy: {100 * train_metrics['accuracy']:.2f}% "
            f"(test {100 * test_report['accuracy']:.2f}%, {seconds:.1f} s)"
        )
        checkpoint.save_checkpoint(
            run_dir,
            state,
            {
                **base_meta,
                "epoch": epoch,
                "step": int(state.step),
                "history": history,
                "test": test_report,
            },
        )

    if jax.process_index() != 0:  # multi-host: process 0 writes and reports
        return {**base_meta, "epochs": config.epochs, "history": history}
    final = checkpoint.latest_checkpoint(run_dir)[0]
    report = final["test"]
    _log(
        f"Test set: Average loss: {report['loss']:.4f}, Accuracy: "
        f"{report['correct']}/{report['count']} ({100 * report['accuracy']:.2f}%)"
    )
    _log(f"Top-3 accuracy: {100 * report['top3_accuracy']:.2f}%")
    _log(
        "Per-class accuracy: "
        + ", ".join(
            f"{name}: {100 * a:.2f}%"
            for name, a in zip(ds.classes, report["per_class_accuracy"], strict=True)
        )
    )
    _log("Confusion matrix (rows: true, columns: predicted):")
    for row in report["confusion"]:
        _log("  " + " ".join(f"{v:5d}" for v in row))
    metrics = {**base_meta, "epochs": config.epochs, "history": final["history"], "test": report}
    atomic_write_json(run_dir / "metrics.json", metrics)
    if figures:
        _write_figures(run_dir, model, final, test_x, test_y, ds.classes)
    _log(f"Run saved in {run_dir}")
    return metrics


def _write_figures(run_dir: Path, model, meta, test_x, test_y, classes):
    from lenet_jax import plot

    _, params, _ = checkpoint.load_params(run_dir)
    logits = predict(model, params, jnp.asarray(test_x))
    probs = np.asarray(jax.nn.softmax(logits))
    pred = probs.argmax(1)
    report = meta["test"]
    plot.save(plot.training_curves(meta["history"]), run_dir / "curves.png")
    names = list(classes) if not all(c.isdigit() for c in classes) else None
    plot.save(
        plot.per_class_accuracy(report["per_class_accuracy"], names),
        run_dir / "per_class_accuracy.png",
    )
    plot.save(plot.confusion_matrix(report["confusion"], names), run_dir / "confusion_matrix.png")
    first = np.arange(min(32, len(test_y)))
    plot.save(
        plot.digit_grid(
            test_x[first],
            [f"pred {classes[pred[i]]} ({probs[i, pred[i]]:.2f})" for i in first],
            ["black" if pred[i] == test_y[i] else "red" for i in first],
            suptitle="Test samples: prediction (confidence); red = wrong",
        ),
        run_dir / "samples.png",
    )
    wrong = np.flatnonzero(pred != test_y)[:32]
    if wrong.size:
        plot.save(
            plot.digit_grid(
                test_x[wrong],
                [f"true {classes[test_y[i]]}\npred {classes[pred[i]]}" for i in wrong],
                suptitle=f"Misclassified test images ({int((pred != test_y).sum())} in all)",
            ),
            run_dir / "misclassified.png",
        )
