"""Reliability: one writer per run folder, output checked before any work, no half-written file,
metadata that cannot be edited silently, and one-line errors for inputs that would make a map quietly
wrong. Faults are injected (a held lock, a failing write, an edited JSON), and every test checks what
the folder holds afterwards."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import checkpoint, cli, experiment, explain, io
from lenet_jax.evaluation_report import evaluate_run
from lenet_jax.experiment import train_and_evaluate
from lenet_jax.models import LeNet5, explained, init_params
from lenet_jax.report import explain_run
from lenet_jax.train import TrainConfig, TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent
CONFIG = TrainConfig(epochs=2, batch_size=64)
# what a finished run of CONFIG holds, and nothing else
COMPLETE_RUN = [
    "checkpoints/epoch_001.json",
    "checkpoints/epoch_001.msgpack",
    "checkpoints/epoch_002.json",
    "checkpoints/epoch_002.msgpack",
    "metrics.json",
]


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def train(run, **kwargs):
    return train_and_evaluate(
        LeNet5(), CONFIG, run, train_limit=128, figures=False, progress=False, **kwargs
    )


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def no_data(*args, **kwargs):
    raise AssertionError("the dataset was loaded before the output location was checked")


# ----------------------------------------------------------------------------- 1. one writer


@pytest.mark.slow  # runs a script: the command lines are the end-to-end tier
def test_a_second_writer_gets_one_line_naming_the_holder_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    with io.locked_folder(run):
        r = run_script("train.py", "--out", run, "--train-limit", 64, "--epochs", 1)
        assert files(run) == [".lock"]
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        f"train.py: error: {run} is in use by process {os.getpid()} on {os.uname().nodename} "
        f"since {r.stderr.split(' since ')[1].split(';')[0]}; wait for it to finish or choose "
        "another --out"
    )
    assert not run.exists()  # the holder created the folder and released it empty


def test_the_lock_of_a_killed_process_does_not_block_the_next_run(tmp_path, mnist):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from lenet_jax import io
                with io.locked_folder({str(run)!r}):
                    print("locked", flush=True)
                    time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(io.OutputError, match=rf"in use by process {holder.pid} "):
        train(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / ".lock").exists()  # left behind by kill -9, but no longer locked
    metrics = train(run)
    assert metrics["history"][-1]["epoch"] == 2
    assert files(run) == COMPLETE_RUN


# ----------------------------------------------------------------------------- 2. output checked


@pytest.mark.slow  # runs a script: the command lines are the end-to-end tier
def test_an_out_that_is_a_file_or_unwritable_is_refused_before_any_work(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("x")
    r = run_script("train.py", "--out", taken, "--train-limit", 64, "--epochs", 1)
    assert r.returncode == 1 and "Epoch" not in r.stdout
    assert r.stderr.strip() == f"train.py: error: --out {taken} is a file, not a folder"
    r = run_script("train.py", "--data-dir", taken, "--out", tmp_path / "r", "--epochs", 1)
    assert r.returncode == 1
    assert r.stderr.strip() == f"train.py: error: the data folder {taken} is a file, not a folder"
    assert not (tmp_path / "r").exists()
    r = run_script("explain.py", "--run", taken)
    assert r.returncode == 1
    assert r.stderr.strip() == f"explain.py: error: --run {taken} is a file; name the run's folder"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(experiment, "load_dataset", no_data)
    with pytest.raises(io.OutputError) as info:
        train(tmp_path / "ro")
    assert str(info.value) == f"cannot write into --out {tmp_path / 'ro'}: Read-only file system"


def test_explain_into_an_unwritable_folder_fails_before_computing(tiny_run, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(checkpoint, "load_params", no_data)
    with pytest.raises(
        io.OutputError, match=r"^cannot write into --out .*: Read-only file system$"
    ):
        explain_run(tiny_run, "lrp", n=2, out=tmp_path / "ro" / "x.png")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_cleans_up(tmp_path, mnist, monkeypatch):
    run = tmp_path / "run"
    real_replace = os.replace

    def disk_full_at_epoch_2(src, dst):
        if str(dst).endswith("epoch_002.msgpack"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", disk_full_at_epoch_2)
    with pytest.raises(io.OutputError) as info:
        train(run)
    message = (
        f"could not write {run / 'checkpoints' / 'epoch_002.msgpack'}: No space left on device"
    )
    assert str(info.value) == message
    with pytest.raises(SystemExit):  # the command line prints exactly that line
        with cli.one_line_errors(_Parser()):
            raise info.value
    assert _Parser.said == f"train.py: error: {message}\n"
    # epoch 1 is whole; nothing of epoch 2 stays, not even its temporary file
    assert files(run) == ["checkpoints/epoch_001.json", "checkpoints/epoch_001.msgpack"]

    # what a kill -9 during a checkpoint write leaves: a temporary file, a state without its JSON
    (run / "checkpoints" / ".epoch_002.msgpack.k3j1.tmp").write_bytes(b"partial")
    (run / "checkpoints" / "epoch_002.msgpack").write_bytes(b"uncommitted")
    monkeypatch.setattr(io.os, "replace", real_replace)
    train(run, resume=True)
    assert files(run) == COMPLETE_RUN


class _Parser:
    """Just enough of an ``argparse.ArgumentParser`` for ``cli.one_line_errors``."""

    prog = "train.py"
    said = ""

    def exit(self, status, message):
        _Parser.said = message
        raise SystemExit(status)


# ----------------------------------------------------------------------------- 3. metadata


@pytest.fixture
def copied_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _edit(run: Path, change) -> Path:
    path = run / "checkpoints" / "epoch_001.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return path


def test_an_edited_checkpoint_json_is_refused_in_one_line(copied_run):
    path = _edit(copied_run, lambda m: m["config"].update(lr=0.5))
    message = (
        f"{path} was changed after it was written (its checksum does not match); restore it, "
        "or train again"
    )
    r = run_script("train.py", "--out", copied_run, "--resume")
    assert r.returncode == 1 and r.stderr.strip() == f"train.py: error: {message}"
    r = run_script("explain.py", "--run", copied_run, "--n", 2)
    assert r.returncode == 1 and r.stderr.strip() == f"explain.py: error: {message}"
    assert not list(copied_run.glob("explain_*"))


def test_a_run_resumes_only_on_its_own_dataset_and_old_checkpoints_still_load(copied_run):
    with pytest.raises(checkpoint.CheckpointError) as info:
        train_and_evaluate(
            None, TrainConfig(), copied_run, dataset="fashion_mnist", resume=True, progress=False
        )
    assert str(info.value) == (
        f"{copied_run} is a run on 'mnist'; it cannot resume on 'fashion_mnist'"
    )

    def written_before(meta):  # the dataset in the model's config, none beside it
        meta["model"]["dataset"] = meta.pop("dataset")
        del meta["checksum"]

    _edit(copied_run, written_before)
    model, _, meta = checkpoint.load_params(copied_run)
    assert model == LeNet5() and meta["dataset"] == "mnist"


def test_a_json_naming_another_model_is_refused_even_without_a_checksum(copied_run):
    def other_model(meta):
        meta["model"]["activation"] = "relu"  # same shapes: only the checksum can tell
        del meta["checksum"]

    _edit(copied_run, other_model)
    checkpoint.load_params(copied_run)  # an unchecked JSON of the same shapes still loads

    def other_shapes(meta):
        meta["model"] = {"name": "cnn"}

    _edit(copied_run, other_shapes)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_params(copied_run)
    assert str(info.value) == (
        f"{copied_run}: the weights do not fit cnn(num_classes=10) named in the "
        "checkpoint's JSON; it was edited or comes from another run"
    )


# ----------------------------------------------------------------------------- 4. inputs

OPTIONS = {
    "smoothgrad": dict(n_samples=4),
    "integrated_gradients": dict(n_steps=4),
    "occlusion": dict(window=8, stride=8),
}


@pytest.fixture(scope="module")
def model_fn():
    model = LeNet5()
    return explained(model, init_params(model, jax.random.key(0)))


@pytest.mark.parametrize("name", list(explain.METHODS))
def test_bad_inputs_are_errors_eagerly_and_nan_under_jit(name, model_fn):
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 1), jnp.float32)
    nan_x = x.at[1, 5, 5, 0].set(jnp.nan)
    options = OPTIONS.get(name, {})

    def method(v, t=None):
        return explain.attribute(name, model_fn, v, t, **options)

    with pytest.raises(ValueError) as info:
        method(nan_x)
    assert str(info.value) == (
        "x holds NaN or inf values in 1 sample(s), the first at index 1; their explanations "
        "would be NaN"
    )
    with pytest.raises(ValueError, match=r"^empty batch: x has shape \(0, 32, 32, 1\)"):
        method(x[:0])
    with pytest.raises(ValueError, match=r"^target 10 out of range: the model has classes 0..9$"):
        method(x, 10)
    # under jit nothing can be checked: the samples with a bad input or target get NaN maps
    maps = np.asarray(jax.jit(method)(x, jnp.array([3, 10, -1]))).reshape(3, -1)
    np.testing.assert_array_equal(np.isnan(maps).all(1), [False, True, True])
    assert np.isfinite(maps[0]).all()
    maps = np.asarray(jax.jit(method)(nan_x)).reshape(3, -1)
    np.testing.assert_array_equal(np.isnan(maps).all(1), [False, True, False])
    # NaN, inf and -inf anywhere (a corner, which a gradient may not reach): NaN maps, never a
    # finite or all-zero one
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        maps = np.asarray(jax.jit(method)(x.at[2, 0, 0, 0].set(bad))).reshape(3, -1)
        np.testing.assert_array_equal(np.isnan(maps).all(1), [False, False, True])
        assert np.isfinite(maps[:2]).all()


def test_what_a_model_gets_wrong_is_one_line():
    import functools

    import flax.linen as nn
    from flax import nnx

    x = jnp.ones((2, 32, 32, 1))
    lenet = LeNet5()
    variables = {"params": init_params(lenet, jax.random.key(0))}
    pair = lambda v: (lenet.apply(variables, v), v)  # noqa: E731
    for name in explain.METHODS:
        with pytest.raises(ValueError) as info:
            explain.attribute(name, pair, x, **OPTIONS.get(name, {}))
        assert str(info.value) in (
            "the model must return one array of logits [B, K], got a tuple",
            "the model must map one array to one array of logits [B, K]",
        ), name
    flat = lambda v: lenet.apply(variables, v)[:, 0]  # noqa: E731
    deep = lambda v: lenet.apply(variables, v)[..., None]  # noqa: E731
    for f, shape in ((flat, "(2,)"), (deep, "(2, 10, 1)")):
        with pytest.raises(ValueError) as info:
            explain.lrp(f, x)
        assert str(info.value) == (
            f"the model must return logits [B, K] for a batch of 2, got shape {shape}"
        )
    with pytest.raises(
        ValueError, match=r"^batch_size must be None or a positive integer, got -1$"
    ):
        explain.smoothgrad(model_fn_of(lenet, variables), x, batch_size=-1)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, v, train: bool = True):
            v = nn.BatchNorm(use_running_average=not train)(v.reshape(v.shape[0], -1))
            return nn.Dense(3)(v)

    net = Net()
    nv = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError) as info:
        explain.lrp(functools.partial(net.apply, nv), x)
    assert str(info.value).startswith(
        "the model tried to update a variable collection, i.e. it runs in training mode: pass "
        "its evaluation mode, e.g. functools.partial(model.apply, variables, train=False)"
    )
    with pytest.raises(ValueError, match="runs in training mode"):
        explain.saliency(functools.partial(net.apply, nv), x)
    assert explain.lrp(functools.partial(net.apply, nv, train=False), x).shape == x.shape

    class Needs(nn.Module):
        @nn.compact
        def __call__(self, v, train):
            return nn.Dense(3)(v.reshape(v.shape[0], -1))

    needs = Needs()
    with pytest.raises(ValueError, match=r"^calling the model with x alone failed \(.*train"):
        explain.saliency(functools.partial(needs.apply, needs.init(jax.random.key(0), x, True)), x)

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.dense = nnx.Linear(32 * 32, 3, rngs=rngs)

        def __call__(self, v):
            return self.dense(self.drop(v.reshape(v.shape[0], -1)))

    model = NNXNet(nnx.Rngs(0))
    for method in (explain.lrp, explain.saliency, explain.grad_cam):
        with pytest.raises(ValueError) as info:
            method(model, x)
        assert str(info.value) == (
            "the NNX model is in training mode (drop): call model.eval() before explaining it"
        )
    model.eval()
    assert explain.lrp(model, x).shape == x.shape


def model_fn_of(model, variables):
    return lambda v: model.apply(variables, v)


# ----------------------------------------------------------------------------- 5. command lines


def test_explain_bounds_the_number_of_images_before_any_work(tiny_run, tmp_path):
    r = run_script("explain.py", "--run", tiny_run, "--n", 100000, "--out", tmp_path / "x.png")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "explain.py: error: 100000 images asked for, but a figure shows at most 64; explain "
        "fewer (or use scripts/evaluate.py to score many)"
    )
    assert list(tmp_path.iterdir()) == []


def test_evaluate_with_no_method_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "eval"
    r = run_script("evaluate.py", "--run", tiny_run, "--methods", ",", "--out", out)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "evaluate.py: error: nothing to evaluate: name at least one method (and, for lrp, one "
        "composite), or all"
    )
    assert not out.exists()


def test_evaluate_records_how_many_images_it_evaluated(tiny_run, tmp_path, monkeypatch, mnist):
    import lenet_jax.evaluation_report as evaluation_report

    images, labels = mnist["test"]
    monkeypatch.setattr(
        evaluation_report, "load_dataset", lambda *a, **k: (images[:12], labels[:12])
    )
    results = evaluate_run(
        tiny_run,
        methods=["saliency"],
        n=20000,
        n_randomization=100,
        out=tmp_path / "eval",
        progress=False,
    )
    assert results["n"] == 12 and results["n_randomization"] == 12
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["n"] == 12
    assert files(tmp_path / "eval") == [
        "evaluation.csv",
        "evaluation.json",
        "evaluation.md",
        "flipping_curves.png",
        "randomization.png",
    ]


def test_nan_in_the_first_epoch_promises_no_checkpoint_and_leaves_no_folder(
    tmp_path, mnist, monkeypatch
):
    real_epoch = experiment.train_epoch

    def nan_at_once(state, *args, **kwargs):
        state, sums = real_epoch(state, *args, **kwargs)
        return state, {**sums, "loss_sum": sums["loss_sum"] * jnp.nan}

    monkeypatch.setattr(experiment, "train_epoch", nan_at_once)
    with pytest.raises(TrainingDiverged) as info:
        train(tmp_path / "run")
    assert str(info.value) == (
        "training loss became nan in epoch 1; no checkpoint was written; try a lower --lr"
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ runs are never silently replaced


def test_a_folder_holding_another_runs_files_is_refused_unless_overwrite(tmp_path, mnist):
    run = tmp_path / "m1"
    run.mkdir()
    (run / "metrics.json").write_text('{"history": [1, 2, 3]}')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch_002.json").write_text("{truncated")
    with pytest.raises(checkpoint.CheckpointError) as info:
        train(run)
    assert str(info.value) == (
        f"{run} already holds files of a run (checkpoints, metrics.json); use --resume to "
        "continue it, --overwrite to move them aside, or another --out"
    )
    assert files(run) == ["checkpoints/epoch_002.json", "metrics.json"]  # untouched
    r = run_script("train.py", "--out", run, "--train-limit", 128, "--epochs", 1, "--no-figures",
                   "--no-progress", "--resume", "--overwrite")  # fmt: skip
    assert r.returncode == 2 and "choose one" in r.stderr
    train(run, overwrite=True)
    (aside,) = (tmp_path / "m1.replaced").iterdir()
    assert files(aside) == ["checkpoints/epoch_002.json", "metrics.json"]
    assert json.loads((aside / "metrics.json").read_text()) == {"history": [1, 2, 3]}
    assert files(run) == COMPLETE_RUN  # a whole new run, nothing of the old one mixed in


def test_two_default_run_folders_made_in_the_same_second_differ(tmp_path, monkeypatch):
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 12, 0, 0)

    monkeypatch.setattr(experiment.datetime, "datetime", Frozen)
    made = [experiment.new_run_dir(tmp_path) for _ in range(3)]
    assert [p.name for p in made] == ["20261206-120000", "20261206-120000-1", "20261206-120000-2"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ck: ck["msgpack"].write_bytes(ck["msgpack"].read_bytes()[:-100]), "msgpack"),
        (lambda ck: _flip(ck["msgpack"]), "msgpack"),
        (lambda ck: ck["json"].write_text(ck["json"].read_text()[:-40]), "json"),
        (lambda ck: ck["msgpack"].unlink(), "missing"),
    ],
    ids=["truncated_state", "flipped_state", "truncated_json", "missing_state"],
)
def test_a_damaged_newest_checkpoint_is_refused_naming_it_and_the_way_back(
    tmp_path, tiny_run, damage, message
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints"
    # a second epoch, as a longer run would have: the first one's files under the next name
    for ext in ("msgpack", "json"):
        shutil.copy(ckpt / f"epoch_001.{ext}", ckpt / f"epoch_002.{ext}")
    meta = json.loads((ckpt / "epoch_002.json").read_text())
    meta.update(epoch=2, state_file="epoch_002.msgpack")
    meta["checksum"] = checkpoint._checksum(meta)
    (ckpt / "epoch_002.json").write_text(json.dumps(meta))
    assert checkpoint.latest_checkpoint(run)[0]["epoch"] == 2
    damage({"msgpack": ckpt / "epoch_002.msgpack", "json": ckpt / "epoch_002.json"})
    expected = {
        "msgpack": f"{ckpt / 'epoch_002.msgpack'} is damaged (its sha256 does not match "
        "epoch_002.json); pass --epoch 1 to use the previous epoch, or restore it",
        "json": f"{ckpt / 'epoch_002.json'} is damaged (",
        "missing": f"{ckpt / 'epoch_002.msgpack'} cannot be read (No such file or directory); "
        "pass --epoch 1 to use the previous epoch, or restore it",
    }[message]
    for script in ("explain.py", "evaluate.py", "serve.py"):
        r = run_script(script, "--run", run, "--n", 2) if script != "serve.py" else (
            run_script(script, "--run", run, "--port", 1)
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith(f"{script}: error: {expected}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not list(run.glob("explain_*")) and not (run / "evaluation").exists()
    r = run_script("explain.py", "--run", run, "--n", 2, "--epoch", 1, "--method", "saliency")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"Run {run}: lenet5 on MNIST, epoch 1 of 1")
    r = run_script("explain.py", "--run", run, "--epoch", 7)
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"explain.py: error: {run} has no checkpoint of epoch 7; its epochs are [1, 2]"
    )


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    "name, options, copies",
    [
        ("saliency", {}, 1),
        ("gradient_x_input", {}, 1),
        ("grad_cam", {}, 1),
        ("lrp", {}, 4),
        ("smoothgrad", dict(n_samples=8), 8),
        ("integrated_gradients", dict(n_steps=8), 8),
        ("score_cam", {}, 17),  # conv2's 16 masked copies and the image
        ("occlusion", dict(window=8, stride=8), 17),  # 16 occluded copies and the image
    ],
)
def test_batches_are_chunked_to_the_memory_budget_with_the_same_maps(
    name, options, copies, model_fn, monkeypatch
):
    import sys

    from lenet_jax.explain import common

    x = jax.random.normal(jax.random.key(3), (10, 32, 32, 1), jnp.float32)
    whole = np.asarray(explain.attribute(name, model_fn, x, **options))
    seen = []
    real_map = common.chunked_map

    def spy(fn, xs, chunk_size):
        seen.append(chunk_size)
        return real_map(fn, xs, chunk_size)

    one = common.activation_bytes(model_fn, x)
    monkeypatch.setattr(common, "MEMORY_BUDGET", 3 * (3 * copies * one))  # three images fit
    for module in ("gradients", "cams", "lrp"):
        monkeypatch.setattr(sys.modules[f"lenet_jax.explain.{module}"], "chunked_map", spy)
    chunked = np.asarray(explain.attribute(name, model_fn, x, **options))
    assert seen == [3], seen
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())


def test_twenty_thousand_images_ask_for_chunks_not_gigabytes(model_fn):
    from lenet_jax.explain.common import MEMORY_BUDGET, activation_bytes, auto_batch_size

    x = jax.ShapeDtypeStruct((20_000, 32, 32, 1), jnp.float32)
    per_image = activation_bytes(model_fn, x)
    assert 50_000 < per_image < 200_000  # LeNet-5's activations of one image, in bytes
    size = auto_batch_size(model_fn, x, 50, None)  # SmoothGrad's 50 noisy copies
    fits = MEMORY_BUDGET // (3 * 50 * per_image)
    chunks = -(-20_000 // fits)
    assert size == -(-20_000 // chunks) <= fits  # equal chunks, each within the budget
    assert (
        auto_batch_size(
            model_fn,
            x[:1] if False else jax.ShapeDtypeStruct((8, 32, 32, 1), jnp.float32),
            50,
            None,
        )
        is None
    )
    assert auto_batch_size(model_fn, x, 50, 64) == 64


def test_a_true_out_of_memory_is_one_line_naming_the_method_and_a_batch_that_fits(model_fn):
    def exhausted(v):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 25 GB")

    x = jnp.ones((400, 32, 32, 1))
    with pytest.raises(MemoryError) as info:
        explain.saliency(exhausted, x)
    assert str(info.value) == (
        "saliency ran out of memory on a batch of 400: pass a smaller batch_size, e.g. "
        "batch_size=100 (RESOURCE_EXHAUSTED: Out of memory allocating 25 GB)"
    )
