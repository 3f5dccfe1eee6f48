"""Where the CPU time of one LeNet-5 training step goes: ``python scripts/profile_step.py``.

Times (medians of ``--repeats`` jitted calls, each ended by ``block_until_ready``) the whole step as
the trainer dispatches it, its parts (forward, forward + backward, optimizer update, the dispatch
of a trivial jitted call), and the forward and backward of every layer on its stored input, next to
the same layer in PyTorch (backward = forward with backward minus forward; the first layer computes
no input gradient in either, as in training), and the compiled step's slowest operations from a
``jax.profiler`` trace (each XLA op's time per step, with the JAX operation it came from), the
step's FLOPs against the machine's matmul rate (a lower bound on the step's time), and ablations:
the whole step again with one layer at a time replaced by a stand-in of the same shapes and
parameters that does almost no work. What a stand-in saves is what its layer costs the step's
wall time; the trace cannot say that when XLA's threads run independent ops side by side. Writes
``--out`` JSON and Markdown (default ``docs/profile``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lenet_jax import cli  # noqa: E402
from lenet_jax.io import write_report  # noqa: E402
from lenet_jax.layers import Activation, AvgPool, Conv, forward  # noqa: E402
from lenet_jax.models import LeNet5, init_params  # noqa: E402
from lenet_jax.train import (  # noqa: E402
    TrainConfig,
    _zero_metrics,
    compute_metrics,
    create_train_state,
    make_optimizer,
    make_step_fn,
)


def median_ms(fn, repeats):
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def random_batches(batch_size, n=8):
    """``n`` batches of random uint8 digits and labels as the step takes them:
    ``(images, labels, idx, weight)``."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch_size * n, 28, 28), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, batch_size * n).astype(np.int32))
    idx = jnp.arange(batch_size * n, dtype=jnp.int32).reshape(n, batch_size)
    return images, labels, idx, jnp.ones((n, batch_size), jnp.float32)


def step_runner(model, params, tx, batches):
    """The trainer's jitted step for ``model``, from a copy of ``params`` (every step donates the
    state), on ``batches`` (``random_batches``).

    Returns ``(run, step, box)``: ``run(n=1)`` dispatches ``n`` steps, cycling through the batches
    from the first, and returns the running sums; ``box`` holds the current ``[state, sums]``.
    """
    images, labels, idx, weight = batches
    step = make_step_fn()
    state = create_train_state(
        model, jax.tree_util.tree_map(jnp.copy, params), tx, jax.random.key(1)
    )
    box = [state, _zero_metrics()]

    def run(n=1):
        for i in range(n):
            box[0], box[1] = step(box[0], box[1], images, labels, idx, weight, i % idx.shape[0])
        return box[1]

    return run, step, box


