"""Checks of user input that run before any data loading or compilation.

Each failure raises `UserError` (or `input_pipeline.DataError`, a subclass of it) with one line
that names the config key or file and what was expected; `main` prints it and exits with 2.
"""

from __future__ import annotations

import math

import jax

from convnet_jax import models
from convnet_jax.models import airbench
from convnet_jax import optim
from convnet_jax.data import input_pipeline
from convnet_jax.data import tta
from convnet_jax.ops import conv
from convnet_jax.runs.errors import UserError

MODELS = tuple(models.MODELS)
SCHEDULES = ("linear", "step", "cosine", "warmup_linear")
LOSS_REDUCTIONS = ("mean", "sum")
AUGMENT_PADDINGS = ("zeros", "reflect")
AUGMENT_FLIPS = ("random", "alternate", "none")
LATE_FREEZE_SCHEDULES = ("main", "linear_to_zero")
DATASETS = ("cifar10",)
DATA_SOURCES = ("binary", "tfds")
DTYPES = ("float32", "bfloat16")
CONV_IMPLEMENTATIONS = ("auto",) + tuple(conv.CONV_IMPLEMENTATIONS)
# The config groups that say how a run is operated, not what it computes: a run is the config
# without them (`workdir.run_identity`), so a workdir may be resumed with other values in them.
OPERATION_GROUPS = ("operations", "benchmark")


def require(condition: bool, key: str, expected: str, value, prefix: str = "config") -> None:
  """Raises `UserError` "PREFIX.KEY=VALUE: expected EXPECTED" unless `condition`."""
  if not condition:
    raise UserError(f"{prefix}.{key}={value!r}: expected {expected}")


def is_int(value) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config) -> None:
  """Raises `UserError` naming the first config key whose value is not usable."""
  require(config.model in MODELS, "model", f"one of {MODELS}", config.model)
  require(config.dataset in DATASETS, "dataset", f"one of {DATASETS}", config.dataset)
  require(config.dtype in DTYPES, "dtype", f"one of {DTYPES}", config.dtype)
  require(config.conv_implementation in CONV_IMPLEMENTATIONS, "conv_implementation",
          f"one of {CONV_IMPLEMENTATIONS}", config.conv_implementation)
  try:
    conv.check_conv_implementation(config.conv_implementation)
  except conv.ConvUnavailable as error:
    raise error.naming_the_key(config.conv_implementation, "; use 'auto' (which falls back to "
                               "'im2col' here) or 'im2col'") from None
  classes = config.classes
  require(isinstance(classes, (tuple, list)) and len(classes) >= 2, "classes",
          "a tuple of at least two CIFAR-10 class ids", classes)
  for class_id in classes:
    require(is_int(class_id) and 0 <= class_id < input_pipeline.NUM_CIFAR10_CLASSES,
            "classes", "class ids between 0 and 9", classes)
  require(len(set(classes)) == len(classes), "classes", "no repeated class id", classes)
  for key in ("batch_size", "eval_batch_size"):
    require(is_int(config[key]) and config[key] > 0, key, "a positive integer", config[key])
  require(is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
          "a positive number (a fraction trains part of one more epoch)", config.num_epochs)
  require(is_number(config.learning_rate) and config.learning_rate >= 0, "learning_rate",
          "a non-negative number", config.learning_rate)
  require(is_number(config.momentum) and 0 <= config.momentum < 1, "momentum",
          "a number in [0, 1)", config.momentum)
  for key in ("nesterov", "augment", "drop_last_batch"):
    require(isinstance(config[key], bool), key, "True or False", config[key])
  # PyTorch refuses Nesterov without momentum too: it would silently be plain SGD.
  require(not config.nesterov or config.momentum > 0, "nesterov",
          "False when config.momentum is 0 (Nesterov needs momentum)", config.nesterov)
  require(is_number(config.weight_decay) and config.weight_decay >= 0, "weight_decay",
          "a non-negative number", config.weight_decay)
  _validate_schedule(config)
  _validate_recipe(config)
  require(is_int(config.resnet_width) and config.resnet_width > 0, "resnet_width",
          "a positive integer", config.resnet_width)
  require(is_int(config.seed), "seed", "an integer", config.seed)
  _validate_replicas(config)
  _validate_operations(config.operations)
  for key in ("max_train_examples", "max_test_examples"):
    require(is_int(config[key]) and config[key] >= 0, key, "0 (all) or a positive integer",
            config[key])
  require(config.data_source in DATA_SOURCES, "data_source", f"one of {DATA_SOURCES}",
          config.data_source)
  if config.data_source == "binary" and config.data_dir:
    input_pipeline.check_binary_files(config.data_dir)
  if "benchmark" in config:
    _validate_benchmark(config.benchmark)


