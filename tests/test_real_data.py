"""Real CIFAR-10: the CIFAR-2 split's counts, and the default run clearing the 0.95 bar."""

import json

import numpy as np
import pytest

from configs import default as default_config
from convnet_jax.data import input_pipeline
from test_cli import read_cifar2_test_labels, run_main


def test_first_training_image_is_the_known_frog(cifar10_dir):
  images, labels = input_pipeline.read_binary_file(cifar10_dir / "data_batch_1.bin")
  assert labels[0] == 6  # frog
  np.testing.assert_array_equal(images[0, 0, :12, 0],
                                [59, 43, 50, 68, 98, 119, 139, 145, 149, 149, 131, 125])


def test_cifar2_counts_and_statistics(cifar10_dir):
  config = default_config.get_config()
  config.data.dir = str(cifar10_dir)
  data = input_pipeline.load_dataset(config.data)
  assert data.train_images.shape == (10_000, 32, 32, 3)
  assert data.test_images.shape == (2_000, 32, 32, 3)
  assert np.bincount(data.train_labels).tolist() == [5_000, 5_000]
  assert np.bincount(data.test_labels).tolist() == [1_000, 1_000]
  # SOURCE.md: airplane and automobile training means (0-255 scale); CIFAR-2 is their average.
  expected_mean = (np.array([134.04, 142.88, 150.17]) + np.array([120.15, 115.91, 114.04])) / 2
  np.testing.assert_allclose(data.mean * 255, expected_mean, atol=0.01)


@pytest.mark.slow
def test_default_run_beats_the_bar(cifar10_dir, tmp_path):
  """The specification's run, as the README gives it: 5 epochs, above 0.95 test accuracy."""
  workdir = tmp_path / "default"
  result = run_main("--config", "configs/default.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={workdir}", timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
  print("default run:", records)
  assert records[-1]["test_acc"] > 0.95
  predictions = np.loadtxt(workdir / "preds", dtype=int)
  labels = read_cifar2_test_labels(cifar10_dir)
  assert len(predictions) == 2_000
  assert np.mean(predictions == labels) == records[-1]["test_acc"]
