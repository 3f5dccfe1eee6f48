"""A whole run: data, training with per-epoch checkpoints, the final report and its figures."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, io, parallel
from lenet_jax.augment import make_augment
from lenet_jax.data import get_dataset, load_dataset
from lenet_jax.io import atomic_write_json
from lenet_jax.models import (
    ImageClassifier,
    ModelInput,
    build_model,
    count_params,
    init_params,
    model_config,
    model_input,
)
from lenet_jax.predict import classification_report, predict
from lenet_jax.train import (
    Step,
    TrainConfig,
    TrainingDiverged,
    create_train_state,
    make_optimizer,
    summarize,
    train_epoch,
)


def new_run_dir(root: str | Path = "runs") -> Path:
    """A new, empty ``runs/YYYYmmdd-HHMMSS`` folder (``-1``, ``-2``, ... when taken), created here:
    two trainings started in the same second get two folders."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(root).mkdir(parents=True, exist_ok=True)
    for i in itertools.count():
        path = Path(root) / (f"{stamp}-{i}" if i else stamp)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


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
    dataset: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    data_source: str | None = None,
    train_limit: int | None = None,
    figures: bool = True,
    progress: bool = True,
    mesh: Any = "auto",
) -> dict[str, Any]:
    """Trains ``model`` with ``config``, checkpointing to ``run_dir`` after every epoch.

    The run folder is checked and locked before any work (``lenet_jax.io.locked_folder``): one
    process writes a run at a time, and what a killed process left half-written is removed.

    Args:
      model: the Linen model; ``None`` with ``resume`` takes the checkpoint's.
      config: hyperparameters (for ``resume``, the run's saved config is used instead).
      run_dir: the run folder (created).
      dataset: what the model learns, a name in ``lenet_jax.data.DATASETS`` (default ``"mnist"``;
        with ``resume``, the run's, and another is refused). The run records it.
      resume: continue from the newest checkpoint in ``run_dir`` (a damaged one is refused).
      overwrite: a new run in a folder holding files of another: they are moved aside first, into
        ``<run_dir>.replaced/<time>/`` (without it such a folder is refused).
      data_dir, data_source: where the model's dataset comes from (``lenet_jax.data.load_dataset``).
      train_limit: train on the first N training images only (smoke runs).
      figures: write the PNG figures at the end.
      progress: show progress bars (on stderr).
      mesh: ``"auto"`` splits every batch over all devices when there are several
        (``lenet_jax.parallel``); a ``jax.sharding.Mesh`` to choose; ``None`` for one device.

    Returns:
      The final metrics dict (also written to ``run_dir/metrics.json``).

    Raises:
      TrainingDiverged: the loss became NaN/inf; the last good checkpoint is kept.
      lenet_jax.checkpoint.CheckpointError: ``resume`` without a usable checkpoint, or one of
        another architecture.
      lenet_jax.io.OutputError: ``run_dir`` cannot be written, or another process is writing it.
    """
    run_dir = Path(run_dir)
    writer = jax.process_index() == 0  # multi-host: process 0 writes and reports
    with io.locked_folder(run_dir) if writer else contextlib.nullcontext():
        if writer:
            for path in checkpoint.remove_unfinished(run_dir):
                _log(f"Removed {path}, left unfinished by an interrupted run")
            if overwrite and not resume:
                aside = _move_aside(run_dir)
                if aside is not None:
                    _log(f"Moved the earlier files of {run_dir} to {aside}")
        settings = _settings(model, config, dataset, run_dir, resume, train_limit)
        model, config, dataset, train_limit, found = settings
        inputs = model_input(model, dataset)
        if writer:
            what = f"resuming after epoch {found[0]['epoch']}" if found else "a new run"
            title = get_dataset(dataset).title
            _log(f"Run {run_dir}: {model_config(model)['name']} on {title}, {what}")
        mesh = parallel.default_mesh() if mesh == "auto" else mesh
        parallel.check_batch(config.batch_size, mesh)
        data = _load_data(dataset, data_dir, data_source, train_limit, mesh, progress)
        run = _Run(model, inputs, config, data, mesh, run_dir, progress)
        state, history, start = _initial_state(run, found)
        meta = _run_metadata(run, state, train_limit)
        step = Step(  # compiled in the first epoch
            config.label_smoothing, inputs.preprocess, make_augment(config, dataset), mesh
        )
        for epoch in range(start, config.epochs + 1):
            state, entry, report = _train_one_epoch(run, state, epoch, step)
            history.append(entry)
            metadata = {**meta, "epoch": epoch, "step": int(state.step), "history": history}
            checkpoint.save_checkpoint(run_dir, state, {**metadata, "test": report})
        if not writer:
            return {**meta, "epochs": config.epochs, "history": history}
        return _finish(run, meta, figures)


