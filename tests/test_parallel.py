"""Data parallelism on 8 simulated CPU devices (a subprocess: the device count is fixed at start-up)."""

import json
import subprocess
import sys
from pathlib import Path

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
    # LRP: per-image, so splitting the batch changes nothing (20 images padded to 24, then cut)
    assert out["lrp_shape"] == [20, 32, 32, 1] and out["lrp_shards"] == 8
    assert out["lrp_max_diff"] <= 1e-6 * out["lrp_max_abs"]
    # train_and_evaluate picks the mesh by itself when several devices are present
    assert out["run_devices"] == 8
