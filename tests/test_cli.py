"""The command lines (explain, evaluate, profile, benchmark) on small inputs, as a user runs them."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import require

from lenet_jax import cpu_kernels, explain
from lenet_jax.attribution import with_dataset_options
from lenet_jax.checkpoint import load_params
from lenet_jax.data import load_mnist
from lenet_jax.evaluation_report import evaluate_run
from lenet_jax.image_files import read_images
from lenet_jax.models import ViT, dataset_options, explained, model_input
from lenet_jax.report import explain_run, output_name, split_options

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(name, *args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.slow
def test_explain_lrp_writes_heatmaps_relevance_and_feature_maps(tiny_run, tmp_path):
    out = tmp_path / "lrp.png"
    r = run_script(
        "explain.py",
        "--method",
        "lrp",
        "--run",
        tiny_run,
        "--n",
        4,
        "--layer",
        "conv2",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == PNG
    assert (tmp_path / "lrp_conv2.png").read_bytes()[:8] == PNG
    saved = np.load(tmp_path / "lrp.npz")
    assert saved["attribution"].shape == (4, 32, 32)
    np.testing.assert_array_equal(saved["indices"], [0, 1, 2, 3])
    np.testing.assert_allclose(
        saved["relevance_sum"], saved["attribution"].reshape(4, -1).sum(1), rtol=1e-5
    )


@pytest.mark.slow
def test_explain_all_draws_every_method(tiny_run, tmp_path):
    r = run_script(
        "explain.py", "--method", "all", "--run", tiny_run, "--n", 4, "--out", tmp_path / "all.png"
    )
    assert r.returncode == 0, r.stderr
    saved = np.load(tmp_path / "all.npz")
    for name in (
        "lrp",
        "saliency",
        "smoothgrad",
        "integrated_gradients",
        "grad_cam",
        "score_cam",
        "occlusion",
        "gradient_x_input",
    ):
        assert saved[name].shape == (4, 32, 32)
    assert (saved["pred"] != saved["labels"]).sum() >= 1  # the mix shows a misclassified digit


@pytest.mark.slow  # runs a script: the command lines are the end-to-end tier
def test_explain_without_a_run_says_to_train_first(tmp_path):
    r = run_script("explain.py", "--method", "lrp", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "explain.py: error: no trained run in runs/; train one first: python scripts/train.py"
    )


def test_explain_bad_input_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    r = run_script("explain.py", "--run", tmp_path / "missing")
    assert r.returncode == 1 and "run folder" in r.stderr and "does not exist" in r.stderr
    r = run_script("explain.py", "--run", tiny_run, "--out", tmp_path / "x.jpg", "--n", 2)
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"explain.py: error: --out must name a .png file, got {tmp_path / 'x.jpg'}"
    )
    r = run_script("explain.py", "--method", "lime")
    assert r.returncode == 2 and "invalid choice: 'lime'" in r.stderr
    out = tmp_path / "sg.png"

    def smoothgrad_with(option):
        return run_script(
            "explain.py",
            "--run",
            tiny_run,
            "--method",
            "smoothgrad",
            "--option",
            option,
            "--out",
            out,
        )

    r = smoothgrad_with("n_sample=8")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "explain.py: error: unknown option 'n_sample' for smoothgrad; "
        "choose one of ['batch_size', 'n_samples', 'noise_level', 'variant']"
    )
    r = smoothgrad_with("n_samples=many")
    assert r.returncode == 1
    assert r.stderr.strip() == "explain.py: error: option n_samples must be of type int, got 'many'"
    r = run_script("explain.py", "--run", tiny_run, "--option", "window", "--out", out)
    assert r.returncode == 2 and "argument --option: 'window' is not KEY=VALUE" in r.stderr
    # a bad --layer is found before the attributions are saved
    r = run_script("explain.py", "--run", tiny_run, "--layer", "conv9", "--n", 2, "--out", out)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "explain.py: error: unknown layer 'conv9' for feature maps; "
        "choose one of ['conv1', 'conv2']"
    )
    r = run_script("explain.py", "--run", tiny_run, "--indices", "1,2", "--image", out)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="saliency", layer="conv2"),
            "--layer applies to lrp and the CAMs, not to saliency",
        ),
        (dict(indices=[3, 10000]), "test index 10000 out of range: the test set has 10000 images"),
        (dict(target=10), "target 10 out of range: the model has classes 0..9"),
        (dict(images=["missing.png"]), "no such image file: missing.png"),
        (dict(images=["a.png"], indices=[1]), "give test indices or image files, not both"),
    ],
)
def test_explain_run_rejects_bad_choices_before_writing(tiny_run, tmp_path, kwargs, message):
    kwargs = {"method": "lrp", **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        explain_run(tiny_run, out=tmp_path / "x.png", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_explain_chosen_images_for_a_chosen_class(tiny_run, tmp_path):
    model, params, _ = load_params(tiny_run)
    images, labels = load_mnist("test", progress=False)
    written = explain_run(tiny_run, "lrp", indices=[5, 3], target=2, out=tmp_path / "t.png")
    saved = np.load(written["npz"])
    np.testing.assert_array_equal(saved["indices"], [5, 3])
    np.testing.assert_array_equal(saved["labels"], labels[[5, 3]])
    np.testing.assert_array_equal(saved["target"], [2, 2])
    direct = explain.lrp(
        explained(model, params), model_input(model, "mnist").preprocess(images[[5, 3]]), 2
    )
    np.testing.assert_allclose(
        saved["attribution"], np.asarray(direct).sum(-1), rtol=1e-5, atol=1e-6
    )
    assert written["png"].read_bytes()[:8] == PNG

    # the same digits as picture files, dark ink on white paper, enlarged
    files = []
    for i in (5, 3):
        files.append(tmp_path / f"digit{i}.png")
        plt.imsave(files[-1], 1 - np.kron(images[i] / 255, np.ones((2, 2))), cmap="gray")
    written = explain_run(tiny_run, "saliency", images=files, out=tmp_path / "files.png")
    saved = np.load(written["npz"])
    assert list(saved["files"]) == [str(f) for f in files] and "labels" not in saved
    x = model_input(model, "mnist").preprocess(read_images(files))
    np.testing.assert_array_equal(saved["pred"], np.argmax(model.apply({"params": params}, x), -1))
    np.testing.assert_allclose(
        saved["attribution"],
        np.asarray(explain.saliency(explained(model, params), x)).sum(-1),
        rtol=1e-5,
        atol=1e-7,  # float32 rounding of the tiny gradients, jitted vs not
    )


def test_dataset_options_fill_only_what_a_method_takes_and_leaves_unset():
    from lenet_jax.models import LeNet5

    model = LeNet5()
    data = dataset_options("mnist")
    assert with_dataset_options("lrp", model, "mnist", {"low": -1.0, "composite": "epsilon"}) == {
        "low": -1.0,
        "high": data["high"],
        "composite": "epsilon",
    }
    expected = {"baseline": data["baseline"]}
    assert with_dataset_options("integrated_gradients", model, "mnist", {}) == expected
    fashion = with_dataset_options("integrated_gradients", model, "fashion_mnist", {})
    assert fashion == {"baseline": dataset_options("fashion_mnist")["baseline"]} != expected
    assert with_dataset_options("saliency", model, "mnist", {"absolute": False}) == {
        "absolute": False
    }
    assert with_dataset_options("lrp", model, "mnist", {})["composite"] == "epsilon_plus_flat"
    assert with_dataset_options("lrp", ViT(), "mnist", {})["composite"] == "attn_lrp"


@pytest.mark.slow
def test_explain_a_vit_run_uses_attn_lrp_by_default(tiny_vit_run, tmp_path):
    r = run_script("explain.py", "--method", "lrp", "--run", tiny_vit_run, "--n", 3)
    assert r.returncode == 0, r.stderr
    npz = tiny_vit_run / "explain_lrp_attn_lrp_first3.npz"
    assert f"wrote {npz}" in r.stdout
    model, params, _ = load_params(tiny_vit_run)
    x = model_input(model, "mnist").preprocess(load_mnist("test")[0][:3])
    expected = explain.lrp(explained(model, params), x, composite="attn_lrp").sum(-1)
    np.testing.assert_allclose(np.load(npz)["attribution"], expected, rtol=1e-4, atol=1e-6)


def test_default_output_names_differ_by_method_options_and_inputs():
    names = [
        output_name("all", "epsilon_plus_flat", None, None, {}, 16, None, None),
        output_name("all", "epsilon_plus_flat", None, None, {}, 16, None, ["a/my_digit.png"]),
        output_name("all", "epsilon_plus_flat", 3, None, {}, 16, [0, 7, 42], None),
        output_name("smoothgrad", "epsilon", None, None, {"n_samples": 100}, 4, None, None),
    ]
    assert names == [
        "explain_all_epsilon_plus_flat_first16.png",
        "explain_all_epsilon_plus_flat_my_digit.png",
        "explain_all_epsilon_plus_flat_target3_indices0-7-42.png",
        "explain_smoothgrad_n_samples=100_first4.png",
    ]


@pytest.mark.slow
def test_explain_image_prints_the_prediction_and_names_its_figure(tiny_run, tmp_path):
    images, _ = load_mnist("test", progress=False)
    digit = tmp_path / "my_digit.png"
    plt.imsave(digit, 1 - images[0] / 255, cmap="gray")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = run_script("explain.py", "--run", run, "--method", "saliency", "--image", digit)
    assert r.returncode == 0, r.stderr
    out = run / "explain_saliency_my_digit.png"
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"Run {run}: lenet5 on MNIST, epoch 1 of 1, test accuracy ")
    assert lines[1:3] == [f"wrote {out.with_suffix('.npz')}", f"wrote {out}"]
    saved = np.load(out.with_suffix(".npz"))
    probs = np.exp(saved["logits"][0]) / np.exp(saved["logits"][0]).sum()
    assert lines[3] == (f"{digit}: predicted {probs.argmax()} (probability {probs.max():.3f})")


def test_explain_options_reach_the_method(tiny_run, tmp_path):
    written = explain_run(
        tiny_run, "occlusion", n=2, out=tmp_path / "occ.png", options={"window": 8, "stride": 8}
    )
    saved = np.load(written["npz"])
    model, params, _ = load_params(tiny_run)
    images, _ = load_mnist("test", progress=False)
    black = dataset_options("mnist")["baseline"]
    direct = explain.occlusion(
        explained(model, params),
        model_input(model, "mnist").preprocess(images[saved["indices"]]),
        window=8,
        stride=8,
        baseline=black,
    )
    np.testing.assert_allclose(
        saved["attribution"], np.asarray(direct).sum(-1), rtol=1e-5, atol=1e-6
    )
    default = explain.occlusion(
        explained(model, params),
        model_input(model, "mnist").preprocess(images[saved["indices"]]),
        baseline=black,
    )
    assert not np.allclose(saved["attribution"], np.asarray(default).sum(-1), atol=1e-3)


def test_split_options_routes_each_option_to_the_methods_that_take_it():
    routed = split_options("all", {"window": 8, "align_corners": True, "batch_size": 5})
    assert routed["occlusion"] == {"window": 8, "batch_size": 5}
    assert routed["score_cam"] == {"align_corners": True, "batch_size": 5}
    assert routed["saliency"] == routed["grad_cam"] == {"batch_size": 5}  # every method chunks
    assert split_options("all", {"align_corners": True})["saliency"] == {}
    assert split_options("smoothgrad", {"noise_level": 1}) == {"smoothgrad": {"noise_level": 1.0}}
    assert (
        type(split_options("smoothgrad", {"noise_level": 1})["smoothgrad"]["noise_level"]) is float
    )
    with pytest.raises(ValueError, match="unknown option 'key' for smoothgrad"):
        split_options("smoothgrad", {"key": 3})  # a PRNG key is not a command-line value
    with pytest.raises(ValueError, match="option absolute must be of type bool, got 1"):
        split_options("saliency", {"absolute": 1})


@pytest.mark.slow
def test_evaluate_run_writes_tables_and_figures(tiny_run, tmp_path):
    results = evaluate_run(
        tiny_run,
        methods=["saliency", "lrp"],
        composites=["epsilon_plus"],
        n=16,
        n_randomization=4,
        out=tmp_path,
        progress=False,
    )
    assert [r["method"] for r in results["rows"]] == ["saliency", "lrp:epsilon_plus"]
    for row in results["rows"]:
        assert -1 <= row["faithfulness_corr"] <= 1 and 0 <= row["sparseness"] <= 1
        assert len(row["randomization_by_layer"]) == 5 and row["ms_per_image"] > 0
    assert results["rows"][0]["conservation_error"] is None
    assert results["rows"][1]["conservation_error"] >= 0
    assert json.loads((tmp_path / "evaluation.json").read_text())["n"] == 16
    csv = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert csv[0].startswith("method,morf_aopc,lerf_aopc") and len(csv) == 3
    assert "| lrp:epsilon_plus |" in (tmp_path / "evaluation.md").read_text()
    for png in ("flipping_curves.png", "randomization.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_evaluate_rejects_unknown_methods(tiny_run):
    r = run_script("evaluate.py", "--run", tiny_run, "--methods", "saliency,lime")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("evaluate.py: error: unknown method or composite 'lime'")


@pytest.mark.slow
def test_benchmark_writes_its_table(tmp_path, mnist):
    r = run_script(
        "benchmark.py",
        "--only",
        "explain",
        "--methods",
        "lrp,saliency",
        "--images",
        64,
        "--repeats",
        1,
        "--no-peers",
        "--out",
        tmp_path / "b",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "b.json").read_text())
    assert [row["name"] for row in out["rows"]] == ["JAX lrp", "JAX saliency"]
    assert all(row["images_per_s"] == 64 / row["median_s"] for row in out["rows"])
    assert set(out["ratios"]) == {
        "LRP time / saliency time",
        "JAX LRP first call (tracing + compiling), s",
    }
    r = run_script("benchmark.py", "--only", "gpu")
    assert r.returncode == 2 and "unknown section or method 'gpu'" in r.stderr
    if not any(d.platform == "gpu" for d in jax.devices()):
        r = run_script("benchmark.py", "--device", "gpu", "--out", tmp_path / "g")
        assert (
            r.returncode == 1 and "--device gpu: JAX finds no GPU (its backend is cpu" in r.stderr
        )
        assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_benchmark_times_resnet18_lrp_against_its_saliency(tmp_path, mnist):
    args = ("--only", "resnet", "--resnet-images", 2, "--resnet-size", 32, "--repeats", 1)
    r = run_script("benchmark.py", *args, "--no-peers", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    lrp, saliency = out["rows"]
    assert lrp["name"] == "JAX lrp, ResNet-18 (Linen), 2 images of 32x32"
    assert out["ratios"]["LRP time / saliency time, ResNet-18"] == (
        lrp["median_s"] / saliency["median_s"]
    )
    assert cpu_kernels.XLA_FLAG in out["xla_flags"]  # the script set it before JAX started


def test_the_explorer_benchmark_answers_every_request(tiny_run, tmp_path):
    r = run_script("benchmark_explorer.py", "--run", tiny_run, "--requests", 2, "--out",
                   tmp_path / "e")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [row["methods"] for row in rows][0] == "prediction + LRP + saliency + Grad-CAM"
    assert all(0 < row["compute_median_ms"] <= row["median_ms"] for row in rows)


@pytest.mark.slow
@pytest.mark.peers
def test_benchmark_bounds_score_cam_by_its_forward_passes(tmp_path, mnist):
    require("torch")  # the PyTorch rows; in CI a missing peer fails instead of skipping
    r = run_script(
        "benchmark.py",
        "--only",
        "explain",
        "--methods",
        "score_cam",
        "--images",
        20,
        "--repeats",
        1,
        "--out",
        tmp_path / "b",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "b.json").read_text())
    rows = {row["name"].split(" (")[0]: row for row in out["rows"]}
    # one forward pass per image and conv2 channel: 20 x 16 masked inputs
    assert "JAX forward of Score-CAM's 320 masked inputs" in rows
    assert "PyTorch forward of the same inputs" in rows
    forwards = rows["JAX forward of Score-CAM's 320 masked inputs"]["median_s"]
    loop = rows["Score-CAM per-image loop"]["median_s"]
    key = "Score-CAM per-image loop time / JAX forward of its masked inputs"
    assert out["ratios"][key] == loop / forwards
    assert out["machine"] in (tmp_path / "b.md").read_text()


def test_explain_lrp_feature_maps_use_the_same_rule_options(tiny_run, tmp_path, monkeypatch):
    from lenet_jax import plot

    drawn = []
    draw = plot.feature_map_relevance
    monkeypatch.setattr(
        plot, "feature_map_relevance", lambda maps, *a: drawn.append(maps) or draw(maps, *a)
    )
    options = {"epsilon": 5.0}
    written = explain_run(
        tiny_run, "lrp", indices=[4], layer="conv2", options=options, out=tmp_path / "l.png"
    )
    model, params, _ = load_params(tiny_run)
    x = model_input(model, "mnist").preprocess(load_mnist("test", progress=False)[0][[4]])
    rels = explain.lrp_layerwise(explained(model, params), x, epsilon=5.0)
    np.testing.assert_allclose(drawn[0], np.asarray(rels["conv2"][0]), rtol=1e-5, atol=1e-7)
    default = explain.lrp_layerwise(explained(model, params), x)["conv2"][0]
    assert not np.allclose(drawn[0], np.asarray(default), rtol=1e-3)
    assert written["layer_png"].read_bytes()[:8] == PNG


def test_argument_types_parse_or_say_why_in_one_line():
    import argparse

    from lenet_jax import cli

    assert cli.index_list("0,7,42") == [0, 7, 42]
    assert cli.non_negative_int("0") == 0
    assert cli.key_value("n_samples=100") == ("n_samples", 100)
    assert cli.key_value("variant=vargrad") == ("variant", "vargrad")
    for parse, text, why in [
        (cli.index_list, "3,x", "'3,x' is not a comma-separated list of integers"),
        (cli.index_list, "1,-2", "'1,-2': indices must be >= 0"),
        (cli.non_negative_int, "-1", "'-1' must be an integer >= 0"),
        (cli.key_value, "3=x", "'3=x' is not KEY=VALUE"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(why)}$"):
            parse(text)


def test_machine_names_the_cpu_model_and_its_vector_extensions():
    import os
    import platform

    from lenet_jax import cli

    where = f"{platform.machine()}, {os.cpu_count()} CPUs"
    xeon = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse2 avx2 avx512f amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: another model\nflags\t\t: fpu\n"
    )
    assert cli.machine(xeon) == (
        f"{platform.node()} (Intel(R) Xeon(R) Platinum 8480+; {where}, AVX-512, AMX-BF16)"
    )
    epyc = "model name : AMD EPYC\nflags : fpu avx avx2 fma\n"
    assert cli.machine(epyc) == f"{platform.node()} (AMD EPYC; {where}, AVX2)"
    assert (
        cli.machine("") == f"{platform.node()} ({platform.processor() or 'unknown CPU'}; {where})"
    )
