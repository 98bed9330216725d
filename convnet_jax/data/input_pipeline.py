"""CIFAR-10 input pipeline.

Two sources (`config.data.source`), one result:
* "binary": the original CIFAR-10 binary files (`data_batch_{1..5}.bin`, `test_batch.bin`), read
  with numpy from `data_dir` (empty: $CONVNET_JAX_DATA_DIR, else the per-user cache that
  `download` fills once). Training and test sets keep CIFAR-10's own order.
* "tfds": tensorflow-datasets `cifar10`, read through `tfds.data_source` (ArrayRecord, no
  TensorFlow needed to read). Preparing it the first time (download or `manual_dir` archive)
  needs TensorFlow, as tfds extracts and encodes with it: `pip install 'convnet_jax[tfds]'`.

The chosen classes are kept and relabelled 0..k-1 in the order given. Images stay uint8 (4x less
memory to keep on the device); `normalize` turns them into floats with the training-set
per-channel mean and population std, the same for training and test images. `augment` (the
training-set augmentation: zero pad, random crop, random horizontal flip) works on the uint8
images on the device, before `normalize`; test images are only normalised.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convnet_jax.data import download
from convnet_jax.errors import UserError

IMAGE_SHAPE = (32, 32, 3)
RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then the R, G and B planes
NUM_CIFAR10_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{index}.bin" for index in range(1, 6))
TEST_FILES = ("test_batch.bin",)
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")
# Zero pixels added on each border before the random crop (torchvision RandomCrop(32, padding=4)).
AUGMENT_PADDING = 4
# The environment variable that points tests and tools at a local CIFAR-10 binary folder.
DATA_DIR_ENV = download.DATA_DIR_ENV


class DataError(UserError):
  """A data folder or file is missing, truncated or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test sets as uint8 NHWC images with int32 labels 0..k-1, and the statistics
  (on the [0, 1] scale) that normalise them."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: np.ndarray  # per channel, float32, (3,)
  std: np.ndarray  # per channel, population std, float32, (3,)
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def check_binary_files(data_dir: str | os.PathLike) -> None:
  """Checks, without reading them, that the CIFAR-10 binary files exist and hold whole records."""
  folder = Path(data_dir)
  if not folder.is_dir():
    raise DataError(f"config.data.dir: {folder} is not a folder (expected the CIFAR-10 binary "
                    f"files {', '.join(TRAIN_FILES + TEST_FILES)})")
  for name in TRAIN_FILES + TEST_FILES:
    path = folder / name
    if not path.is_file() and (folder / name.removesuffix(".bin")).is_file():
      raise DataError(f"{folder}: holds the pickled CIFAR-10 'python version', which is not read "
                      f"(unpickling can run code); use the binary version (*.bin files)")
    if not path.is_file():
      raise DataError(f"{path}: file not found (config.data.dir must hold the CIFAR-10 binary "
                      f"version: {', '.join(TRAIN_FILES + TEST_FILES)})")
    size = path.stat().st_size
    if size == 0 or size % RECORD_BYTES:
      raise DataError(f"{path}: {size} bytes is not a whole number of {RECORD_BYTES}-byte "
                      f"records (1 label byte + 3072 pixel bytes); truncated or not CIFAR-10")


