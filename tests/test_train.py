import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from lenet_jax import checkpoint
from lenet_jax.augment import affine, make_augment
from lenet_jax.data import preprocess
from lenet_jax.experiment import train_and_evaluate
from lenet_jax.models import LeNet5, init_params, model_config
from lenet_jax.predict import classification_report, predict
from lenet_jax.train import (
    Step,
    TrainConfig,
    TrainingDiverged,
    compute_metrics,
    create_train_state,
    epoch_batches,
    make_optimizer,
    train_epoch,
    train_step,
)

ROOT = Path(__file__).resolve().parent.parent


def fresh_state(config=None, steps=100, seed=0):
    config = config or TrainConfig()
    model = LeNet5()
    return create_train_state(
        model,
        init_params(model, jax.random.key(seed)),
        make_optimizer(config, steps),
        jax.random.key(1),
    )


def test_compute_metrics_sums_exactly():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    labels = jnp.array([0, 0, 2])
    m = compute_metrics(logits, labels, jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(m["loss_sum"], -np.log(0.5) - np.log(0.1), rtol=1e-6)
    assert float(m["correct"]) == 1.0 and float(m["count"]) == 2.0


def test_epoch_batches_cover_every_example_once_with_padding():
    idx, weight = epoch_batches(jax.random.key(0), 3, 10, 4)
    chex.assert_shape(idx, (3, 4))
    real = np.asarray(idx)[np.asarray(weight) == 1]
    np.testing.assert_array_equal(np.sort(real), np.arange(10))
    np.testing.assert_array_equal(np.asarray(weight).ravel(), [1] * 10 + [0] * 2)
    other, _ = epoch_batches(jax.random.key(0), 4, 10, 4)
    assert not np.array_equal(np.asarray(idx), np.asarray(other))  # each epoch its own order


def test_train_step_compiles_once_and_decreases_the_loss(mnist):
    images, labels = (jnp.asarray(a[:640]) for a in mnist["train"])
    counted = chex.assert_max_traces(train_step, n=1)
    step = jax.jit(counted)
    state = fresh_state()
    idx, weight = epoch_batches(jax.random.key(0), 0, 640, 64)
    losses = []
    for _ in range(3):
        for i in range(idx.shape[0]):
            batch = {
                "image": preprocess(images[idx[i]]),
                "label": labels[idx[i]],
                "weight": weight[i],
            }
            state, m = step(state, batch)
            losses.append(float(m["loss_sum"] / m["count"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    chex.assert_tree_all_finite(state.params)


def test_python_loop_and_scan_epochs_agree(mnist):
    images, labels = (jnp.asarray(a[:1000]) for a in mnist["train"])  # 1000 = 15 full batches + 40
    results = {}
    for loop in ("python", "scan"):
        step = Step()
        state = fresh_state()
        for epoch in range(2):
            state, sums = train_epoch(
                state,
                images,
                labels,
                epoch=epoch,
                data_key=jax.random.key(5),
                batch_size=64,
                step=step,
                loop=loop,
            )
        results[loop] = (state, sums)
        jitted = step.python_step if loop == "python" else step.scan_epoch
        assert jitted._cache_size() == 1  # the padded last batch reuses the compilation
    chex.assert_trees_all_close(results["python"][0].params, results["scan"][0].params, atol=2e-5)
    assert float(results["python"][1]["count"]) == 1000.0


def test_invalid_hyperparameters_are_rejected():
    for kwargs in ({"lr": -1.0}, {"batch_size": 0}, {"optimizer": "rmsprop"}, {"epochs": 0}):
        with pytest.raises(ValueError, match="invalid"):
            TrainConfig(**kwargs)


def test_classification_report_counts():
    logits = np.eye(3)[[0, 1, 2, 2]] * 5.0
    labels = np.array([0, 1, 1, 2])
    r = classification_report(logits, labels)
    assert r["correct"] == 3 and r["count"] == 4 and r["accuracy"] == 0.75
    assert r["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert r["per_class_accuracy"] == [1.0, 0.5, 1.0] and r["top3_accuracy"] == 1.0


def test_checkpoint_round_trip_and_architecture_mismatch(tmp_path):
    state = fresh_state()
    meta = {"epoch": 1, "model": model_config(LeNet5())}
    checkpoint.save_checkpoint(tmp_path, state, meta)
    found_meta, payload = checkpoint.latest_checkpoint(tmp_path)
    restored = checkpoint.restore_state(fresh_state(seed=7), payload, found_meta, meta["model"])
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"holds lenet5\(activation='tanh'.*but lenet5\(activation='relu'",
    ):
        checkpoint.restore_state(
            state, payload, found_meta, model_config(LeNet5(activation="relu"))
        )
    # a state without its JSON (a torn write) is not a checkpoint; a JSON whose state does not
    # match is damage done after the atomic write: refused, not replaced by an older epoch
    (tmp_path / "checkpoints" / "epoch_002.msgpack").write_bytes(b"partial")
    assert checkpoint.latest_checkpoint(tmp_path)[0]["epoch"] == 1
    (tmp_path / "checkpoints" / "epoch_003.json").write_text(
        '{"state_file": "epoch_002.msgpack", "sha256": "0"}'
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"epoch_002.msgpack is damaged"):
        checkpoint.latest_checkpoint(tmp_path)
    assert checkpoint.latest_checkpoint(tmp_path, epoch=1)[0]["epoch"] == 1


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, mnist, monkeypatch
):
    from lenet_jax import experiment

    real_epoch = experiment.train_epoch

    def nan_in_epoch_two(state, *args, epoch, **kwargs):
        state, sums = real_epoch(state, *args, epoch=epoch, **kwargs)
        if epoch == 2:
            sums = {**sums, "loss_sum": sums["loss_sum"] * jnp.nan}
        return state, sums

    monkeypatch.setattr(experiment, "train_epoch", nan_in_epoch_two)
    config = TrainConfig(epochs=3, batch_size=64)
    with pytest.raises(TrainingDiverged, match=r"became nan in epoch 2.*checkpoint \(epoch 1\)"):
        train_and_evaluate(
            LeNet5(), config, tmp_path, train_limit=256, figures=False, progress=False
        )
    assert checkpoint.latest_checkpoint(tmp_path)[0]["epoch"] == 1
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_one_epoch_on_mnist_reaches_97_percent(mnist, tmp_path):
    metrics = train_and_evaluate(LeNet5(), TrainConfig(epochs=1), tmp_path, progress=False)
    assert metrics["test"]["accuracy"] >= 0.97
    assert metrics["test"]["count"] == 10000
    for png in ("curves", "per_class_accuracy", "confusion_matrix", "samples", "misclassified"):
        assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, params, meta = checkpoint.load_params(tmp_path)
    logits = predict(LeNet5(), params, jnp.asarray(mnist["test"][0]))
    assert classification_report(logits, mnist["test"][1])["correct"] == metrics["test"]["correct"]


def _train_cmd(out, *extra):
    return [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--train-limit",
        "3200",
        "--no-figures",
        "--no-progress",
        *extra,
    ]


def _final_params(run):
    meta, payload = checkpoint.latest_checkpoint(run)
    return meta["epoch"], serialization.msgpack_restore(payload)["params"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, mnist):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(_train_cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        _train_cmd(tmp_path / "killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = tmp_path / "killed" / "checkpoints" / "epoch_001.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = checkpoint.latest_checkpoint(tmp_path / "killed")[0]["epoch"]
    assert epoch_at_kill < 3, "the run finished before it could be killed"
    resumed = subprocess.run(
        _train_cmd(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {tmp_path / 'killed'} after epoch {epoch_at_kill}" in resumed.stdout
    epoch_a, full = _final_params(tmp_path / "full")
    epoch_b, again = _final_params(tmp_path / "killed")
    assert epoch_a == epoch_b == 3
    chex.assert_trees_all_equal(full, again)  # bit for bit


@pytest.mark.slow  # runs a script: the command lines are the end-to-end tier
@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "argument --lr: '-1' must be a positive number"),
        (["--batch-size", "0"], "argument --batch-size: '0' must be a positive integer"),
        (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice"),
    ],
)
def test_train_cli_rejects_bad_flags_in_one_line(args, message, tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--out", str(tmp_path / "r"), *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.strip().splitlines()[-1].startswith("train.py: error:")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # runs a script: the command lines are the end-to-end tier
def test_train_cli_refuses_a_checkpoint_of_another_architecture(tmp_path):
    checkpoint.save_checkpoint(
        tmp_path, fresh_state(), {"epoch": 1, "model": model_config(LeNet5())}
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "--out",
            str(tmp_path),
            "--resume",
            "--activation",
            "relu",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "train.py: error: checkpoint holds lenet5(activation='tanh', "
        "num_classes=10, pool='avg') but lenet5(activation='relu', "
        "num_classes=10, pool='avg') was requested"
    )


def test_affine_rotates_and_shifts_exactly_on_the_pixel_grid():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 1)), jnp.float32)
    np.testing.assert_allclose(affine(x, jnp.zeros(2), jnp.zeros((2, 2)), -1.0), x, atol=1e-6)
    quarter = affine(x, jnp.full(2, np.pi / 2), jnp.zeros((2, 2)), -1.0)
    np.testing.assert_allclose(quarter[0, :, :, 0], np.rot90(x[0, :, :, 0], -1), atol=1e-6)
    moved = affine(x, jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, -2.0]]), -1.0)
    np.testing.assert_allclose(moved[0, 1:], x[0, :-1], atol=1e-6)  # one row down
    np.testing.assert_array_equal(moved[0, 0], -1.0)  # from outside: the fill value
    np.testing.assert_allclose(moved[1, :, :-2], x[1, :, 2:], atol=1e-6)  # two columns left
    color = affine(jnp.zeros((1, 4, 4, 3)), jnp.zeros(1), jnp.array([[2.0, 0.0]]), jnp.arange(3.0))
    np.testing.assert_array_equal(color[0, 0, 0], [0.0, 1.0, 2.0])  # per-channel fill


@pytest.mark.slow  # compiles two training steps (with and without augmentation)
def test_augmentation_is_drawn_from_the_state_key_and_step():
    model = LeNet5()
    config = TrainConfig(augment_shift=2.0, augment_rotate=10.0)
    augment = make_augment(config)
    assert make_augment(TrainConfig()) is None
    tx = make_optimizer(config, 10)
    batch = {
        "image": jax.random.normal(jax.random.key(0), (8, 32, 32, 1)),
        "label": jnp.arange(8) % 10,
        "weight": jnp.ones(8),
    }

    def step(key):
        state = create_train_state(model, init_params(model, jax.random.key(1)), tx, key)
        return train_step(state, batch, 0.0, augment)[1]["loss_sum"]

    same, again, other = step(jax.random.key(2)), step(jax.random.key(2)), step(jax.random.key(3))
    assert float(same) == float(again) and float(same) != float(other)
    plain = create_train_state(model, init_params(model, jax.random.key(1)), tx, jax.random.key(2))
    assert float(train_step(plain, batch)[1]["loss_sum"]) != float(same)
