"""Run by test_parallel.py: ``multihost_check.py PORT NUM_PROCESSES PROCESS_ID``, or with no
arguments for the single-process reference. Two simulated CPU devices per process; prints JSON."""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

if len(sys.argv) == 4:
    port, n, i = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", n, i)

from lenet_jax import parallel  # noqa: E402
from lenet_jax.models import LeNet5, init_params  # noqa: E402
from lenet_jax.predict import predict  # noqa: E402
from lenet_jax.train import (  # noqa: E402
    Step,
    TrainConfig,
    create_train_state,
    make_optimizer,
    train_epoch,
)


def main():
    rng = np.random.default_rng(0)  # the same data on every process
    images = rng.integers(0, 256, (512, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 512).astype(np.int32)
    model = LeNet5()
    config = TrainConfig(batch_size=64, epochs=1)
    state = create_train_state(
        model, init_params(model, jax.random.key(0)), make_optimizer(config, 8), jax.random.key(1)
    )
    mesh = parallel.data_mesh()
    rep = parallel.replicated(mesh)
    state, sums = train_epoch(
        parallel.replicate(state, mesh),
        parallel.make_global(images, rep),
        parallel.make_global(labels, rep),
        epoch=1,
        data_key=jax.random.key(2),
        batch_size=64,
        step=Step(mesh=mesh),
    )
    kernel = np.asarray(state.params["conv1"]["kernel"])
    logits = predict(model, state.params, images[:100], batch_size=64, mesh=mesh)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "loss_sum": float(sums["loss_sum"]),
                "conv1_kernel": kernel.ravel().tolist(),
                "logits": np.asarray(logits).ravel().tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
