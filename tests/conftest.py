"""Shared fixtures: the real CIFAR-10 folder and tiny generated CIFAR-style binary files."""

import os
from pathlib import Path

import numpy as np
import pytest

from convnet_jax.data import input_pipeline
from convnet_jax.runs import compile_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
# Files written by an earlier version of the package (see tests/data/README.md).
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_of_this_test_run(tmp_path_factory):
  """One compilation cache for this test run (both pytest-xdist workers and the runs they start
  in subprocesses), not the user's: each test run starts cold, and its tests share programs."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the workers' folders sit side by side in the run's own folder
  os.environ[compile_cache.CACHE_VARIABLE] = str(base / "compilation-cache")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
  """The real CIFAR-10 binary folder: $CONVNET_JAX_DATA_DIR, else ../shared/data/cifar10 from
  the repository root. Missing data fails the test (it must run, not skip)."""
  folder = Path(os.environ.get(input_pipeline.DATA_DIR_ENV,
                               REPO_ROOT.parent / "shared" / "data" / "cifar10"))
  if not (folder / "test_batch.bin").is_file():
    pytest.fail(f"real CIFAR-10 not found at {folder}; set {input_pipeline.DATA_DIR_ENV}")
  return folder


def write_records(path: Path, labels, images=None, seed=0) -> np.ndarray:
  """Writes CIFAR-10 binary records (label byte + R, G, B planes) and returns the images as
  NHWC uint8, built independently of the reader."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels, dtype=np.uint8)
  if images is None:
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
  with open(path, "wb") as f:
    for label, image in zip(labels, images):
      f.write(bytes([label]))
      for channel in range(3):  # planes, each row-major
        f.write(image[:, :, channel].tobytes())
  return images


@pytest.fixture
def tiny_cifar_dir(tmp_path) -> Path:
  """A CIFAR-10 binary folder with 6 training records per file and 6 test records."""
  train_labels = [[0, 1, 2, 1, 0, 9], [3, 1, 0, 0, 5, 1], [2, 2, 1, 0, 7, 8],
                  [0, 1, 6, 4, 1, 0], [1, 0, 3, 9, 9, 1]]
  for index, labels in enumerate(train_labels):
    write_records(tmp_path / f"data_batch_{index + 1}.bin", labels, seed=index)
  write_records(tmp_path / "test_batch.bin", [1, 0, 4, 1, 0, 2], seed=99)
  return tmp_path
