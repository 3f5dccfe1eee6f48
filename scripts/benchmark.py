"""Benchmarks with their peers, side by side: ``python scripts/benchmark.py [--only train,explain]``.

Times are medians of ``--repeats`` runs after a separate first (compiling) run, each ended by
``block_until_ready``. Writes ``STEM.json`` and ``STEM.md`` (``--out``); the docs' figures are
``--captum --out docs/performance``, whose page ``scripts/performance_doc.py`` renders from the JSON.
The PyTorch/zennit/captum/LXT peers run when the ``peers`` extra is installed, on the same weights.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the PyTorch twins of the peers' runs (tests/twins.py)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from performance_doc import render  # noqa: E402  (scripts/performance_doc.py)

from lenet_jax import cli, cpu_kernels, explain  # noqa: E402
from lenet_jax.attribution import explainer  # noqa: E402
from lenet_jax.augment import make_augment  # noqa: E402
from lenet_jax.data import MEAN, STD, load_mnist, preprocess  # noqa: E402
from lenet_jax.evaluation_report import EVAL_OPTIONS  # noqa: E402
from lenet_jax.explain import layer_activations  # noqa: E402
from lenet_jax.explain.common import chunked_map  # noqa: E402
from lenet_jax.explain.graph import lowered  # noqa: E402
from lenet_jax.io import writable_folder, write_report  # noqa: E402
from lenet_jax.models import LeNet5, explained, init_params, model_input  # noqa: E402
from lenet_jax.predict import predict  # noqa: E402
from lenet_jax.recipes import PRESETS, recipe  # noqa: E402
from lenet_jax.train import (  # noqa: E402
    Step,
    TrainConfig,
    create_train_state,
    make_optimizer,
    train_epoch,
)


def timeit(fn, repeats):
    """``(first_seconds, median_seconds, all)``: the first call (compile) apart from the rest."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), times


def timed_row(name, fn, repeats, images=None, **extra):
    """A result row: ``timeit(fn, repeats)`` under ``name``, with images/s when ``images`` is given."""
    first, median, times = timeit(fn, repeats)
    row = {"name": name, "first_s": first, "median_s": median, "times": times, **extra}
    if images:
        row["images_per_s"] = images / median
    return row


def bench_train(images, labels, repeats, batch_size, mesh=None):
    from lenet_jax import parallel

    model = LeNet5()
    config = TrainConfig(batch_size=batch_size)
    steps = -(-images.shape[0] // batch_size)
    state = create_train_state(
        model,
        init_params(model, jax.random.key(0)),
        make_optimizer(config, steps),
        jax.random.key(1),
    )
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    step, box, epoch = Step(mesh=mesh), [state], [0]

    def run():
        epoch[0] += 1
        box[0], sums = train_epoch(
            box[0],
            images,
            labels,
            epoch=epoch[0],
            data_key=jax.random.key(2),
            batch_size=batch_size,
            step=step,
        )
        return box[0].params, sums

    return timed_row(
        f"JAX epoch, batch {batch_size}",
        run,
        repeats,
    )


def torch_lenet():
    """LeNet-5 in PyTorch with the classic tutorial's SGD (lr 0.01, momentum 0.9)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, 10),
    )
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss()


def bench_torch_train(images, labels, repeats, batch_size):
    import torch

    net, opt, loss_fn = torch_lenet()
    x = torch.tensor(np.asarray(preprocess(images))).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(np.asarray(labels)).long()

    def run():
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
        return None

    return timed_row(
        f"PyTorch peer (preloaded tensors), batch {batch_size}",
        run,
        repeats,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


def bench_torch_seed_pipeline(images, labels, repeats, batch_size=64):
    """A tutorial-style PyTorch pipeline: per-sample PIL transforms and a ``DataLoader``."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]
    )

    class Digits(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i], mode="L")), int(labels[i])

    net, opt, loss_fn = torch_lenet()
    loader = DataLoader(Digits(), batch_size=batch_size, shuffle=True)

    def run():
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()

    return timed_row(
        f"PyTorch tutorial pipeline (PIL transforms, DataLoader), batch {batch_size}",
        run,
        repeats,
        torch=torch.__version__,
    )


