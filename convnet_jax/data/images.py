"""Images from files, for evaluating and using a trained model: a labelled set (a CIFAR-10
binary folder or file, or a numpy .npz) and unlabelled image files (PNG, JPEG, ... via Pillow, or
.npz). Each problem is a `DataError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from convnet_jax.data import input_pipeline
from convnet_jax.data.input_pipeline import DataError
from convnet_jax.data.input_pipeline import IMAGE_SHAPE


def _npz_arrays(path: Path, keys: Sequence[str]) -> list[np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as arrays:  # arrays only: nothing is unpickled
      names = arrays.files
      found = [arrays[key] for key in keys if key in names]
  except (OSError, ValueError) as error:
    raise DataError(f"{path}: not a readable .npz file ({error})") from None
  if len(found) < len(keys):
    missing = next(key for key in keys if key not in names)
    raise DataError(f"{path}: no array named {missing!r} (it holds "
                    f"{', '.join(names) or 'nothing'}; expected {', '.join(keys)})")
  return found


def _checked_images(path, images: np.ndarray) -> np.ndarray:
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
    raise DataError(f"{path}: images of shape {images.shape} and dtype {images.dtype}, expected "
                    f"uint8 N x 32 x 32 x 3")
  return images


def read_labelled(path: str | Path, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC images and labels 0..k-1 of a labelled set, keeping the CIFAR-10 `classes` (and
  numbering them in that order, as the run's own test set): `path` is a folder in CIFAR-10's
  binary layout (its test_batch.bin), one binary batch file, or an .npz of `images` (uint8, N x
  32 x 32 x 3) and `labels` (CIFAR-10 class numbers 0-9)."""
  path = Path(path)
  if path.is_dir():
    path = path / input_pipeline.TEST_FILES[0]
  if not path.is_file():
    raise DataError(f"{path}: file not found (expected a CIFAR-10 binary folder or file, or an "
                    f".npz of images and labels)")
  if path.suffix == ".npz":
    images, labels = _npz_arrays(path, ("images", "labels"))
    images = _checked_images(path, images)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or \
        (labels.size and not 0 <= labels.min() <= labels.max() < len(
            input_pipeline.CIFAR10_CLASS_NAMES)):
      raise DataError(f"{path}: labels must be {len(images)} integers 0-9 (CIFAR-10 classes)")
    labels = labels.astype(np.int32)
  else:
    images, labels = input_pipeline.read_binary_file(path)
  images, labels = input_pipeline.select_classes(images, labels, classes)
  if not len(labels):
    raise DataError(f"{path}: no image of the run's classes {tuple(classes)}")
  return images, labels


def read_image_file(path: Path) -> np.ndarray:
  """One 32x32 image file as uint8 (32, 32, 3) RGB."""
  from PIL import Image, UnidentifiedImageError  # only commands that read image files need it

  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
  except (OSError, UnidentifiedImageError) as error:
    raise DataError(f"{path}: not a readable image ({error})") from None
  if pixels.shape != IMAGE_SHAPE:
    raise DataError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels; the model takes "
                    f"32x32 RGB images (resize it first)")
  return pixels


def read_unlabelled(paths: Sequence[str | Path]) -> tuple[list[str], np.ndarray]:
  """(names, uint8 NHWC images) of image files and .npz files of `images` (an .npz's images are
  named FILE[i])."""
  names, images = [], []
  for path in map(Path, paths):
    if not path.is_file():
      raise DataError(f"{path}: file not found")
    if path.suffix == ".npz":
      (batch,) = _npz_arrays(path, ("images",))
      batch = _checked_images(path, batch)
      names += [f"{path}[{index}]" for index in range(len(batch))]
      images.append(batch)
    else:
      names.append(str(path))
      images.append(read_image_file(path)[None])
  return names, np.concatenate(images)
