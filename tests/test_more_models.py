"""Every model on every dataset: training on mock CIFAR-10, the methods on color inputs, the reports."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from test_datasets import cifar_tarball

from lenet_jax import data, explain
from lenet_jax.checkpoint import load_params
from lenet_jax.data import normalized_range
from lenet_jax.evaluation_report import evaluate_run
from lenet_jax.experiment import train_and_evaluate
from lenet_jax.models import CNN, MiniVGG, dataset_options, explained
from lenet_jax.recipes import RECIPES, recipe
from lenet_jax.report import explain_run

pytestmark = pytest.mark.usefixtures("float64")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """MiniVGG trained for one epoch on a synthetic CIFAR-10 tarball (the real one is not reachable
    from our machines), through the same source, checksum and reader as the real data."""
    root = tmp_path_factory.mktemp("cifar")
    tarball, _ = cifar_tarball(n_train_per_batch=8, n_test=12)
    (root / data.CIFAR10_TARBALL).write_bytes(tarball)
    fake = dataclasses.replace(
        data.DATASETS["cifar10"], sha256={data.CIFAR10_TARBALL: data.sha256(tarball)}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "cifar10", fake)
        config = dataclasses.replace(recipe("minivgg"), epochs=1, batch_size=16)
        metrics = train_and_evaluate(
            MiniVGG(), config, root / "run", dataset="cifar10", data_dir=root, progress=False
        )
        yield root, metrics


def test_minivgg_trains_on_mock_cifar10_and_records_its_dataset(cifar_run):
    root, metrics = cifar_run
    assert metrics["dataset"] == "cifar10" and metrics["param_count"] == 2_355_338
    assert metrics["classes"][:3] == ["airplane", "automobile", "bird"]
    assert metrics["test"]["count"] == 12 and np.isfinite(metrics["history"][0]["train"]["loss"])
    assert metrics["config"]["optimizer"] == "adam" and metrics["config"]["lr"] == 4e-4
    model, params, meta = load_params(root / "run")
    assert model == MiniVGG() and meta["step"] == 3  # 40 images, batches of 16
    assert meta["dataset"] == "cifar10"  # the run records its dataset, the model does not
    saved = json.loads((root / "run" / "metrics.json").read_text())
    assert saved["normalization"]["mean"] == [0.4914, 0.4822, 0.4465]
    for png in ("curves.png", "confusion_matrix.png", "per_class_accuracy.png", "samples.png"):
        assert (root / "run" / png).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_every_method_explains_the_color_run(cifar_run, tmp_path):
    root, _ = cifar_run
    written = explain_run(root / "run", "all", n=4, out=tmp_path / "all.png", data_dir=root)
    assert written["png"].read_bytes()[:8] == PNG
    saved = np.load(written["npz"])
    for name in explain.METHODS:
        assert saved[name].shape == (4, 32, 32) and np.isfinite(saved[name]).all(), name
    written = explain_run(root / "run", "grad_cam", n=4, out=tmp_path / "cam.png", data_dir=root)
    assert np.load(written["npz"])["attribution"].shape == (4, 32, 32)


@pytest.mark.slow
def test_the_evaluation_runs_on_the_color_run(cifar_run, tmp_path):
    root, _ = cifar_run
    results = evaluate_run(
        root / "run",
        methods=["lrp", "grad_cam", "integrated_gradients"],
        composites=["epsilon_plus_flat"],
        n=8,
        n_randomization=2,
        out=tmp_path,
        data_dir=root,
        progress=False,
    )
    rows = {r["method"]: r for r in results["rows"]}
    assert sorted(rows) == ["grad_cam", "integrated_gradients", "lrp:epsilon_plus_flat"]
    assert len(rows["grad_cam"]["randomization_by_layer"]) == 7  # MiniVGG's parametrized layers
    assert rows["integrated_gradients"]["conservation_error"] < 0.05
    assert all(np.isfinite(r["morf_aopc"]) for r in rows.values())


def test_cams_of_minivgg_default_to_its_last_conv_layer():
    model = MiniVGG()
    params = random_params(model, seed=5, bias_scale=0.01, dtype=jnp.float32, dataset="cifar10")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    acts, _ = explain.layer_activations(explained(model, params), x)
    assert acts.shape == (2, 16, 16, 128)  # conv4's output
    low = explain.grad_cam(explained(model, params), x, target=1, upsample=False)
    np.testing.assert_allclose(
        low, explain.grad_cam(explained(model, params), x, target=1, layer="conv4", upsample=False)
    )
    assert low.shape == (2, 16, 16)
    assert explain.score_cam(explained(model, params), x, target=1).shape == (2, 32, 32)


def test_integrated_gradients_on_color_inputs_take_a_per_channel_black():
    model = MiniVGG()
    params = random_params(model, seed=6, bias_scale=0.01, dataset="cifar10")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float64)
    per_channel = dataset_options("cifar10")["baseline"]
    assert per_channel.shape == (3,)
    attr, gap = explain.integrated_gradients(
        explained(model, params), x, 3, n_steps=8, return_gap=True, baseline=per_channel
    )
    black = jnp.broadcast_to(jnp.asarray(normalized_range("cifar10")[0], x.dtype), x.shape)
    logit = lambda v: model.apply({"params": params}, v)[:, 3]  # noqa: E731
    delta = logit(x) - logit(black)
    # the gap is measured against f at the per-channel black image: the baseline IG integrated from
    np.testing.assert_allclose(attr.reshape(2, -1).sum(1) + gap, delta, rtol=1e-9)


def test_every_model_has_a_recipe_and_presets_override_it():
    assert sorted(RECIPES) == ["cnn", "lenet5", "lenet5_relu", "minivgg", "vit"]
    assert (RECIPES["minivgg"].optimizer, RECIPES["minivgg"].lr, RECIPES["minivgg"].epochs) == (
        "adam",
        4e-4,
        14,
    )
    fast = recipe("lenet5", "fast")
    assert fast.augment_shift > 0 and fast.label_smoothing > 0 and fast.schedule == "onecycle"
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        recipe("lenet5", "slow")


@pytest.mark.slow
def test_the_cnn_trains_on_native_28x28_mnist_and_is_explained(mnist, tmp_path):
    config = dataclasses.replace(recipe("cnn"), epochs=2)
    metrics = train_and_evaluate(
        CNN(), config, tmp_path / "run", train_limit=6000, figures=False, progress=False
    )
    assert metrics["test"]["accuracy"] > 0.93  # 6,000 digits, two epochs (94.9% seen)
    written = explain_run(tmp_path / "run", "lrp", n=3, layer="conv2", out=tmp_path / "lrp.png")
    saved = np.load(written["npz"])
    assert saved["attribution"].shape == (3, 28, 28)
    assert written["layer_png"].read_bytes()[:8] == PNG