def bench_time_to_accuracy(train, test, preset, target=0.99):
    """Training seconds (evaluation excluded) until the test accuracy reaches ``target``."""
    model = LeNet5()
    config = recipe("lenet5", preset)
    images, labels = jnp.asarray(train[0]), jnp.asarray(train[1])
    steps = -(-images.shape[0] // config.batch_size)
    state = create_train_state(
        model,
        init_params(model, jax.random.key(config.seed)),
        make_optimizer(config, steps),
        jax.random.key(1),
    )
    total, first, history = 0.0, None, []
    step = Step(config.label_smoothing, augment=make_augment(config))
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        state, _ = train_epoch(
            state,
            images,
            labels,
            epoch=epoch,
            data_key=jax.random.key(2),
            batch_size=config.batch_size,
            step=step,
        )
        jax.block_until_ready(state.params)
        seconds = time.perf_counter() - t0
        first = seconds if first is None else first
        total += seconds
        accuracy = float(
            (predict(model, state.params, jnp.asarray(test[0])).argmax(1) == test[1]).mean()
        )
        history.append({"epoch": epoch, "seconds": seconds, "test_accuracy": accuracy})
        print(f"  epoch {epoch}: {accuracy:.4f} after {total:.1f} s", flush=True)
        if accuracy >= target:
            break
    reached = history[-1]["test_accuracy"] >= target
    return {
        "name": f"JAX time to {100 * target:.1f}% test accuracy (--preset {preset}, "
        f"{'epoch ' + str(len(history)) if reached else 'not reached'})",
        "first_s": first,
        "median_s": total,
        "times": [h["seconds"] for h in history],
        "history": history,
        "reached": reached,
    }


def bench_devices(repeats, images):
    """1 vs 8 simulated CPU devices, in a child process (the device count is fixed at start-up)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, __file__, "--devices-child", "--repeats", str(repeats)]
    r = subprocess.run([*cmd, "--images", str(images)], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the 8-device child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def devices_child(repeats, n_images):
    """Epoch (batch 64) and LRP of the test set on device 0 alone, then split over all devices."""
    import json

    from lenet_jax import parallel

    train_x, train_y = load_mnist("train", progress=False)
    test_x, _ = load_mnist("test", progress=False)
    model = LeNet5()
    params = init_params(model, jax.random.key(0))
    x = np.asarray(preprocess(jnp.asarray(test_x[:n_images])))
    lrp = explainer("lrp", model, x, composite="epsilon_plus_flat")
    rows = []
    for mesh in (None, parallel.data_mesh()):
        label = "1 device" if mesh is None else f"{mesh.size} simulated CPU devices"
        if mesh is None:
            data = (jnp.asarray(train_x), jnp.asarray(train_y))
        else:
            rep = parallel.replicated(mesh)
            data = (parallel.make_global(train_x, rep), parallel.make_global(train_y, rep))
        row = bench_train(*data, repeats, 64, mesh=mesh)
        rows.append({**row, "name": f"JAX epoch, batch 64, {label}"})
        run = lambda mesh=mesh: parallel.sharded_call(lrp, mesh, params, x)  # noqa: E731
        rows.append(timed_row(f"JAX lrp, {label}", run, repeats, images=n_images))
    print(json.dumps(rows))


# method -> options for the whole-test-set call (chunking bounds the memory of the heavy ones)
EXPLAIN_OPTIONS = {
    **EVAL_OPTIONS,
    "lrp": {**EVAL_OPTIONS["lrp"], "composite": "epsilon_plus_flat"},
}


LIGHT = ("lrp", "saliency", "gradient_x_input", "grad_cam")
CAPTUM_METHODS = ("saliency", "gradient_x_input", "smoothgrad", "integrated_gradients", "occlusion")


def bench_explain(model, params, x, methods, repeats, heavy_repeats=1):
    rows = []
    for name in methods:
        reps = repeats if name in LIGHT else heavy_repeats
        fn = explainer(name, model, x, **EXPLAIN_OPTIONS[name])
        row = timed_row(
            f"JAX {name}",
            lambda fn=fn: fn(params, x),
            reps,
            images=x.shape[0],
            method=name,
            options=EXPLAIN_OPTIONS[name],
        )
        rows.append(row)
        print(
            f"  {name}: {row['median_s']:.3f} s ({row['images_per_s']:,.0f} images/s)", flush=True
        )
    return rows


def torch_peer(model, params, x):
    """``(twin, x_nchw)``: the float32 PyTorch twin of ``model`` with ``params``, and ``x`` as its
    NCHW input tensor."""
    import torch
    from twins import to_nchw, torch_twin

    return torch_twin(model, params, dtype="float32"), torch.tensor(to_nchw(np.asarray(x)))


def bench_zennit(model, params, x, repeats, batch_size=1000):
    import torch
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    twin, xt = torch_peer(model, params, x)

    def run():
        out = []
        with Gradient(model=twin, composite=EpsilonPlusFlat()) as attributor:
            for i in range(0, len(xt), batch_size):
                xb = xt[i : i + batch_size].clone().requires_grad_(True)
                logits = twin(xb).detach()
                seed = torch.nn.functional.one_hot(logits.argmax(1), 10).to(logits) * logits
                out.append(attributor(xb, seed)[1])
        return None

    return timed_row(
        f"zennit EpsilonPlusFlat (torch {torch.__version__}, batches of {batch_size})",
        run,
        repeats,
        images=x.shape[0],
    )


def bench_captum(model, params, x, repeats, batch_size=500, n_samples=50, n_steps=50):
    """captum Saliency, InputXGradient, NoiseTunnel(Saliency) SmoothGrad, IntegratedGradients and
    Occlusion (the window, stride and black baseline of ours), same weights."""
    import torch
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    from lenet_jax.data import normalized_range

    twin, xt = torch_peer(model, params, x)
    with torch.no_grad():
        target = torch.cat([twin(xt[i : i + 2000]).argmax(1) for i in range(0, len(xt), 2000)])
    black = normalized_range()[0]

    def chunks(fn):
        def run():
            for i in range(0, len(xt), batch_size):
                fn(xt[i : i + batch_size], target[i : i + batch_size])

        return run

    def smooth(xb, tb):
        # captum's stdevs is absolute: use the same per-batch sigma as our noise_level 0.15
        sigma = float(0.15 * (xb.amax() - xb.amin()))
        NoiseTunnel(Saliency(twin)).attribute(
            xb,
            nt_type="smoothgrad",
            nt_samples=n_samples,
            nt_samples_batch_size=n_samples * 10,
            stdevs=sigma,
            target=tb,
            abs=False,
        )

    window, stride = EXPLAIN_OPTIONS["occlusion"]["window"], EXPLAIN_OPTIONS["occlusion"]["stride"]

    def occlusion(xb, tb):
        Occlusion(twin).attribute(
            xb,
            sliding_window_shapes=(1, window, window),
            strides=stride,
            baselines=black,
            target=tb,
            perturbations_per_eval=64,
        )

    specs = {
        "saliency": (lambda xb, tb: Saliency(twin).attribute(xb, target=tb, abs=False), repeats),
        "gradient_x_input": (lambda xb, tb: InputXGradient(twin).attribute(xb, target=tb), repeats),
        "smoothgrad": (smooth, 1),
        "integrated_gradients": (
            lambda xb, tb: IntegratedGradients(twin).attribute(
                xb, baselines=black, target=tb, n_steps=n_steps, internal_batch_size=batch_size * 10
            ),
            1,
        ),
        "occlusion": (occlusion, 1),
    }
    rows = []
    for name, (fn, reps) in specs.items():
        name_ = f"captum {name} (torch {torch.__version__})"
        rows.append(timed_row(name_, chunks(fn), reps, images=x.shape[0], method=name))
        print(f"  captum {name}: {rows[-1]['median_s']:.3f} s", flush=True)
    return rows


def bench_score_cam_loop(model, params, x, repeats, mask_batch=16):
    """Score-CAM image by image in PyTorch, as pytorch-grad-cam computes it (masks in batches)."""
    import torch
    import torch.nn.functional as F

    twin, xt = torch_peer(model, params, x)
    features = twin[:4]  # up to conv2's output

    def run():
        with torch.no_grad():
            for i in range(len(xt)):
                xi = xt[i : i + 1]
                acts = features(xi)
                target = int(twin(xi).argmax(1))
                up = F.interpolate(acts, size=xi.shape[-2:], mode="bilinear", align_corners=False)
                flat = up.view(up.shape[1], -1)
                mins, maxs = flat.min(1)[0], flat.max(1)[0]
                up = (up - mins[None, :, None, None]) / (maxs - mins + 1e-8)[None, :, None, None]
                masked = xi[:, None] * up[:, :, None]  # [1, K, 1, H, W]
                scores = []
                for j in range(0, masked.shape[1], mask_batch):
                    scores.append(twin(masked[0, j : j + mask_batch])[:, target])
                weights = torch.softmax(torch.cat(scores), 0)
                torch.relu((weights[:, None, None] * acts[0]).sum(0))

    name = f"Score-CAM per-image loop (torch, masks in batches of {mask_batch})"
    return timed_row(name, run, repeats, images=x.shape[0], method="score_cam")


def bench_score_cam_forwards(model, params, x, repeats, chunk=256):
    """The forward passes alone that Score-CAM evaluates (one per image and channel of the layer).

    Every mask needs its own pass through the nonlinear network, so no exact Score-CAM is faster
    than these passes: the rows bound the speed-up any Score-CAM can have over the loop.
    """
    channels = layer_activations(explained(model, params), x[:1])[0].shape[-1]
    masked = jnp.repeat(x, channels, axis=0)  # content does not change the time
    n = masked.shape[0]
    fwd = jax.jit(
        lambda p, a: chunked_map(lowered(explained(model, p)), a, chunk)
    )  # as methods run
    rows = [
        timed_row(
            f"JAX forward of Score-CAM's {n:,} masked inputs (chunks of {chunk})",
            lambda: fwd(params, masked),
            repeats,
            images=x.shape[0],
            method="score_cam_forwards",
        )
    ]
    import torch

    twin, xt = torch_peer(model, params, masked)

    def run():
        with torch.inference_mode():
            for i in range(0, n, chunk):
                twin(xt[i : i + chunk])

    name = f"PyTorch forward of the same inputs (torch {torch.__version__}, batches of {chunk})"
    rows.append(timed_row(name, run, repeats, images=x.shape[0], method="score_cam_forwards"))
    return rows


def bench_pytorch_grad_cam(model, params, x, repeats, images_per_call=1000):
    """pytorch-grad-cam's own ScoreCAM (its per-image progress bars off), or None without it."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam import score_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("pytorch-grad-cam not installed: no library Score-CAM row", flush=True)
        return None
    import torch

    twin, xt = torch_peer(model, params, x)
    conv2 = twin.conv2
    cam = pytorch_grad_cam.ScoreCAM(model=twin, target_layers=[conv2])

    def run():
        for i in range(0, len(xt), images_per_call):
            xb = xt[i : i + images_per_call]
            with torch.no_grad():
                targets = [ClassifierOutputTarget(int(c)) for c in twin(xb).argmax(1)]
            cam(input_tensor=xb, targets=targets)

    bars, score_cam.tqdm = score_cam.tqdm, types.SimpleNamespace(tqdm=lambda it, **_: it)
    try:
        name = (
            f"pytorch-grad-cam {importlib.metadata.version('grad-cam')} ScoreCAM "
            f"({images_per_call} images per call)"
        )
        return timed_row(name, run, repeats, images=x.shape[0], method="score_cam")
    finally:
        score_cam.tqdm = bars


class VGGBN(nn.Module):
    """A user's Linen model: two conv -> BatchNorm -> ReLU -> max-pool blocks and a dense head."""

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate((32, 64)):
            x = nn.Conv(features, (3, 3), padding="SAME", name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=True, name=f"bn{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(128, name="fc1")(x.reshape((x.shape[0], -1))))
        return nn.Dense(10, name="fc2")(x)


def vgg_bn():
    """``(f, variables)``: ``VGGBN`` with random weights and BatchNorm statistics."""
    model = VGGBN()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    keys = iter(jax.random.split(jax.random.key(1), 8))
    stats = jax.tree_util.tree_map(
        lambda a: 0.5 + jax.random.uniform(next(keys), a.shape), variables["batch_stats"]
    )
    variables = {**variables, "batch_stats": stats}
    return functools.partial(model.apply, variables), variables


def vgg_bn_twin(variables):
    """The float32 torch twin of ``VGGBN`` (BatchNorm eps 0, variance shifted by Flax's eps: the
    same function, which zennit 0.5.1's BatchNorm merge then computes exactly)."""
    import torch

    p, stats = variables["params"], variables["batch_stats"]
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    layers = []
    for i in (1, 2):
        k = np.asarray(p[f"conv{i}"]["kernel"])
        conv = torch.nn.Conv2d(k.shape[2], k.shape[3], 3, padding="same")
        conv.weight.data, conv.bias.data = t(k.transpose(3, 2, 0, 1)), t(p[f"conv{i}"]["bias"])
        bn = torch.nn.BatchNorm2d(k.shape[3], eps=0.0)
        bn.weight.data, bn.bias.data = t(p[f"bn{i}"]["scale"]), t(p[f"bn{i}"]["bias"])
        bn.running_mean.data = t(stats[f"bn{i}"]["mean"])
        bn.running_var.data = t(np.asarray(stats[f"bn{i}"]["var"]) + 1e-5)  # Flax's eps
        layers += [conv, bn, torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    k1 = np.asarray(p["fc1"]["kernel"]).reshape(7, 7, 64, -1).transpose(2, 0, 1, 3).reshape(-1, 128)
    fc1, fc2 = torch.nn.Linear(*k1.shape), torch.nn.Linear(128, 10)
    fc1.weight.data, fc1.bias.data = t(k1.T), t(p["fc1"]["bias"])
    fc2.weight.data, fc2.bias.data = t(np.asarray(p["fc2"]["kernel"]).T), t(p["fc2"]["bias"])
    layers += [torch.nn.Flatten(), fc1, torch.nn.ReLU(), fc2]
    return torch.nn.Sequential(*layers).eval()


def bench_user_model(images, repeats, peers, batch_size=500):
    """LRP (epsilon_plus_flat) and saliency on ``VGGBN`` through ``explain.prepare`` (variables
    passed to the program), and zennit with its BatchNorm canonizer on the twin. Rows, and the
    largest difference of the two maps on 8 images."""
    f, variables = vgg_bn()
    x = ((jnp.asarray(images, jnp.float32)[..., None] / 255.0) - MEAN) / STD
    apply = lambda v, a: VGGBN().apply(v, a)  # noqa: E731
    spec = jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype)
    lrp = explain.prepare(apply, spec, "lrp", composite="epsilon_plus_flat")
    saliency = explain.prepare(apply, spec, "saliency")
    n = x.shape[0]
    rows = [
        timed_row("JAX lrp, Linen VGG with BatchNorm", lambda: lrp(variables, x), repeats, images=n),
        timed_row("JAX saliency, Linen VGG with BatchNorm", lambda: saliency(variables, x),
                  repeats, images=n),
    ]  # fmt: skip
    if not peers:
        return rows, None
    import torch
    from zennit.canonizers import SequentialMergeBatchNorm

    twin = vgg_bn_twin(variables)
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())

    def zennit_maps(xs):
        return zennit_lrp(twin, xs, [SequentialMergeBatchNorm()], batch_size)

    rows.append(
        timed_row("zennit lrp, Linen VGG's twin, BatchNorm canonizer", lambda: zennit_maps(xt),
                  max(1, min(repeats, 3)), images=n)
    )  # fmt: skip
    ours = np.asarray(explain.lrp(f, x[:8], composite="epsilon_plus_flat"))
    theirs = zennit_maps(xt[:8]).numpy().transpose(0, 2, 3, 1)
    return rows, float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def zennit_lrp(twin, xs, canonizers, batch_size):
    """zennit's EpsilonPlusFlat relevance of ``twin`` for the predicted classes, in batches."""
    import torch
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    out = []
    with Gradient(model=twin, composite=EpsilonPlusFlat(canonizers=canonizers)) as attributor:
        for i in range(0, len(xs), batch_size):
            xb = xs[i : i + batch_size]
            logits = twin(xb).detach()
            seed = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits)
            out.append(attributor(xb, seed * logits)[1])
    return torch.cat(out)