@dataclasses.dataclass(frozen=True)
class _Data:
    """The dataset of a run: training images and labels on the device(s), the test set."""

    dataset: Any  # lenet_jax.data.Dataset
    images: jax.Array
    labels: jax.Array
    test_x: np.ndarray
    test_y: np.ndarray
    test_images: jax.Array  # test_x on the device, for the test after every epoch


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run."""

    model: ImageClassifier
    inputs: ModelInput  # the dataset the run trains on, at the model's input size
    config: TrainConfig
    data: _Data
    mesh: Any
    run_dir: Path
    progress: bool


def _settings(model, config, dataset, run_dir: Path, resume: bool, train_limit):
    """``(model, config, dataset, train_limit, found)``: for ``resume``, the checkpoint's settings
    and the checkpoint itself; for a new run, the given ones after checking the folder holds no
    run."""
    if not resume:
        earlier = _run_files(run_dir)
        if earlier:
            raise checkpoint.CheckpointError(
                f"{run_dir} already holds files of a run ({', '.join(earlier[:3])}"
                f"{', ...' if len(earlier) > 3 else ''}); use --resume to continue it, "
                "--overwrite to move them aside, or another --out"
            )
        if model is None:
            raise ValueError("a model is needed unless resuming a run")
        return model, config, dataset or "mnist", train_limit, None
    found = checkpoint.latest_checkpoint(run_dir)
    if found is None:
        raise checkpoint.CheckpointError(f"--resume: no checkpoint in {run_dir}")
    meta = found[0]
    model = build_model(meta["model"]) if model is None else model
    checkpoint.check_model(meta, model_config(model))
    recorded = checkpoint.run_dataset(meta)
    if dataset is not None and dataset != recorded:
        raise checkpoint.CheckpointError(
            f"{run_dir} is a run on {recorded!r}; it cannot resume on {dataset!r}"
        )
    return model, TrainConfig(**meta["config"]), recorded, meta.get("train_limit"), found


def _run_files(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds besides its lock, sorted."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != io.LOCK_NAME)


def _move_aside(run_dir: Path) -> Path | None:
    """Moves everything in ``run_dir`` but its lock into a new sibling folder
    ``<name>.replaced-<time>``; returns it (``None`` when there was nothing to move)."""
    names = _run_files(run_dir)
    if not names:
        return None
    aside = new_run_dir(run_dir.parent / f"{run_dir.name}.replaced")
    for name in names:
        (run_dir / name).rename(aside / name)
    return aside


def _load_data(dataset, data_dir, data_source, train_limit, mesh, progress: bool) -> _Data:
    """The run's dataset; with a mesh the whole training set is copied to every device (each step
    splits its batch)."""
    ds = get_dataset(dataset)
    load = dict(data_dir=data_dir, source=data_source, progress=progress)
    train_x, train_y = load_dataset(ds.name, "train", **load)
    test_x, test_y = load_dataset(ds.name, "test", **load)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    if mesh is None:
        images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    else:
        everywhere = parallel.replicated(mesh)
        images, labels = (parallel.make_global(a, everywhere) for a in (train_x, train_y))
    return _Data(ds, images, labels, test_x, test_y, jnp.asarray(test_x))


def _keys(config: TrainConfig):
    """``(init, dropout, data)`` PRNG keys of the run, all from ``config.seed``."""
    return jax.random.split(jax.random.key(config.seed), 3)


def _steps_per_epoch(run: _Run) -> int:
    return -(-run.data.images.shape[0] // run.config.batch_size)


def _initial_state(run: _Run, found):
    """``(state, history, first_epoch)``: a fresh train state, or the checkpoint's when resuming."""
    init_key, dropout_key, _ = _keys(run.config)
    tx = make_optimizer(run.config, _steps_per_epoch(run))
    params = init_params(run.model, init_key, run.inputs.dataset)
    state = create_train_state(run.model, params, tx, dropout_key)
    history: list[dict] = []
    first = 1
    if found is not None:
        meta, payload = found
        state = checkpoint.restore_state(state, payload, meta, model_config(run.model))
        history, first = meta.get("history", []), meta["epoch"] + 1
        _log(f"Resuming {run.run_dir} after epoch {meta['epoch']} (step {int(state.step)})")
    if run.mesh is not None:
        state = parallel.replicate(state, run.mesh)
        _log(f"Data parallel over {run.mesh.size} devices ({jax.devices()[0].device_kind})")
    return state, history, first


