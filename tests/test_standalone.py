"""``lenet_jax.explain`` stands alone: a user's model explained and evaluated with nothing else of the
package imported."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A user's own Flax model (no biases: LRP's relevance then sums to the logit), explained with LRP
# and scored by the metrics; it prints what it imported and what it measured.
USER_SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp
    from lenet_jax import explain
    from lenet_jax.explain import metrics

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
            return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))

    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1.0, maxval=1.0)
    model = Net()
    f = functools.partial(model.apply, model.init(jax.random.key(1), x))
    target = jnp.argmax(f(x), axis=1)
    relevance = explain.lrp(f, x, target, composite="epsilon_plus_flat")
    curves = metrics.pixel_flipping(f, x, target, relevance, n_steps=4, bounds=(-1.0, 1.0))
    logit = f(x)[jnp.arange(2), target]
    print(json.dumps({
        "package": sorted(m for m in sys.modules if m.startswith("lenet_jax.") and
                          not m.startswith("lenet_jax.explain") and m != "lenet_jax.cpu_kernels"),
        "heavy": sorted(m for m in ("matplotlib", "PIL", "torch", "tqdm", "starlette")
                        if m in sys.modules),
        "relevance_sum": relevance.reshape(2, -1).sum(1).tolist(),
        "logit": logit.tolist(),
        "curve_start": curves["logit"][:, 0].tolist(),
        "conservation_error": metrics.conservation_error(f, x, target, relevance).tolist(),
    }))
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_explain_and_metrics_import_nothing_else_of_the_package():
    r = _run(USER_SCRIPT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["package"] == [] and out["heavy"] == []
    # Flat on the first layer, ε above it, no biases: relevance conserves the logit
    for total, logit, start, err in zip(
        out["relevance_sum"], out["logit"], out["curve_start"], out["conservation_error"],
        strict=True,
    ):  # fmt: skip
        assert abs(total - logit) <= 1e-4 * abs(logit) and abs(logit) > 1e-3
        assert start == logit and err <= 1e-4