class ResNetBlock(nn.Module):
    """A ResNet basic block as Flax's ImageNet example writes it (BatchNorm after each conv, a
    projection on the skip path when the shape changes), with torchvision's explicit padding."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=True)
        pad = ((1, 1), (1, 1))
        s = (self.strides, self.strides)
        y = nn.relu(norm()(conv(self.features, (3, 3), s, padding=pad)(x)))
        y = norm()(conv(self.features, (3, 3), padding=pad)(y))
        if x.shape != y.shape:
            x = norm()(conv(self.features, (1, 1), s)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 in Linen (Flax's ImageNet example's layout): 7x7/2 stem, 3x3/2 max-pool, four
    stages of two blocks (64-512 channels), global mean, dense head."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, features in enumerate((64, 128, 256, 512)):
            x = ResNetBlock(features, 1 if i == 0 else 2)(x)
            x = ResNetBlock(features)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def resnet18(size):
    """``(apply, variables)``: ``ResNet18`` with random weights and BatchNorm statistics."""
    model = ResNet18()
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    keys = iter(jax.random.split(jax.random.key(1), 128))
    stats = jax.tree_util.tree_map_with_path(  # means near 0, variances near 1: logits not 0
        lambda path, a: (
            (0.5 + jax.random.uniform(next(keys), a.shape))
            if path[-1].key == "var"
            else 0.1 * jax.random.normal(next(keys), a.shape)
        ),
        variables["batch_stats"],
    )
    return model.apply, {**variables, "batch_stats": stats}


def resnet18_twin(variables):
    """torchvision's ResNet-18 with ``variables`` (float32; BatchNorm eps 0, variance shifted by
    Flax's eps, so that zennit 0.5.1's merge computes the same function)."""
    import torch
    import torchvision

    net = torchvision.models.resnet18(num_classes=10).eval()
    p, stats = variables["params"], variables["batch_stats"]
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731

    def conv(c, name):
        c.weight.data = t(np.asarray(p_of(p, name)["kernel"]).transpose(3, 2, 0, 1))

    def bn(b, name):
        b.weight.data, b.bias.data = t(p_of(p, name)["scale"]), t(p_of(p, name)["bias"])
        b.running_mean.data = t(p_of(stats, name)["mean"])
        b.running_var.data = t(np.asarray(p_of(stats, name)["var"]) + 1e-5)
        b.eps = 0.0

    conv(net.conv1, "Conv_0")
    bn(net.bn1, "BatchNorm_0")
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    for i, block in enumerate(blocks):
        name = f"ResNetBlock_{i}/"
        conv(block.conv1, name + "Conv_0")
        bn(block.bn1, name + "BatchNorm_0")
        conv(block.conv2, name + "Conv_1")
        bn(block.bn2, name + "BatchNorm_1")
        if block.downsample is not None:
            conv(block.downsample[0], name + "Conv_2")
            bn(block.downsample[1], name + "BatchNorm_2")
    net.fc.weight.data, net.fc.bias.data = (
        t(np.asarray(p["Dense_0"]["kernel"]).T),
        t(p["Dense_0"]["bias"]),
    )
    return net


def p_of(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def bench_resnet(repeats, peers, n=32, size=64):
    """LRP (epsilon_plus_flat) and saliency on ``ResNet18`` (``n`` random images of ``size``²),
    through ``explain.prepare``; zennit's ResNet canonizer on torchvision's twin. Rows, and the
    largest difference of the maps on 4 images."""
    apply, variables = resnet18(size)
    x = jax.random.normal(jax.random.key(2), (n, size, size, 3), jnp.float32)
    lrp = explain.prepare(apply, x, "lrp", composite="epsilon_plus_flat")
    saliency = explain.prepare(apply, x, "saliency")
    label = f"ResNet-18 (Linen), {n} images of {size}x{size}"
    rows = [
        timed_row(f"JAX lrp, {label}", lambda: lrp(variables, x), repeats, images=n),
        timed_row(f"JAX saliency, {label}", lambda: saliency(variables, x), repeats, images=n),
    ]
    if not peers:
        return rows, None
    import torch
    from zennit.torchvision import ResNetCanonizer

    twin = resnet18_twin(variables)
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
    rows.append(
        timed_row(f"zennit lrp, torchvision twin, ResNet canonizer (torch {torch.__version__})",
                  lambda: zennit_lrp(twin, xt, [ResNetCanonizer()], n), repeats, images=n)
    )  # fmt: skip
    ours = np.asarray(lrp(variables, x))[:4]
    theirs = zennit_lrp(twin, xt[:4], [ResNetCanonizer()], 4).numpy().transpose(0, 2, 3, 1)
    return rows, float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def bench_transformer(images, repeats, peers, batch_size=500):
    """AttnLRP on the package's ViT (random weights) through the engine, jitted, with its first
    call (trace + compile) apart, a saliency map of the same model for the engine's overhead, and
    LXT 2.1's AttnLRP on the float32 torch twin. Rows, and the largest difference of the two maps
    on 8 images."""
    from lenet_jax.models import ViT

    model = ViT()
    params = init_params(model, jax.random.key(0))
    f = explained(model, params)
    x = model_input(model, "mnist").preprocess(jnp.asarray(images))
    n = x.shape[0]

    def lrp_of(p, v):
        return explain.lrp(explained(model, p), v, composite="attn_lrp", batch_size=batch_size)

    lrp = jax.jit(lrp_of)
    saliency = jax.jit(  # in the same chunks as LRP
        lambda p, v: chunked_map(lambda c: explain.saliency(explained(model, p), c), v, batch_size)
    )
    rows = [
        timed_row("JAX AttnLRP, ViT (72k parameters)", lambda: lrp(params, x), repeats, images=n),
        timed_row("JAX saliency, ViT", lambda: saliency(params, x), repeats, images=n),
    ]
    if not peers:
        return rows, None
    import torch
    from twins import lxt_relevance, transformer_twin

    twin = transformer_twin("vit", params, "attn_lrp", model.num_heads, dtype="float32")
    target = np.asarray(jnp.argmax(f(x), axis=1))

    def lxt():
        return [
            lxt_relevance(twin, x[i : i + batch_size], target[i : i + batch_size])
            for i in range(0, n, batch_size)
        ]

    rows.append(
        timed_row(f"LXT 2.1 AttnLRP, the ViT's twin (torch {torch.__version__}, batches of "
                  f"{batch_size})", lxt, max(1, min(repeats, 3)), images=n)
    )  # fmt: skip
    ours = np.asarray(explain.lrp(f, x[:8], jnp.asarray(target[:8]), composite="attn_lrp"))
    theirs = lxt_relevance(twin, x[:8], target[:8])
    return rows, float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# (name, input NHWC, kernel HWIO, stride, padding): the convolutions the CPU forms were chosen on
CONV_WORKLOADS = [
    ("LeNet-5 conv1, 1->6 5x5 at 32x32, batch 10,000", (10_000, 32, 32, 1), (5, 5, 1, 6), 1, 0),
    ("LeNet-5 conv2, 6->16 5x5 at 14x14, batch 10,000", (10_000, 14, 14, 6), (5, 5, 6, 16), 1, 0),
    ("3x3 64->64 at 32x32, batch 64", (64, 32, 32, 64), (3, 3, 64, 64), 1, 1),
    ("3x3 3->32 at 64x64, batch 64", (64, 64, 64, 3), (3, 3, 3, 32), 1, 1),
    ("3x3 512->512 at 2x2 (ResNet-18 at 64x64), batch 32", (32, 2, 2, 512), (3, 3, 512, 512), 1, 1),
    ("the VGG's conv1, 1->32 3x3 at 28x28, batch 500", (500, 28, 28, 1), (3, 3, 1, 32), 1, 1),
    ("the VGG's conv2, 32->64 3x3 at 14x14, batch 500", (500, 14, 14, 32), (3, 3, 32, 64), 1, 1),
]


def bench_convs(repeats, peers):
    """Forward, and forward + input gradient, of single convolutions: ``lax.conv`` as written, the
    form ``cpu_kernels`` chooses, and PyTorch (oneDNN). Where the form is ``lax``'s own, the
    PyTorch ratio is XLA's convolution's bound on the methods."""
    rows = []
    for workload in CONV_WORKLOADS:
        rows += _conv_rows(workload, repeats, peers)
    return rows + _max_pool_rows(repeats, peers)


def _max_pool_rows(repeats, peers, shape=(500, 28, 28, 32)):
    """The VGG's first 2x2 max-pooling: forward, and forward + input gradient (XLA's
    select-and-scatter), against PyTorch's."""
    name = f"2x2 max-pooling of {shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} (the VGG's first)"
    y = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    fwd, grad = jax.jit(pool), jax.jit(jax.grad(lambda a: jnp.sum(pool(a) ** 2)))
    runs = {("JAX lax", "forward"): lambda: fwd(y),
            ("JAX lax", "forward + input gradient"): lambda: grad(y)}  # fmt: skip
    if peers:
        import torch

        yt = torch.tensor(np.asarray(y).transpose(0, 3, 1, 2).copy())

        def forward():
            with torch.inference_mode():
                torch.nn.functional.max_pool2d(yt, 2)

        def backward():
            (
                torch.nn.functional.max_pool2d(yt.clone().requires_grad_(True), 2) ** 2
            ).sum().backward()

        runs["PyTorch", "forward"], runs["PyTorch", "forward + input gradient"] = forward, backward
    return [
        timed_row(f"{name}: {what}, {form}", fn, repeats, conv=name, what=what, form=form)
        for (form, what), fn in runs.items()
    ]


