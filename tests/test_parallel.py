"""Data parallelism on 8 simulated CPU devices (a subprocess: the device count is fixed at start-up)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["python", "scan"])
def test_a_sharded_epoch_and_sharded_lrp_equal_one_device(loop):
    r = subprocess.run(
        [sys.executable, str(HERE / "parallel_check.py"), loop],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    # the same 16 SGD steps; only the order of the gradient sums differs
    assert out["param_max_diff"] <= 1e-6 * max(1.0, out["param_max_abs"])
    assert abs(out["loss_sharded"] - out["loss_single"]) <= 1e-5 * out["loss_single"]
    assert out["count_sharded"] == 1024.0
    assert out["state_sharding"] == "P()" and out["state_devices"] == 8  # replicated
    assert out["all_reduce"], "the step was not partitioned over the devices"
    # LRP: per-image, so splitting the batch (20 images padded to 24, then cut) changes only float32
    # rounding (the matmuls block a batch of 3 differently from one of 24, and LRP's divisions by
    # small z amplify it); a wrong shard would be off by the order of the relevance itself
    assert out["lrp_shape"] == [20, 32, 32, 1] and out["lrp_shards"] == 8
    assert out["lrp_max_diff"] <= 1e-4 * out["lrp_max_abs"]
    # train_and_evaluate picks the mesh by itself when several devices are present
    assert out["run_devices"] == 8
    if loop == "scan":
        return
    # evaluate.py and explain.py on 8 devices give the one-device numbers
    sharded, single = out["evaluation"]["sharded"], out["evaluation"]["single"]
    np.testing.assert_allclose(sharded["rows"], single["rows"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["maps"], single["maps"], rtol=1e-5, atol=1e-7)
    assert len(sharded["maps"]) == 20 * 32 * 32


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_json(*args) -> dict:
    r = subprocess.run(
        [sys.executable, str(HERE / "multihost_check.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_with_jax_distributed_train_like_one():
    """Multi-host on one machine: two processes (2 CPU devices each) joined by
    ``jax.distributed.initialize``, one mesh over their 4 devices, the same epoch as one process."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "multihost_check.py"), str(port), "2"]
    workers = [subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [json.loads(w.communicate(timeout=600)[0].strip().splitlines()[-1]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    reference = run_json()
    assert [o["process"] for o in outs] == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 4 for o in outs)
    assert reference["processes"] == 1 and reference["devices"] == 2
    for out in outs:
        assert abs(out["loss_sum"] - reference["loss_sum"]) <= 1e-5 * reference["loss_sum"]
        diff = np.abs(np.array(out["conv1_kernel"]) - np.array(reference["conv1_kernel"]))
        assert diff.max() <= 1e-6
        logits = np.array(out["logits"])  # prediction split over both hosts, gathered on each
        assert logits.shape == (1000,)
        np.testing.assert_allclose(logits, reference["logits"], rtol=1e-5, atol=1e-5)
