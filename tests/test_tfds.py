"""The tensorflow-datasets source, offline, with tfds' own mock data (as the flax examples test it)."""

import numpy as np
from conftest import require

from lenet_jax.data import load_mnist


def test_tfds_source_reads_mnist_records(tmp_path):
    tfds = require("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        images, labels = load_mnist("test", source="tfds", data_dir=tmp_path, progress=False)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() <= 9
    assert images.max() > 0  # mock pixels are random, not an all-zero placeholder