def _conv_rows(workload, repeats, peers):
    from jax import lax

    name, x_shape, k_shape, stride, pad = workload
    x = jax.random.normal(jax.random.key(0), x_shape, jnp.float32)
    k = 0.1 * jax.random.normal(jax.random.key(1), k_shape, jnp.float32)
    options = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    runs = {}
    for form, conv in (("JAX lax", lax.conv_general_dilated),
                       ("JAX chosen form", cpu_kernels.conv_general_dilated)):  # fmt: skip
        conv = functools.partial(conv, **options)
        fwd = jax.jit(conv)
        grad = jax.jit(jax.grad(lambda a, w, conv=conv: jnp.sum(conv(a, w) ** 2)))
        runs[form, "forward"] = lambda fwd=fwd: fwd(x, k)
        runs[form, "forward + input gradient"] = lambda grad=grad: grad(x, k)
    if peers:
        import torch

        xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
        wt = torch.tensor(np.asarray(k).transpose(3, 2, 0, 1).copy())
        conv2d = functools.partial(
            torch.nn.functional.conv2d, weight=wt, stride=stride, padding=pad
        )

        def forward():
            with torch.inference_mode():
                conv2d(xt)

        def backward():
            (conv2d(xt.clone().requires_grad_(True)) ** 2).sum().backward()

        runs["PyTorch", "forward"], runs["PyTorch", "forward + input gradient"] = forward, backward
    return [
        timed_row(f"{name}: {what}, {form}", fn, repeats, conv=name, what=what, form=form)
        for (form, what), fn in runs.items()
    ]


