"""Checks of user input that run before any data loading or compilation.

Each failure raises `UserError` (or `input_pipeline.DataError`, a subclass of it) with one line
that names the config key or file and what was expected; `main` prints it and exits with 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from convnet_jax import input_pipeline
from convnet_jax.errors import UserError

MODELS = ("seed_convnet", "resnet18", "resnet34", "resnet50")
SCHEDULES = ("linear", "step", "cosine")
DATASETS = ("cifar10",)
DTYPES = ("float32", "bfloat16")
CONV_IMPLEMENTATIONS = ("auto", "im2col", "xla")


def _require(condition: bool, key: str, expected: str, value) -> None:
  if not condition:
    raise UserError(f"config.{key}={value!r}: expected {expected}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config) -> None:
  """Raises `UserError` naming the first config key whose value is not usable."""
  _require(config.model in MODELS, "model", f"one of {MODELS}", config.model)
  _require(config.dataset in DATASETS, "dataset", f"one of {DATASETS}", config.dataset)
  _require(config.dtype in DTYPES, "dtype", f"one of {DTYPES}", config.dtype)
  _require(config.conv_implementation in CONV_IMPLEMENTATIONS, "conv_implementation",
           f"one of {CONV_IMPLEMENTATIONS}", config.conv_implementation)
  classes = config.classes
  _require(isinstance(classes, (tuple, list)) and len(classes) >= 2, "classes",
           "a tuple of at least two CIFAR-10 class ids", classes)
  for class_id in classes:
    _require(_is_int(class_id) and 0 <= class_id < input_pipeline.NUM_CIFAR10_CLASSES,
             "classes", "class ids between 0 and 9", classes)
  _require(len(set(classes)) == len(classes), "classes", "no repeated class id", classes)
  for key in ("batch_size", "eval_batch_size", "num_epochs"):
    _require(_is_int(config[key]) and config[key] > 0, key, "a positive integer", config[key])
  _require(_is_number(config.learning_rate) and config.learning_rate >= 0, "learning_rate",
           "a non-negative number", config.learning_rate)
  _require(_is_number(config.momentum) and 0 <= config.momentum < 1, "momentum",
           "a number in [0, 1)", config.momentum)
  for key in ("nesterov", "augment", "drop_last_batch"):
    _require(isinstance(config[key], bool), key, "True or False", config[key])
  # PyTorch refuses Nesterov without momentum too: it would silently be plain SGD.
  _require(not config.nesterov or config.momentum > 0, "nesterov",
           "False when config.momentum is 0 (Nesterov needs momentum)", config.nesterov)
  _require(_is_number(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
           "a non-negative number", config.weight_decay)
  _validate_schedule(config)
  _require(_is_int(config.resnet_width) and config.resnet_width > 0, "resnet_width",
           "a positive integer", config.resnet_width)
  _require(_is_int(config.seed), "seed", "an integer", config.seed)
  for key in ("max_train_examples", "max_test_examples"):
    _require(_is_int(config[key]) and config[key] >= 0, key, "0 (all) or a positive integer",
             config[key])
  if config.data_dir:
    input_pipeline.check_binary_files(config.data_dir)


def _validate_schedule(config) -> None:
  _require(config.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", config.schedule)
  if config.schedule != "step":
    return  # the boundaries and factor are not used
  boundaries = config.lr_boundaries_epochs
  _require(isinstance(boundaries, (tuple, list)) and all(_is_int(b) for b in boundaries),
           "lr_boundaries_epochs", "a tuple of integer epochs", boundaries)
  _require(all(0 < b < config.num_epochs for b in boundaries), "lr_boundaries_epochs",
           f"epochs between 1 and num_epochs - 1 = {config.num_epochs - 1}", boundaries)
  _require(all(a < b for a, b in zip(boundaries, boundaries[1:])), "lr_boundaries_epochs",
           "strictly increasing epochs", boundaries)
  _require(_is_number(config.lr_decay_factor) and 0 < config.lr_decay_factor <= 1,
           "lr_decay_factor", "a number in (0, 1]", config.lr_decay_factor)


def check_batch_sizes(config, num_train_examples: int) -> None:
  """The batch must not be larger than the training set."""
  _require(config.batch_size <= num_train_examples, "batch_size",
           f"at most the {num_train_examples} training examples", config.batch_size)


def check_workdir(workdir: Path, outputs: Iterable[Path]) -> None:
  """Refuses a workdir that is a file or already holds a run's outputs, so nothing is
  overwritten."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir}: exists and is not a folder")
  existing = [path.name for path in outputs if path.exists()]
  if existing:
    raise UserError(f"--workdir {workdir}: already holds a run ({', '.join(existing)}); "
                    f"choose a new workdir so nothing is overwritten")
