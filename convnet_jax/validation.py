"""Checks of user input that run before any data loading or compilation.

Each failure raises `UserError` (or `input_pipeline.DataError`, a subclass of it) with one line
that names the config key or file and what was expected; `main` prints it and exits with 2.
"""

from __future__ import annotations

import json

from convnet_jax import conv
from convnet_jax import input_pipeline
from convnet_jax.errors import UserError

MODELS = ("seed_convnet", "resnet18", "resnet34", "resnet50")
SCHEDULES = ("linear", "step", "cosine")
DATASETS = ("cifar10",)
DATA_SOURCES = ("binary", "tfds")
DTYPES = ("float32", "bfloat16")
CONV_IMPLEMENTATIONS = ("auto",) + tuple(conv.CONV_IMPLEMENTATIONS)


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
  try:
    conv.check_conv_implementation(config.conv_implementation)
  except conv.ConvUnavailable as error:
    raise UserError(f"config.conv_implementation={config.conv_implementation!r}: {error}; use "
                    f"'auto' (which falls back to 'im2col' here) or 'im2col'") from None
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
  for key in ("nesterov", "augment", "drop_last_batch", "tensorboard", "progress_bar",
              "trace_shapes"):
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
  _validate_replicas(config)
  for key in ("checkpoint_every_epochs", "max_checkpoints_to_keep"):
    _require(_is_int(config[key]) and config[key] > 0, key, "a positive integer", config[key])
  for key in ("max_train_examples", "max_test_examples"):
    _require(_is_int(config[key]) and config[key] >= 0, key, "0 (all) or a positive integer",
             config[key])
  _require(config.data_source in DATA_SOURCES, "data_source", f"one of {DATA_SOURCES}",
           config.data_source)
  if config.data_source == "binary" and config.data_dir:
    input_pipeline.check_binary_files(config.data_dir)
  if "benchmark" in config:
    _validate_benchmark(config.benchmark)


def _validate_replicas(config) -> None:
  count = config.num_replicas
  _require(_is_int(count) and count > 0, "num_replicas", "a positive integer", count)
  for key, check, expected in (
      ("replica_seeds", _is_int, "integer seeds"),
      ("replica_learning_rates", lambda v: _is_number(v) and v >= 0, "non-negative numbers"),
      ("replica_momenta", lambda v: _is_number(v) and 0 <= v < 1, "numbers in [0, 1)")):
    values = config[key]
    _require(isinstance(values, (tuple, list)) and (not values or len(values) == count), key,
             f"() or a tuple of num_replicas={count} values", values)
    _require(all(check(v) for v in values), key, expected, values)
  _require(not config.nesterov or all(m > 0 for m in config.replica_momenta), "nesterov",
           "False when a replica's momentum is 0 (Nesterov needs momentum)", config.nesterov)
  _require(_is_int(config.num_devices) and config.num_devices >= 0, "num_devices",
           "0 (all devices) or a positive integer", config.num_devices)


def check_devices(config, device_count: int) -> None:
  """Data parallel needs the devices asked for and batches that split evenly over them."""
  _require(config.num_devices <= device_count, "num_devices",
           f"at most the {device_count} devices JAX sees (jax.device_count())",
           config.num_devices)
  count = config.num_devices or device_count
  for key in ("batch_size", "eval_batch_size"):
    _require(config[key] % count == 0, key,
             f"a multiple of the {count} data-parallel devices (config.num_devices, 0: all "
             f"jax.device_count())", config[key])


def _validate_benchmark(bench) -> None:
  for size in bench.batch_sizes:
    _require(_is_int(size) and size > 0, "benchmark.batch_sizes", "positive integers",
             bench.batch_sizes)
  for count in bench.num_replicas:
    _require(_is_int(count) and count > 0, "benchmark.num_replicas", "positive integers",
             bench.num_replicas)
  for dtype in bench.dtypes:
    _require(dtype in DTYPES, "benchmark.dtypes", f"names from {DTYPES}", bench.dtypes)
  for key in ("num_examples", "num_steps", "num_epochs"):
    _require(_is_int(bench[key]) and bench[key] > 0, f"benchmark.{key}", "a positive integer",
             bench[key])
  _require(_is_int(bench.warmup_steps) and bench.warmup_steps >= 0, "benchmark.warmup_steps",
           "a non-negative integer", bench.warmup_steps)
  for size in bench.batch_sizes or ():
    _require(size <= bench.num_examples, "benchmark.batch_sizes",
             f"sizes of at most benchmark.num_examples={bench.num_examples}", bench.batch_sizes)


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


# The key of config.json that records the convolution path a run resolved to and why (not a
# config key: the same config may resolve differently on another machine, to the same math).
CONV_RECORD_KEY = "conv_implementation_used"

# Keys that change how a run is shown, measured or spread over devices, not what it computes: a
# workdir may be resumed with other values for them (e.g. on a machine with more devices).
PRESENTATION_KEYS = ("trace_shapes", "progress_bar", "tensorboard", "benchmark",
                     "checkpoint_every_epochs", "max_checkpoints_to_keep", "num_devices",
                     CONV_RECORD_KEY)


def run_identity(config) -> dict:
  """The config values that define what a run computes, as plain JSON data."""
  values = json.loads(config.to_json_best_effort())
  return {key: value for key, value in values.items() if key not in PRESENTATION_KEYS}


def check_workdir(files, identity: dict) -> bool:
  """Checks the workdir before any work. Returns True when it holds a run of the same config to
  resume, False when it is new; raises `UserError` for a file in its place, a corrupt workdir
  or another config's run, so nothing already written is lost."""
  workdir = files.workdir
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir}: exists and is not a folder")
  run_outputs = [path for path in (files.metrics, files.predictions, files.checkpoints)
                 if path.exists()]
  if not files.config.exists():
    if run_outputs:
      raise UserError(f"--workdir {workdir}: holds {', '.join(p.name for p in run_outputs)} but "
                      f"no config.json; not a convnet_jax run or corrupt. Choose a new workdir "
                      f"so nothing is overwritten")
    return False
  try:
    saved = json.loads(files.config.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{files.config}: not valid JSON ({error}); corrupt workdir. Choose a new "
                    f"workdir so nothing is overwritten") from None
  if not isinstance(saved, dict):
    raise UserError(f"{files.config}: expected a JSON object; corrupt workdir")
  saved = {key: value for key, value in saved.items() if key not in PRESENTATION_KEYS}
  if saved != identity:
    differing = sorted(key for key in set(saved) | set(identity)
                       if saved.get(key) != identity.get(key))
    details = ", ".join(f"{key}: {identity.get(key)!r} here, {saved.get(key)!r} there"
                        for key in differing[:3])
    raise UserError(f"--workdir {workdir}: holds a run of another config ({details}); use a "
                    f"new workdir or the same config to resume")
  return True