def _versions(peers: bool) -> dict[str, str]:
    """Versions of flax and of the peers that ran."""
    names = ["flax", *(["torch", "zennit", "captum", "grad-cam", "lxt"] if peers else [])]
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


SECTIONS = (
    "train", "explain", "user_model", "resnet", "transformer", "convs", "accuracy", "devices"
)  # fmt: skip


def _use_device(device: str) -> None:
    """JAX on ``device`` ("cpu" or "gpu", JAX's default where there is one): a one-line error
    when there is no GPU."""
    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        raise ValueError(
            f"--device gpu: JAX finds no GPU (its backend is {jax.default_backend()}; a GPU needs "
            "JAX installed with CUDA, e.g. jax[cuda12])"
        )


def main(argv=None) -> int:
    cpu_kernels.configure_xla()  # before JAX starts: XLA's faster wide convolutions on a CPU
    p = cli.parser(__doc__)
    p.add_argument(
        "--only",
        default="train,explain,user_model,resnet,transformer,convs",
        help="comma-separated sections: " + ", ".join(SECTIONS),
    )
    p.add_argument(
        "--methods", default=",".join(explain.METHODS), help="methods for the explain section"
    )
    p.add_argument(
        "--repeats", type=cli.positive_int, default=5, help="timed runs after the first, per row"
    )
    p.add_argument(
        "--batch-size", type=cli.positive_int, default=64, help="batch of the training epochs"
    )
    p.add_argument(
        "--large-batch", type=cli.positive_int, default=1024, help="batch of the large-batch epochs"
    )
    p.add_argument(
        "--preset", default="fast", choices=sorted(PRESETS), help="recipe of the accuracy section"
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "gpu"),
        help="where JAX runs; on a GPU the peers (PyTorch on the CPU) are skipped",
    )
    p.add_argument(
        "--resnet-size", type=cli.positive_int, default=64, help="ResNet-18's image side"
    )
    p.add_argument(
        "--resnet-images", type=cli.positive_int, default=32, help="ResNet-18's batch of images"
    )
    p.add_argument("--devices-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch/zennit/captum")
    p.add_argument("--captum", action="store_true", help="also time captum (minutes on a CPU)")
    p.add_argument(
        "--images",
        type=cli.positive_int,
        default=10000,
        help="test images to explain (default: all 10,000)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/benchmark"),
        help="output stem: writes STEM.json and STEM.md (the docs' page: --out docs/performance)",
    )
    args = p.parse_args(argv)
    if args.devices_child:
        devices_child(args.repeats, args.images)
        return 0
    sections = set(args.only.split(","))
    methods = args.methods.split(",")
    bad = sorted(sections - set(SECTIONS)) + sorted(set(methods) - set(explain.METHODS))
    if bad:
        p.error(f"unknown section or method {bad[0]!r}")
    with cli.one_line_errors(p):
        _use_device(args.device)
    peers = not args.no_peers and args.device == "cpu"
    if peers:
        try:
            import torch  # noqa: F401
            import zennit  # noqa: F401
        except ImportError:
            peers = False
            print("peers extra not installed: timing JAX only", flush=True)

    with cli.one_line_errors(p):
        writable_folder(args.out.parent, "--out")
        train_x, train_y = load_mnist("train", progress=False)
        test_x, _ = load_mnist("test", progress=False)
    device = jax.devices()[0]
    results = {
        "command": " ".join(["python scripts/benchmark.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": cli.machine(),
        "versions": _versions(peers),
        "jax": jax.__version__,
        "device": f"{device.platform}:{device.device_kind}",
        "images": args.images,
        "rows": [],
        "ratios": {},
    }
    if "train" in sections:
        print("train ...", flush=True)
        jx = bench_train(jnp.asarray(train_x), jnp.asarray(train_y), args.repeats, args.batch_size)
        results["rows"].append(jx)
        if peers:
            pt = bench_torch_train(train_x, train_y, args.repeats, args.batch_size)
            results["rows"].append(pt)
            results["ratios"]["PyTorch peer epoch / JAX epoch"] = pt["median_s"] / jx["median_s"]
            seed = bench_torch_seed_pipeline(train_x, train_y, max(1, min(args.repeats, 2)))
            results["rows"].append(seed)
            results["ratios"]["PyTorch tutorial pipeline epoch / JAX epoch"] = (
                seed["median_s"] / jx["median_s"]
            )
        big = bench_train(
            jnp.asarray(train_x), jnp.asarray(train_y), args.repeats, args.large_batch
        )
        results["rows"].append(big)
        if peers:
            pt_big = bench_torch_train(train_x, train_y, args.repeats, args.large_batch)
            results["rows"].append(pt_big)
            results["ratios"][f"PyTorch peer epoch / JAX epoch, batch {args.large_batch}"] = (
                pt_big["median_s"] / big["median_s"]
            )
    if "accuracy" in sections:
        print(f"time to 99.0% (--preset {args.preset}) ...", flush=True)
        test_y = load_mnist("test", progress=False)[1]
        results["rows"].append(
            bench_time_to_accuracy((train_x, train_y), (test_x, test_y), args.preset)
        )
    if "devices" in sections:
        print("1 vs 8 simulated devices ...", flush=True)
        rows = bench_devices(max(1, min(args.repeats, 3)), args.images)
        results["rows"] += rows
        results["ratios"]["epoch time, 8 simulated devices / 1 device"] = (
            rows[2]["median_s"] / rows[0]["median_s"]
        )
        results["ratios"]["LRP time, 8 simulated devices / 1 device"] = (
            rows[3]["median_s"] / rows[1]["median_s"]
        )
    if "explain" in sections:
        print(f"explain {args.images} test images ...", flush=True)
        model = LeNet5()
        params = init_params(model, jax.random.key(0))
        x = preprocess(jnp.asarray(test_x[: args.images]))
        rows = bench_explain(model, params, x, methods, args.repeats)
        results["rows"] += rows
        by = {r["method"]: r for r in rows}
        if "lrp" in by:
            results["ratios"]["JAX LRP first call (tracing + compiling), s"] = by["lrp"]["first_s"]
        if "lrp" in by and "saliency" in by:
            results["ratios"]["LRP time / saliency time"] = (
                by["lrp"]["median_s"] / by["saliency"]["median_s"]
            )
        if peers and "lrp" in by:
            z = bench_zennit(model, params, x, max(1, min(args.repeats, 3)))
            results["rows"].append(z)
            results["ratios"]["zennit time / JAX LRP time"] = z["median_s"] / by["lrp"]["median_s"]
        if peers and args.captum:
            wanted = [m for m in CAPTUM_METHODS if m in by]
            for row in bench_captum(model, params, x, max(1, min(args.repeats, 3))):
                results["rows"].append(row)
                if row["method"] in wanted:
                    results["ratios"][f"captum {row['method']} time / JAX time"] = (
                        row["median_s"] / by[row["method"]]["median_s"]
                    )
        if peers and "score_cam" in by:
            loop = bench_score_cam_loop(model, params, x, 1)
            results["rows"].append(loop)
            results["ratios"]["Score-CAM per-image loop time / JAX time"] = (
                loop["median_s"] / by["score_cam"]["median_s"]
            )
            library = bench_pytorch_grad_cam(model, params, x, 1)
            if library is not None:
                results["rows"].append(library)
                results["ratios"]["pytorch-grad-cam ScoreCAM time / JAX time"] = (
                    library["median_s"] / by["score_cam"]["median_s"]
                )
            floor = bench_score_cam_forwards(model, params, x, max(1, min(args.repeats, 3)))
            results["rows"] += floor
            results["ratios"][
                "Score-CAM per-image loop time / JAX forward of its masked inputs"
            ] = loop["median_s"] / floor[0]["median_s"]
            results["ratios"]["PyTorch forward / JAX forward of the masked inputs"] = (
                floor[1]["median_s"] / floor[0]["median_s"]
            )
    if "user_model" in sections:
        print(f"LRP of a Linen VGG with BatchNorm on {args.images} test images ...", flush=True)
        rows, diff = bench_user_model(test_x[: args.images], args.repeats, peers)
        results["rows"] += rows
        results["ratios"]["LRP time / saliency time, Linen VGG with BatchNorm"] = (
            rows[0]["median_s"] / rows[1]["median_s"]
        )
        if diff is not None:
            results["ratios"]["zennit time / JAX LRP time, Linen VGG with BatchNorm"] = (
                rows[2]["median_s"] / rows[0]["median_s"]
            )
            results["ratios"]["largest |JAX − zennit| / largest |zennit|, VGG-BN, float32"] = diff
    if "resnet" in sections:
        size, count = args.resnet_size, args.resnet_images
        print(f"LRP of ResNet-18 on {count} images of {size}x{size} ...", flush=True)
        rows, diff = bench_resnet(args.repeats, peers, n=count, size=size)
        results["rows"] += rows
        results["ratios"]["LRP time / saliency time, ResNet-18"] = (
            rows[0]["median_s"] / rows[1]["median_s"]
        )
        results["ratios"]["JAX LRP first call (tracing + compiling), ResNet-18, s"] = rows[0][
            "first_s"
        ]
        if diff is not None:
            results["ratios"]["zennit time / JAX LRP time, ResNet-18"] = (
                rows[2]["median_s"] / rows[0]["median_s"]
            )
            results["ratios"]["largest |JAX − zennit| / largest |zennit|, ResNet-18, float32"] = (
                diff
            )
    if "transformer" in sections:
        print(f"AttnLRP of a ViT on {args.images} test images ...", flush=True)
        rows, diff = bench_transformer(test_x[: args.images], args.repeats, peers)
        results["rows"] += rows
        results["ratios"]["JAX AttnLRP first call (tracing + compiling), ViT, s"] = rows[0][
            "first_s"
        ]
        results["ratios"]["AttnLRP time / saliency time, ViT"] = (
            rows[0]["median_s"] / rows[1]["median_s"]
        )
        if diff is not None:
            results["ratios"]["LXT AttnLRP time / JAX AttnLRP time, ViT"] = (
                rows[2]["median_s"] / rows[0]["median_s"]
            )
            results["ratios"]["largest |JAX − LXT| / largest |LXT|, ViT, float32"] = diff
    if "convs" in sections:
        print("single convolutions ...", flush=True)
        results["rows"] += bench_convs(args.repeats, peers)
    results["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    md = render(results)
    print(md)
    write_report(args.out, results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