@dataclasses.dataclass(frozen=True)
class CentreTapConv(Conv):
    """Stand-in for a ``"VALID"`` convolution: its kernel's centre tap alone, a 1x1 convolution
    with the same output shape and parameters (the other taps get zero gradients)."""

    def apply(self, params, x_BHWC):
        kh, kw = self.kernel_size
        if self.padding != "VALID":
            raise ValueError(f"{self.name}: the centre-tap stand-in needs 'VALID' padding")
        h, w = x_BHWC.shape[1] - kh + 1, x_BHWC.shape[2] - kw + 1
        window = x_BHWC[:, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]
        return window @ params["kernel"][kh // 2, kw // 2] + params["bias"].reshape(1, 1, 1, -1)


@dataclasses.dataclass(frozen=True)
class IdentityActivation(Activation):
    """Stand-in for an activation: the identity."""

    def apply(self, params, x):
        return x


@dataclasses.dataclass(frozen=True)
class CornerPool(AvgPool):
    """Stand-in for average pooling: each window's first pixel (a strided slice)."""

    def apply(self, params, x_BHWC):
        w = self.window
        h, wd = x_BHWC.shape[1:3]
        return x_BHWC[:, : h // w * w : w, : wd // w * w : w]


STAND_INS = {Conv: CentreTapConv, Activation: IdentityActivation, AvgPool: CornerPool}


class Ablated(LeNet5):
    """LeNet-5 with the layer named ``replaced`` swapped for its stand-in in ``STAND_INS``."""

    replaced: str = ""

    @property
    def layers(self):
        layers = super().layers
        kinds = {layer.name: type(layer) for layer in layers}
        if self.replaced not in kinds:
            raise ValueError(f"no layer {self.replaced!r} in LeNet-5")
        if kinds[self.replaced] not in STAND_INS:
            raise ValueError(f"no stand-in for {self.replaced} ({kinds[self.replaced].__name__})")
        return tuple(
            STAND_INS[type(layer)](**dataclasses.asdict(layer))
            if layer.name == self.replaced
            else layer
            for layer in layers
        )


def ablations(batch_size, repeats):
    """Step times (ms) of LeNet-5 and of ``Ablated`` for every layer that has a stand-in.

    The steps are timed in turns (``repeats // 20`` rounds of 20 steps each, at least 3), so a
    slow spell of the machine falls on all of them alike. Returns ``[{"replaced", "step_ms"}]``,
    first ``"none"`` (the unchanged step), then the layers in order.
    """
    names = ["none"] + [layer.name for layer in LeNet5().layers if type(layer) in STAND_INS]
    params = init_params(LeNet5(), jax.random.key(0))
    config = TrainConfig(batch_size=batch_size)
    batches = random_batches(batch_size)
    runs = {}
    for name in names:
        model = LeNet5() if name == "none" else Ablated(replaced=name)
        run, _, _ = step_runner(model, params, make_optimizer(config, 100), batches)
        jax.block_until_ready(run(2))  # compiles
        runs[name] = run
    times = {name: [] for name in names}
    for _ in range(max(repeats // 20, 3)):
        for name, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(20))
            times[name].append((time.perf_counter() - t0) / 20 * 1000)
    return [{"replaced": name, "step_ms": statistics.median(t)} for name, t in times.items()]


def profile_jax(batch_size, repeats):
    model = LeNet5()
    params = init_params(model, jax.random.key(0))
    config = TrainConfig(batch_size=batch_size)
    tx = make_optimizer(config, 100)
    images, labels, idx, weight = batches = random_batches(batch_size)
    x = model.preprocess(images[:batch_size])
    y = labels[:batch_size]
    rows = {}

    one_step, step, box = step_runner(model, params, tx, batches)
    rows["whole step (gather, preprocess, forward, backward, update), dispatched"] = median_ms(
        one_step, repeats
    )
    # the step compiled once more without donation, so the same arguments can be reused
    args = (box[0], box[1], images, labels, idx, weight, 0)
    compiled = jax.jit(step.__wrapped__).lower(*args).compile()
    bound = roofline(compiled, repeats)
    ops = trace_ops(compiled, args, max(repeats // 4, 2))

    def loss(p):
        logits = forward(model.layers, p, x)[0]
        return compute_metrics(logits, y)["loss_sum"]

    fwd = jax.jit(loss)
    rows["forward + loss"] = median_ms(lambda: fwd(params), repeats)
    grad = jax.jit(jax.grad(loss))
    rows["forward + backward (jax.grad)"] = median_ms(lambda: grad(params), repeats)
    grads = grad(params)
    opt_state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    rows["optimizer update (optax)"] = median_ms(lambda: update(grads, opt_state, params), repeats)
    noop = jax.jit(lambda a: a + 1)
    scalar = jnp.zeros(())
    rows["dispatch of a trivial jitted call"] = median_ms(lambda: noop(scalar), repeats)

    layers = {}
    _, inputs = forward(model.layers, params, x)
    for k, (layer, inp) in enumerate(zip(model.layers, inputs, strict=True)):
        p = params.get(layer.name) if layer.has_params else None
        f = jax.jit(lambda p, v, layer=layer: layer.apply(p, v))
        out = f(p, inp)
        ct = jnp.ones_like(out)
        if k == 0:  # training needs no gradient for the input itself
            back = jax.jit(
                lambda p, v, g, layer=layer: jax.vjp(lambda p: layer.apply(p, v), p)[1](g)
            )
        elif layer.has_params:
            back = jax.jit(lambda p, v, g, layer=layer: jax.vjp(layer.apply, p, v)[1](g))
        else:
            back = jax.jit(
                lambda p, v, g, layer=layer: jax.vjp(lambda v: layer.apply(p, v), v)[1](g)
            )
        layers[layer.name] = {
            "forward": median_ms(lambda f=f, p=p, inp=inp: f(p, inp), repeats),
            "backward": median_ms(lambda b=back, p=p, inp=inp, ct=ct: b(p, inp, ct), repeats),
        }
    return rows, layers, ops, bound, (model, params, np.asarray(x))


def roofline(compiled, repeats, n=2048):
    """The compiled step's FLOPs (XLA's cost analysis) against this machine's float32 matmul rate
    (an ``n x n`` matmul): the step's time if every FLOP ran as fast as a large matmul."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda m: m @ m)
    gflops = 2 * n**3 / median_ms(lambda: matmul(a), max(repeats // 20, 5)) / 1e6
    return {
        "step_mflop": cost["flops"] / 1e6,
        "matmul_size": n,
        "matmul_gflops": gflops,
        "bound_ms": cost["flops"] / 1e6 / gflops,
    }


def trace_ops(compiled, args, steps, top=20):
    """The ``top`` slowest XLA operations of ``compiled(*args)`` (a compiled step), from a profiler
    trace.

    Runs ``steps`` calls (after 5 untraced ones) under ``jax.profiler.trace`` and sums the trace's
    events per XLA op name.
    Returns ``[{"op", "shape", "source", "us_per_step"}]``; ``source`` is the JAX operation the op
    came from (its ``op_name`` metadata in the compiled HLO).
    """
    hlo = compiled.as_text()
    for _ in range(5):
        jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            out = None
            for _ in range(steps):
                out = compiled(*args)
            jax.block_until_ready(out)
        (trace,) = Path(tmp).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            totals[e["name"]] += e["dur"]
    rows = []
    for name, us in totals.most_common():
        m = re.search(rf"%{re.escape(name)} = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
        if m:  # an op of the compiled step (not a runtime or Python event)
            rows.append({"op": name, "shape": m[1], "source": m[2], "us_per_step": us / steps})
        if len(rows) == top:
            break
    return rows


def profile_torch(model, params, x, repeats):
    import torch

    from lenet_jax.twins import to_nchw, torch_twin

    twin = torch_twin(model, params, dtype="float32").train()
    h = torch.tensor(to_nchw(x))
    out = {}
    for k, (layer, module) in enumerate(zip(model.layers, twin, strict=True)):
        inp = h.detach().clone().requires_grad_(k > 0)  # as in training: no input gradient

        def fwd(module=module, inp=inp):
            with torch.no_grad():
                return module(inp)

        def fwd_bwd(module=module, inp=inp):
            inp.grad = None
            for p in module.parameters():
                p.grad = None
            module(inp).sum().backward()

        f_ms = median_ms(fwd, repeats)
        out[layer.name] = {"forward": f_ms, "backward": max(median_ms(fwd_bwd, repeats) - f_ms, 0)}
        with torch.no_grad():
            h = module(h)
    return out, torch.__version__


def markdown(results) -> str:
    lines = [
        f"Machine: {results['machine']}; JAX {results['jax']} on {results['device']}; "
        f"batch {results['batch_size']}; medians of {results['repeats']} calls, in ms.",
        "",
        "| part of the step | ms |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in results["step"].items()],
        "",
    ]
    torch_layers = results.get("torch_layers")
    head = "| layer | JAX forward | JAX backward |"
    rule = "|---|---:|---:|"
    if torch_layers:
        head += f" PyTorch {results['torch']} forward | PyTorch backward |"
        rule += "---:|---:|"
    lines += [head, rule]
    for name, t in results["layers"].items():
        line = f"| {name} | {t['forward']:.3f} | {t['backward']:.3f} |"
        if torch_layers:
            line += f" {torch_layers[name]['forward']:.3f} | {torch_layers[name]['backward']:.3f} |"
        lines.append(line)
    totals = {k: sum(t[k] for t in results["layers"].values()) for k in ("forward", "backward")}
    line = f"| all layers, one by one | {totals['forward']:.3f} | {totals['backward']:.3f} |"
    if torch_layers:
        tt = {k: sum(t[k] for t in torch_layers.values()) for k in ("forward", "backward")}
        line += f" {tt['forward']:.3f} | {tt['backward']:.3f} |"
    lines.append(line)
    roof = results["roofline"]
    lines += [
        "",
        f"Roofline: XLA's cost analysis counts {roof['step_mflop']:.0f} MFLOP in the compiled "
        f"step; a {roof['matmul_size']}² float32 matmul runs at {roof['matmul_gflops']:.0f} "
        f"GFLOP/s here, so the step takes at least {roof['bound_ms']:.2f} ms even if every FLOP "
        "ran at matmul speed.",
    ]
    lines += [
        "",
        "The compiled step's slowest XLA operations (a `jax.profiler` trace; µs per step, summed "
        "over the op's events; tracing adds some overhead):",
        "",
        "| XLA op | output | from | µs / step |",
        "|---|---|---|---:|",
        *[
            f"| {r['op']} | `{r['shape']}` | `{r['source'].removeprefix('jit(step)/')}` "
            f"| {r['us_per_step']:.0f} |"
            for r in results["ops"]
        ],
    ]
    base, *rows = results["ablations"]
    lines += [
        "",
        "Ablations: the whole step with one layer replaced by a stand-in of the same shapes and "
        "parameters that does almost no work (a convolution by its kernel's centre tap, an "
        "activation by the identity, average pooling by each window's first pixel), timed in "
        "turns with the unchanged step. A layer's saving is what it costs the step's wall time. "
        "A stand-in can also make the step slower, where XLA then fuses the neighbouring layers "
        "into a slower kernel (e.g. without act1, conv1's multiply-adds fuse into pool1's "
        "reduction):",
        "",
        "| layer replaced | step (ms) | saved (ms) |",
        "|---|---:|---:|",
        f"| none | {base['step_ms']:.3f} | |",
        *[
            f"| {r['replaced']} | {r['step_ms']:.3f} | {base['step_ms'] - r['step_ms']:+.3f} |"
            for r in rows
        ],
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--repeats", type=cli.positive_int, default=200)
    p.add_argument("--no-peers", action="store_true", help="skip the PyTorch layers")
    p.add_argument(
        "--out", type=Path, default=Path("docs/profile"), help="writes STEM.json, STEM.md"
    )
    args = p.parse_args(argv)
    step, layers, ops, bound, (model, params, x) = profile_jax(args.batch_size, args.repeats)
    device = jax.devices()[0]
    results = {
        "machine": cli.machine(),
        "jax": jax.__version__,
        "device": f"{device.platform}:{device.device_kind}",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "step": step,
        "layers": layers,
        "ops": ops,
        "roofline": bound,
        "ablations": ablations(args.batch_size, args.repeats),
    }
    if not args.no_peers:
        try:
            results["torch_layers"], results["torch"] = profile_torch(
                model, params, x, args.repeats
            )
        except ImportError:
            print("torch not installed: JAX only", flush=True)
    md = markdown(results)
    print(md)
    write_report(args.out, results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