def _validate_replicas(config) -> None:
  count = config.num_replicas
  require(is_int(count) and count > 0, "num_replicas", "a positive integer", count)
  for key, check, expected in (
      ("replica_seeds", is_int, "integer seeds"),
      ("replica_learning_rates", lambda v: is_number(v) and v >= 0, "non-negative numbers"),
      ("replica_momenta", lambda v: is_number(v) and 0 <= v < 1, "numbers in [0, 1)")):
    values = config[key]
    require(isinstance(values, (tuple, list)) and (not values or len(values) == count), key,
            f"() or a tuple of num_replicas={count} values", values)
    require(all(check(v) for v in values), key, expected, values)
  require(not config.nesterov or all(m > 0 for m in config.replica_momenta), "nesterov",
          "False when a replica's momentum is 0 (Nesterov needs momentum)", config.nesterov)


def _validate_operations(operations) -> None:
  for key in ("tensorboard", "progress_bar", "trace_shapes"):
    require(isinstance(operations[key], bool), f"operations.{key}", "True or False",
            operations[key])
  for key in ("checkpoint_every_epochs", "max_checkpoints_to_keep", "peer_timeout_seconds"):
    require(is_int(operations[key]) and operations[key] > 0, f"operations.{key}",
            "a positive integer", operations[key])
  require(is_int(operations.num_devices) and operations.num_devices >= 0,
          "operations.num_devices", "0 (all devices) or a positive integer",
          operations.num_devices)
  require(is_int(operations.checkpoint_every_steps) and operations.checkpoint_every_steps >= 0,
          "operations.checkpoint_every_steps", "0 (only per epoch) or a positive integer",
          operations.checkpoint_every_steps)
  require(is_int(operations.eval_every_epochs) and operations.eval_every_epochs >= 0,
          "operations.eval_every_epochs", "0 (only after the last epoch) or a positive integer",
          operations.eval_every_epochs)
  require(is_int(operations.steps_per_call) and operations.steps_per_call >= 0,
          "operations.steps_per_call", "0 (sized by operations.seconds_per_call) or a positive "
          "integer", operations.steps_per_call)
  require(is_number(operations.seconds_per_call) and operations.seconds_per_call > 0,
          "operations.seconds_per_call", "a positive number of seconds",
          operations.seconds_per_call)
  require(isinstance(operations.compilation_cache, str), "operations.compilation_cache",
          '"" (the default folder), "off" or a folder path', operations.compilation_cache)


def check_devices(config, device_count: int) -> None:
  """Data parallel needs the devices asked for and batches that split evenly over them."""
  num_devices = config.operations.num_devices
  require(num_devices <= device_count, "operations.num_devices",
          f"at most the {device_count} devices JAX sees (jax.device_count())", num_devices)
  count = num_devices or device_count
  for key in ("batch_size", "eval_batch_size"):
    require(config[key] % count == 0, key,
            f"a multiple of the {count} data-parallel devices (config.operations.num_devices, "
            f"0: all jax.device_count())", config[key])


def _validate_benchmark(bench) -> None:
  for size in bench.batch_sizes:
    require(is_int(size) and size > 0, "benchmark.batch_sizes", "positive integers",
            bench.batch_sizes)
  for count in bench.num_replicas:
    require(is_int(count) and count > 0, "benchmark.num_replicas", "positive integers",
            bench.num_replicas)
  for dtype in bench.dtypes:
    require(dtype in DTYPES, "benchmark.dtypes", f"names from {DTYPES}", bench.dtypes)
  for key in ("num_examples", "num_steps", "num_epochs"):
    require(is_int(bench[key]) and bench[key] > 0, f"benchmark.{key}", "a positive integer",
            bench[key])
  require(isinstance(bench.aot_topology, str), "benchmark.aot_topology",
          'a TPU topology name such as "v5e:2x2", or "" (time on this machine)',
          bench.aot_topology)
  for platform in bench.aot_gpu_platforms:
    require(platform in ("cuda", "rocm"), "benchmark.aot_gpu_platforms",
            'a tuple of "cuda" and "rocm"', bench.aot_gpu_platforms)
  require(is_int(bench.warmup_steps) and bench.warmup_steps >= 0, "benchmark.warmup_steps",
          "a non-negative integer", bench.warmup_steps)
  for size in bench.batch_sizes or ():
    require(size <= bench.num_examples, "benchmark.batch_sizes",
            f"sizes of at most benchmark.num_examples={bench.num_examples}", bench.batch_sizes)


