"""Run by test_parallel.py in a subprocess with 8 simulated CPU devices; prints one JSON line."""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lenet_jax import parallel  # noqa: E402
from lenet_jax.experiment import train_and_evaluate  # noqa: E402
from lenet_jax.models import LeNet5, init_params  # noqa: E402
from lenet_jax.train import (  # noqa: E402
    Step,
    TrainConfig,
    create_train_state,
    epoch_batches,
    make_optimizer,
    train_epoch,
)


def main():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1024, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 1024).astype(np.int32)
    model = LeNet5()
    config = TrainConfig(batch_size=64, epochs=1)
    tx = make_optimizer(config, 16)
    key = jax.random.key(0)

    def fresh_state():
        return create_train_state(model, init_params(model, key), tx, jax.random.key(1))

    kwargs = dict(epoch=1, data_key=jax.random.key(2), batch_size=64, loop=sys.argv[1])
    single, single_sums = train_epoch(
        fresh_state(), jnp.asarray(images), jnp.asarray(labels), **kwargs
    )
    mesh = parallel.data_mesh()
    rep = parallel.replicated(mesh)
    step = Step(mesh=mesh)
    sharded, sharded_sums = train_epoch(
        parallel.replicate(fresh_state(), mesh),
        parallel.make_global(images, rep),
        parallel.make_global(labels, rep),
        step=step,
        **kwargs,
    )
    diffs = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), single.params, sharded.params
    )
    # the compiled step is partitioned: XLA inserted the cross-device reduction of the gradient
    idx, weight = parallel.replicate(epoch_batches(jax.random.key(2), 1, 1024, 64), mesh)
    data = (parallel.make_global(images, rep), parallel.make_global(labels, rep))
    if sys.argv[1] == "python":
        args = (sharded, sharded_sums, *data, idx, weight, 0)
    else:
        args = (sharded, *data, idx, weight)
    jitted = step.python_step if sys.argv[1] == "python" else step.scan_epoch
    hlo = jitted.lower(*args).compile().as_text()

    x = jax.random.normal(jax.random.key(3), (20, 32, 32, 1))  # 20: not a multiple of 8
    from lenet_jax.attribution import explainer

    plain = explainer("lrp", model, x, composite="epsilon_plus_flat")(single.params, x)
    padded = jax.ShapeDtypeStruct((24, *x.shape[1:]), x.dtype)  # as sharded over 8 devices
    lrp = explainer("lrp", model, padded, composite="epsilon_plus_flat")
    split = parallel.sharded_call(lrp, mesh, single.params, x)
    lrp_shards = len(parallel.shard_batch(np.asarray(x), mesh)[0].sharding.device_set)

    with tempfile.TemporaryDirectory() as tmp:
        import lenet_jax.evaluation_report as evaluation_report
        import lenet_jax.experiment as experiment
        import lenet_jax.report as report

        def fake_load(name, split, **kw):
            return (images, labels) if split == "train" else (images[:100], labels[:100])

        experiment.load_dataset = evaluation_report.load_dataset = fake_load
        metrics = train_and_evaluate(
            model, config, Path(tmp) / "run", figures=False, progress=False
        )
        # evaluation and explanation of the run: split over the 8 devices, then on one device
        evaluation = {}
        meshes = (("sharded", parallel.default_mesh()), ("single", None))
        for name, mesh in meshes if sys.argv[1] == "python" else ():  # once is enough
            parallel.default_mesh = lambda mesh=mesh: mesh
            results = evaluation_report.evaluate_run(
                Path(tmp) / "run",
                methods=["saliency", "lrp"],
                composites=["epsilon"],
                n=16,
                n_randomization=8,
                out=Path(tmp) / name,
                progress=False,
            )
            maps = report.explain_method("lrp", model, single.params, x)
            evaluation[name] = {
                "rows": [
                    [r["morf_aopc"], r["lerf_aopc"], r["faithfulness_corr"], r["sparseness"]]
                    for r in results["rows"]
                ],
                "maps": np.asarray(maps).ravel().tolist(),
            }
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "param_max_diff": max(jax.tree_util.tree_leaves(diffs)),
                "param_max_abs": float(
                    max(jnp.max(jnp.abs(p)) for p in jax.tree_util.tree_leaves(single.params))
                ),
                "loss_single": float(single_sums["loss_sum"]),
                "loss_sharded": float(sharded_sums["loss_sum"]),
                "count_sharded": float(sharded_sums["count"]),
                "state_sharding": str(jax.tree_util.tree_leaves(sharded.params)[0].sharding.spec),
                "state_devices": len(
                    jax.tree_util.tree_leaves(sharded.params)[0].sharding.device_set
                ),
                "lrp_max_diff": float(jnp.max(jnp.abs(plain - split))),
                "lrp_max_abs": float(jnp.max(jnp.abs(plain))),
                "lrp_shape": list(split.shape),
                "lrp_shards": lrp_shards,
                "all_reduce": "all-reduce" in hlo,
                "evaluation": evaluation,
                "run_devices": metrics["devices"],
                "run_steps": metrics["history"][0]["train"],
            }
        )
    )


if __name__ == "__main__":
    main()