def read_binary_file(path: str | os.PathLike,
                     classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 binary batch file into uint8 NHWC images and int32 labels, only the
  records of `classes` (original labels, file order) if given."""
  path = Path(path)
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % RECORD_BYTES:
    raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte "
                    f"records (1 label byte + 3072 pixel bytes); truncated or not CIFAR-10")
  records = raw.reshape(-1, RECORD_BYTES)
  labels = records[:, 0].astype(np.int32)
  bad = np.flatnonzero(labels >= NUM_CIFAR10_CLASSES)
  if bad.size:
    raise DataError(f"{path}: record {bad[0]} has label {labels[bad[0]]}, expected 0-9; "
                    f"not a CIFAR-10 binary file")
  if classes is not None:
    # Dropped before the transpose below, the slow part, so CIFAR-2 transposes a fifth.
    keep = np.isin(labels, np.asarray(classes))
    records, labels = records[keep], labels[keep]
  # Each record stores three 32x32 planes (R, G, B); NHWC wants the channel last.
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def read_binary_split(data_dir: str | os.PathLike, names: Sequence[str],
                      classes: Sequence[int] | None = None):
  """Reads and concatenates CIFAR-10 binary files, in the order given (only the records of
  `classes` if given)."""
  parts = [read_binary_file(Path(data_dir) / name, classes) for name in names]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_tfds_can_prepare(tfds_data_dir: str = "") -> None:
  """Before any download: tfds' cifar10 is prepared already, or TensorFlow (which preparing
  needs) is installed; else a `DataError` saying what to install."""
  import importlib.util

  import tensorflow_datasets as tfds  # imported here: the binary path never needs it

  if importlib.util.find_spec("tensorflow") is not None:
    return
  try:  # readable without preparing?
    tfds.data_source("cifar10", split="test", data_dir=tfds_data_dir or None, download=False,
                     builder_kwargs={"file_format": "array_record"})
    return
  except Exception:  # tfds raises several types for data that is not there
    pass
  where = tfds_data_dir or "tfds' data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  raise DataError(f"config.data.source='tfds': cifar10 is not prepared in {where} and "
                  f"preparing it needs TensorFlow: pip install 'convnet_jax[tfds]' (or use "
                  f"config.data.source='binary', which needs no TensorFlow)")


def read_tfds_split(split: str, tfds_data_dir: str = "", manual_dir: str = ""):
  """Reads a split of tfds `cifar10` as uint8 NHWC images and int32 labels, preparing the data
  set first if needed (download, or `manual_dir/cifar-10-binary.tar.gz` offline)."""
  import tensorflow_datasets as tfds  # imported here: the binary path never needs it

  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    source = tfds.data_source(
        "cifar10", split=split, data_dir=tfds_data_dir or None, download=True,
        builder_kwargs={"file_format": "array_record"},
        download_and_prepare_kwargs={"download_config": download_config})
    examples = [source[index] for index in range(len(source))]
  except Exception as error:  # tfds raises many types: name the fix, keep the cause
    raise DataError(
        f"tfds could not provide cifar10/{split} ({type(error).__name__}: {error}). Offline, set "
        f"config.data.dir to a folder with the CIFAR-10 binary files, or put "
        f"cifar-10-binary.tar.gz in config.data.tfds_manual_dir; preparing with tfds needs "
        f"TensorFlow: pip install 'convnet_jax[tfds]'") from error
  images = np.stack([np.asarray(example["image"], dtype=np.uint8) for example in examples])
  labels = np.asarray([example["label"] for example in examples], dtype=np.int32)
  if images.shape[1:] != IMAGE_SHAPE:
    raise DataError(f"tfds cifar10/{split}: images of shape {images.shape[1:]}, "
                    f"expected {IMAGE_SHAPE}")
  return images, labels


def select_classes(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]):
  """Keeps the examples of `classes` (in their original order) and relabels class classes[i]
  as i."""
  relabel = np.full(NUM_CIFAR10_CLASSES, -1, dtype=np.int32)
  relabel[np.asarray(classes)] = np.arange(len(classes), dtype=np.int32)
  new_labels = relabel[labels]
  keep = new_labels >= 0
  return images[keep], new_labels[keep]


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std of uint8 NHWC images on the [0, 1] scale."""
  # From each channel's histogram of byte values: exact integer sums S1 of the values and S2 of
  # their squares, then the population variance (N*S2 - S1^2) / N^2 in Python's unbounded
  # integers (no float cancellation), ~10x faster than float64 passes over every pixel.
  pixels = images.reshape(-1, images.shape[-1])
  count = pixels.shape[0]
  values = np.arange(256, dtype=np.int64)
  mean, variance = [], []
  for channel in range(pixels.shape[1]):
    histogram = np.bincount(pixels[:, channel], minlength=256).astype(np.int64)
    sum_values, sum_squares = int(histogram @ values), int(histogram @ values**2)
    mean.append(sum_values / (255 * count))
    variance.append((count * sum_squares - sum_values**2) / (255**2 * count**2))
  mean, variance = np.array(mean), np.array(variance)
  return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def normalize(images, mean, std):
  """uint8 images -> float32 (images / 255 - mean) / std, on whatever device holds them."""
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def jitter(key: jax.Array, images: jax.Array, brightness: float, contrast: float) -> jax.Array:
  """hiverge/cifar10-speedrun's colour jitter of a normalised NHWC batch: each image becomes
  (x + b) c, with b uniform in [-brightness, brightness] and c in [1 - contrast, 1 + contrast],
  drawn independently per image from `key`."""
  shift_key, scale_key = jax.random.split(key)
  shape = (images.shape[0], 1, 1, 1)
  shift = jax.random.uniform(shift_key, shape, images.dtype, -brightness, brightness)
  scale = jax.random.uniform(scale_key, shape, images.dtype, 1 - contrast, 1 + contrast)
  return (images + shift) * scale


def cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """airbench96's cutout of a normalised NHWC batch: in each image a `size` x `size` square is
  set to 0 (the channel means, in normalised units), its top-left corner uniform over the
  positions that keep the square inside the image, drawn independently per image from `key`."""
  batch, height, width, _ = images.shape
  top_key, left_key = jax.random.split(key)
  top = jax.random.randint(top_key, (batch, 1), 0, height - size + 1)
  left = jax.random.randint(left_key, (batch, 1), 0, width - size + 1)
  rows = (jnp.arange(height) >= top) & (jnp.arange(height) < top + size)  # (batch, height)
  columns = (jnp.arange(width) >= left) & (jnp.arange(width) < left + size)
  square = rows[:, :, None, None] & columns[:, None, :, None]
  return jnp.where(square, jnp.zeros((), images.dtype), images)


def augment(key: jax.Array, images: jax.Array, padding: int = AUGMENT_PADDING,
            pad_mode: str = "zeros", flips: jax.Array | None = None) -> jax.Array:
  """Random crop and horizontal flip of a batch of NHWC images, independently per image.

  Each image is padded with `padding` pixels on each side, zeros (black, before normalisation,
  like torchvision's `RandomCrop(size, padding=4)` followed by `Normalize`) or the image
  reflected at its border (`pad_mode="reflect"`, airbench's translation), cropped back to its
  size at a uniformly random offset in [0, 2 * padding] along each axis, and mirrored
  left-right with probability 1/2, or where `flips` (one bool per image) says. The dtype is kept
  (uint8 on the device). A pure function of `key`: the same key gives the same batch.
  """
  batch, height, width, channels = images.shape
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * padding + 1)
  if flips is None:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   mode="reflect" if pad_mode == "reflect" else "constant")

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  cropped = jax.vmap(crop)(padded, offsets)
  return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def load_dataset(data_config) -> Dataset:
  """Loads the data set the config's `data` group names.

  Args:
    data_config: the config's `data` group: the dataset, its classes, where the images come
      from (`source`, `dir`, `url`, `sha256`, the tfds folders) and how many to keep.

  Returns:
    A `Dataset`: CIFAR-10 restricted to `classes` (relabelled 0..k-1 in their order) as uint8
    NHWC images and int labels, with the training images' channel mean and std.
  """
  if data_config.source == "binary":
    if data_config.dir:
      check_binary_files(data_config.dir)
      folder = data_config.dir
    else:
      folder = download.ensure_cifar10(download.default_data_dir(), TRAIN_FILES + TEST_FILES,
                                       data_config.url, data_config.sha256)
    train_images, train_labels = read_binary_split(folder, TRAIN_FILES, data_config.classes)
    test_images, test_labels = read_binary_split(folder, TEST_FILES, data_config.classes)
  else:
    check_tfds_can_prepare(data_config.tfds_data_dir)
    train_images, train_labels = read_tfds_split("train", data_config.tfds_data_dir,
                                                 data_config.tfds_manual_dir)
    test_images, test_labels = read_tfds_split("test", data_config.tfds_data_dir,
                                               data_config.tfds_manual_dir)
  classes = tuple(data_config.classes)
  train_images, train_labels = select_classes(train_images, train_labels, classes)
  test_images, test_labels = select_classes(test_images, test_labels, classes)
  if data_config.max_train_examples:
    train_images = train_images[:data_config.max_train_examples]
    train_labels = train_labels[:data_config.max_train_examples]
  if data_config.max_test_examples:
    test_images = test_images[:data_config.max_test_examples]
    test_labels = test_labels[:data_config.max_test_examples]
  if len(train_labels) == 0:
    raise DataError(f"config.data.classes={classes}: no training image has these classes")
  mean, std = channel_statistics(train_images)
  return Dataset(train_images, train_labels, test_images, test_labels, mean, std,
                 tuple(CIFAR10_CLASS_NAMES[c] for c in classes))