def _validate_schedule(config) -> None:
  require(config.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", config.schedule)
  if config.schedule == "warmup_linear":
    require(is_number(config.warmup_fraction) and 0 <= config.warmup_fraction < 1,
            "warmup_fraction", "a number in [0, 1)", config.warmup_fraction)
    for key in ("warmup_start_factor", "final_lr_factor"):
      require(is_number(config[key]) and config[key] >= 0, key, "a non-negative number",
              config[key])
  if config.schedule != "step":
    return  # the boundaries and factor are not used
  boundaries = config.lr_boundaries_epochs
  require(isinstance(boundaries, (tuple, list)) and all(is_int(b) for b in boundaries),
          "lr_boundaries_epochs", "a tuple of integer epochs", boundaries)
  require(all(0 < b < config.num_epochs for b in boundaries), "lr_boundaries_epochs",
          f"epochs between 1 and num_epochs - 1 = {math.ceil(config.num_epochs) - 1}", boundaries)
  require(all(a < b for a, b in zip(boundaries, boundaries[1:])), "lr_boundaries_epochs",
          "strictly increasing epochs", boundaries)
  require(is_number(config.lr_decay_factor) and 0 < config.lr_decay_factor <= 1,
          "lr_decay_factor", "a number in (0, 1]", config.lr_decay_factor)


def _validate_recipe(config) -> None:
  """The loss, augmentation, parameter groups, lookahead and test-time augmentation keys."""
  require(is_number(config.label_smoothing) and 0 <= config.label_smoothing < 1,
          "label_smoothing", "a number in [0, 1)", config.label_smoothing)
  require(config.loss_reduction in LOSS_REDUCTIONS, "loss_reduction",
          f"one of {LOSS_REDUCTIONS}", config.loss_reduction)
  require(is_int(config.augment_translate) and 0 <= config.augment_translate <= 16,
          "augment_translate", "an integer number of pixels in [0, 16]", config.augment_translate)
  require(config.augment_padding in AUGMENT_PADDINGS, "augment_padding",
          f"one of {AUGMENT_PADDINGS}", config.augment_padding)
  require(config.augment_flip in AUGMENT_FLIPS, "augment_flip", f"one of {AUGMENT_FLIPS}",
          config.augment_flip)
  for key in ("augment_brightness", "augment_contrast"):
    require(is_number(config[key]) and 0 <= config[key] < 1, key, "a number in [0, 1)",
            config[key])
  require(config.test_time_augmentation in tta.LEVELS,
          "test_time_augmentation", f"one of {tta.LEVELS}",
          config.test_time_augmentation)
  require(isinstance(config.decoupled_hyperparameters, bool), "decoupled_hyperparameters",
          "True or False", config.decoupled_hyperparameters)
  # The decoupled weight decay is weight_decay * batch_size / learning_rate.
  require(not config.decoupled_hyperparameters or config.learning_rate > 0, "learning_rate",
          "a positive number with config.decoupled_hyperparameters", config.learning_rate)
  require(is_number(config.offset_lr_multiplier) and config.offset_lr_multiplier > 0,
          "offset_lr_multiplier", "a positive number", config.offset_lr_multiplier)
  for key in ("frozen_parameters", "late_frozen_parameters"):
    require(isinstance(config[key], (tuple, list)) and all(
        isinstance(name, str) and name for name in config[key]), key,
            'a tuple of parameter paths such as "whiten/kernel"', config[key])
  require(is_number(config.late_freeze_epochs) and config.late_freeze_epochs >= 0,
          "late_freeze_epochs", "a non-negative number of epochs", config.late_freeze_epochs)
  require(config.late_freeze_schedule in LATE_FREEZE_SCHEDULES, "late_freeze_schedule",
          f"one of {LATE_FREEZE_SCHEDULES}", config.late_freeze_schedule)
  require(config.late_freeze_schedule == "main" or config.late_freeze_epochs > 0,
          "late_freeze_epochs", 'a positive number of epochs with late_freeze_schedule='
          '"linear_to_zero"', config.late_freeze_epochs)
  pairs = config.lr_multipliers
  require(isinstance(pairs, (tuple, list)) and all(
      isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
      and pair[0] and is_number(pair[1]) and pair[1] > 0 for pair in pairs), "lr_multipliers",
          'pairs of a parameter path and a positive multiplier, such as (("whiten/bias", 0.08),)',
          pairs)
  _validate_muon(config)
  require(is_number(config.airbench_output_scale) and config.airbench_output_scale > 0,
          "airbench_output_scale", "a positive number", config.airbench_output_scale)
  require(isinstance(config.airbench_head_unit_std, bool), "airbench_head_unit_std",
          "True or False", config.airbench_head_unit_std)
  require(config.airbench_activation in airbench.ACTIVATIONS, "airbench_activation",
          f"one of {tuple(airbench.ACTIVATIONS)}", config.airbench_activation)
  require(is_int(config.airbench_whitening_examples) and config.airbench_whitening_examples > 0,
          "airbench_whitening_examples", "a positive number of training images",
          config.airbench_whitening_examples)
  require(is_int(config.lookahead_every_steps) and config.lookahead_every_steps >= 0,
          "lookahead_every_steps", "0 (no lookahead) or a positive integer",
          config.lookahead_every_steps)
  require(is_number(config.lookahead_decay) and 0 <= config.lookahead_decay <= 1,
          "lookahead_decay", "a number in [0, 1]", config.lookahead_decay)
  require(is_number(config.lookahead_power) and config.lookahead_power >= 0,
          "lookahead_power", "a non-negative number", config.lookahead_power)


def _validate_muon(config) -> None:
  muon = config.muon
  require(isinstance(muon.parameters, (tuple, list)) and all(
      isinstance(name, str) and name for name in muon.parameters), "muon.parameters",
          'a tuple of parameter paths such as "group1"', muon.parameters)
  require(is_number(muon.learning_rate) and muon.learning_rate >= 0, "muon.learning_rate",
          "a non-negative number", muon.learning_rate)
  require(is_number(muon.momentum) and 0 <= muon.momentum < 1, "muon.momentum",
          "a number in [0, 1)", muon.momentum)
  require(isinstance(muon.nesterov, bool) and isinstance(muon.normalize_filters, bool),
          "muon.nesterov", "True or False (and so muon.normalize_filters)",
          (muon.nesterov, muon.normalize_filters))
  require(not muon.nesterov or muon.momentum > 0 or not muon.parameters, "muon.nesterov",
          "False when config.muon.momentum is 0 (Nesterov needs momentum)", muon.nesterov)
  require(is_int(muon.newton_schulz_steps) and muon.newton_schulz_steps > 0,
          "muon.newton_schulz_steps", "a positive integer", muon.newton_schulz_steps)
  coefficients = muon.newton_schulz_coefficients
  require(isinstance(coefficients, (tuple, list)) and len(coefficients) == 3
          and all(is_number(c) for c in coefficients), "muon.newton_schulz_coefficients",
          "three numbers (a, b, c) of x -> a x + b x^3 + c x^5", coefficients)
  require(is_number(muon.weight_decay) and muon.weight_decay >= 0, "muon.weight_decay",
          "a non-negative number", muon.weight_decay)
  require(is_int(muon.normalize_period) and muon.normalize_period >= 1,
          "muon.normalize_period", "a positive integer number of steps", muon.normalize_period)
  require(is_int(muon.normalize_period_growth) and muon.normalize_period_growth >= 0,
          "muon.normalize_period_growth", "a non-negative integer number of steps",
          muon.normalize_period_growth)


def check_parameter_paths(config, params) -> None:
  """Every path of `frozen_parameters`, `late_frozen_parameters`, `lr_multipliers` and
  `muon.parameters` names parameters of the model (`params`: its parameter tree, or its
  shapes), and Muon's name 4-D kernels that are not frozen."""
  leaves = [(optim.parameter_name(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)]
  names = [name for name, _ in leaves]
  patterns = {key: tuple(config[key]) for key in ("frozen_parameters", "late_frozen_parameters")}
  patterns["lr_multipliers"] = tuple(pattern for pattern, _ in config.lr_multipliers)
  patterns["muon.parameters"] = tuple(config.muon.parameters)
  for key, key_patterns in patterns.items():
    for pattern in key_patterns:
      require(any(optim.matches(name, (pattern,)) for name in names), key,
              f"paths of {config.model}'s parameters (such as {names[0]!r}); "
              f"{pattern!r} names none", key_patterns)
  frozen = patterns["frozen_parameters"] + patterns["late_frozen_parameters"]
  for pattern in patterns["muon.parameters"]:
    kernels = [name for name, leaf in leaves
               if optim.matches(name, (pattern,)) and len(leaf.shape) == 4]
    require(bool(kernels), "muon.parameters",
            f"paths with 4-D convolution kernels under them; {pattern!r} has none",
            patterns["muon.parameters"])
    for name in kernels:
      require(not optim.matches(name, frozen), "muon.parameters",
              f"kernels that are not also frozen; {name!r} is", patterns["muon.parameters"])


def check_batch_sizes(config, num_train_examples: int) -> None:
  """The batch must not be larger than the training set."""
  require(config.batch_size <= num_train_examples, "batch_size",
          f"at most the {num_train_examples} training examples", config.batch_size)