def _run_metadata(run: _Run, state, train_limit) -> dict[str, Any]:
    """What every checkpoint and ``metrics.json`` records of the run besides its epochs."""
    ds = run.data.dataset
    return {
        "model": model_config(run.model),
        "param_count": count_params(state.params),
        "dataset": ds.name,
        "classes": list(ds.classes),
        "normalization": {"mean": ds.mean, "std": ds.std, "image_size": run.inputs.size},
        "config": dataclasses.asdict(run.config),
        "train_limit": train_limit,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": 1 if run.mesh is None else run.mesh.size,
    }


def _train_one_epoch(run: _Run, state, epoch: int, step: Step):
    """``(state, history_entry, test_report)`` after training epoch ``epoch`` and testing.

    Raises:
      TrainingDiverged: the epoch's training loss is not finite.
    """
    from tqdm import tqdm  # text bars on stderr, in a terminal and in a notebook alike

    config = run.config
    bar = tqdm(
        total=_steps_per_epoch(run),
        desc=f"Epoch {epoch}/{config.epochs}",
        disable=not run.progress,
        leave=False,
        file=sys.stderr,
    )

    def on_progress(done, sums):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{summarize(sums)['loss']:.4f}")

    t0 = time.perf_counter()
    state, sums = train_epoch(
        state,
        run.data.images,
        run.data.labels,
        epoch=epoch,
        data_key=_keys(config)[2],
        batch_size=config.batch_size,
        step=step,
        loop=config.loop,
        progress=on_progress,
    )
    train = summarize(sums)
    seconds = time.perf_counter() - t0
    bar.close()
    if not np.isfinite(train["loss"]):
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept in {run.run_dir}"
            if epoch > 1
            else "no checkpoint was written; try a lower --lr"
        )
        raise TrainingDiverged(f"training loss became {train['loss']} in epoch {epoch}; {kept}")
    test_x = run.data.test_images
    logits = predict(
        run.model,
        state.params,
        test_x,
        run.inputs.dataset,
        batch_size=config.eval_batch_size,
        mesh=run.mesh,
    )
    report = classification_report(logits, run.data.test_y)
    test = {"loss": report["loss"], "accuracy": report["accuracy"]}
    _log(
        f"Epoch {epoch}, Loss: {train['loss']:.4f}, Accuracy: {100 * train['accuracy']:.2f}% "
        f"(test {100 * test['accuracy']:.2f}%, {seconds:.1f} s)"
    )
    return state, {"epoch": epoch, "seconds": seconds, "train": train, "test": test}, report


def _finish(run: _Run, meta, figures: bool) -> dict[str, Any]:
    """Prints the final test report, writes ``metrics.json`` and the figures; returns the metrics."""
    final = checkpoint.latest_checkpoint(run.run_dir)[0]
    report, classes = final["test"], run.data.dataset.classes
    _log(
        f"Test set: Average loss: {report['loss']:.4f}, Accuracy: "
        f"{report['correct']}/{report['count']} ({100 * report['accuracy']:.2f}%)"
    )
    _log(f"Top-3 accuracy: {100 * report['top3_accuracy']:.2f}%")
    _log(
        "Per-class accuracy: "
        + ", ".join(
            f"{name}: {100 * a:.2f}%"
            for name, a in zip(classes, report["per_class_accuracy"], strict=True)
        )
    )
    _log("Confusion matrix (rows: true, columns: predicted):")
    for row in report["confusion"]:
        _log("  " + " ".join(f"{v:5d}" for v in row))
    metrics = {
        **meta,
        "epochs": final["config"]["epochs"],
        "history": final["history"],
        "test": report,
    }
    atomic_write_json(run.run_dir / "metrics.json", metrics)
    if figures:
        _write_figures(run, final, classes)
    _log(f"Run saved in {run.run_dir}")
    return metrics


def _write_figures(run: _Run, meta, classes):
    from lenet_jax import plot

    run_dir, test_x, test_y = run.run_dir, run.data.test_x, run.data.test_y
    _, params, _ = checkpoint.load_params(run_dir)
    logits = predict(run.model, params, jnp.asarray(test_x), run.inputs.dataset)
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
            [
                f"true {classes[test_y[i]]}\npred {classes[pred[i]]} ({probs[i, pred[i]]:.2f})"
                for i in first
            ],
            ["black" if pred[i] == test_y[i] else "red" for i in first],
            suptitle="Test samples: true label, prediction (confidence); red = wrong",
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
