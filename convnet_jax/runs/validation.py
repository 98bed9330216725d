"""Checks of user input that run before any data loading or compilation.

Each failure raises `UserError` (or `input_pipeline.DataError`, a subclass of it) with one line
that names the config key (its full dotted name) or file and what was expected; `main` prints it
and exits with 2. Each group of the config is checked by a function of its own.
"""

from __future__ import annotations

import difflib
import math
from typing import Sequence

import jax
import ml_collections

from convnet_jax import models
from convnet_jax import optim
from convnet_jax import steps as steps_lib
from convnet_jax.data import input_pipeline
from convnet_jax.data import tta
from convnet_jax.errors import UserError
from convnet_jax.models import airbench
from convnet_jax.ops import conv

MODELS = tuple(models.MODELS)
SCHEDULES = ("linear", "step", "cosine", "warmup_linear")
LOSS_REDUCTIONS = ("mean", "sum")
AUGMENT_PADDINGS = ("zeros", "reflect")
AUGMENT_FLIPS = ("random", "alternate", "none")
LATE_FREEZE_SCHEDULES = ("main", "linear_to_zero")
DATASETS = ("cifar10",)
DATA_SOURCES = ("binary", "tfds")
DTYPES = ("auto",) + tuple(conv.DTYPES)
CONV_IMPLEMENTATIONS = ("auto",) + tuple(conv.CONV_IMPLEMENTATIONS)
BATCH_NORM_IMPLEMENTATIONS = ("auto", "jax", "onednn")
# The config groups that say how a run is operated, not what it computes: a run is the config
# without them (`workdir.identity`), so a workdir may be resumed with other values in them.
OPERATION_GROUPS = ("operations", "benchmark")
# The keys of the flat config of before the groups, and where each is now. A saved workdir's
# config.json in the old form resumes (`workdir.upgraded`); an old key on the command line or
# set by a config file stops with one line naming its new place.
MOVED_KEYS = {
    "model": "model.name",
    "dtype": "model.dtype",
    "conv_implementation": "model.conv_implementation",
    "resnet_width": "model.resnet.width",
    "airbench_output_scale": "model.airbench.output_scale",
    "airbench_head_unit_std": "model.airbench.head_unit_std",
    "airbench_activation": "model.airbench.activation",
    "airbench_whitening_examples": "model.airbench.whitening_examples",
    "dataset": "data.dataset",
    "classes": "data.classes",
    "data_source": "data.source",
    "data_dir": "data.dir",
    "data_url": "data.url",
    "data_sha256": "data.sha256",
    "tfds_data_dir": "data.tfds_data_dir",
    "tfds_manual_dir": "data.tfds_manual_dir",
    "max_train_examples": "data.max_train_examples",
    "max_test_examples": "data.max_test_examples",
    "drop_last_batch": "data.drop_last_batch",
    "eval_batch_size": "eval.batch_size",
    "test_time_augmentation": "eval.test_time_augmentation",
    "augment": "augment.enabled",
    "augment_translate": "augment.translate",
    "augment_padding": "augment.padding",
    "augment_flip": "augment.flip",
    "augment_brightness": "augment.brightness",
    "augment_contrast": "augment.contrast",
    "label_smoothing": "optim.label_smoothing",
    "loss_reduction": "optim.loss_reduction",
    "learning_rate": "optim.learning_rate",
    "momentum": "optim.momentum",
    "nesterov": "optim.nesterov",
    "weight_decay": "optim.weight_decay",
    "decoupled_hyperparameters": "optim.decoupled_hyperparameters",
    "offset_lr_multiplier": "optim.offset_lr_multiplier",
    "lr_multipliers": "optim.lr_multipliers",
    "schedule": "schedule.name",
    "lr_boundaries_epochs": "schedule.boundaries_epochs",
    "lr_decay_factor": "schedule.decay_factor",
    "warmup_fraction": "schedule.warmup_fraction",
    "warmup_start_factor": "schedule.warmup_start_factor",
    "final_lr_factor": "schedule.final_lr_factor",
    "frozen_parameters": "freeze.parameters",
    "late_frozen_parameters": "freeze.late_parameters",
    "late_freeze_epochs": "freeze.late_epochs",
    "late_freeze_schedule": "freeze.late_schedule",
    "lookahead_every_steps": "lookahead.every_steps",
    "lookahead_decay": "lookahead.decay",
    "lookahead_power": "lookahead.power",
    "num_replicas": "replicas.count",
    "replica_seeds": "replicas.seeds",
    "replica_learning_rates": "replicas.learning_rates",
    "replica_momenta": "replicas.momenta",
}


def require(condition: bool, key: str, expected: str, value, prefix: str = "config") -> None:
  """Raises `UserError` "PREFIX.KEY=VALUE: expected EXPECTED" unless `condition`."""
  if not condition:
    raise UserError(f"{prefix}.{key}={value!r}: expected {expected}")


def is_int(value) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def moved_key(key: str, prefix: str = "config") -> str | None:
  """"config.augment_flip is now config.augment.flip" for a key of the flat config of before
  the groups (`MOVED_KEYS`), else None."""
  if key not in MOVED_KEYS:
    return None
  return f"{prefix}.{key} is now {prefix}.{MOVED_KEYS[key]}"


def check_no_moved_keys(config, prefix: str = "config") -> None:
  """A config (a config file's, a sweep's base) that sets a key of the flat config of before
  the groups: `UserError` naming its new place, rather than a key training would ignore."""
  for key in config.keys():
    if key in MOVED_KEYS and not isinstance(config[key], ml_collections.ConfigDict):
      raise UserError(moved_key(key, prefix))


CONFIG_FLAG = "--config."


def _flag_keys(argv: Sequence[str]):
  """The dotted KEY of each `--config.KEY=VALUE` of argv."""
  for arg in argv:
    if arg.startswith(CONFIG_FLAG):
      yield arg[len(CONFIG_FLAG):].split("=", 1)[0]


def moved_config_flag(config, argv: Sequence[str]) -> str | None:
  """The one-line message for the first `--config.KEY=VALUE` of argv whose KEY is a key of the
  flat config of before the groups (also `--config.base.KEY` of a sweep config): its new
  place; None when there is none."""
  for dotted in _flag_keys(argv):
    parts = dotted.split(".")
    prefix, target = ["config"], config
    if len(parts) == 2 and parts[0] == "base" and isinstance(config.get("base"),
                                                              ml_collections.ConfigDict):
      prefix, target, parts = ["config", "base"], config.base, parts[1:]
    # Only where today's group of the key exists: a sweep's own keys are not training keys.
    if len(parts) == 1 and parts[0] in MOVED_KEYS and MOVED_KEYS[parts[0]].split(".")[0] in target:
      return moved_key(parts[0], ".".join(prefix))
  return None


def unknown_config_key(config, argv: Sequence[str]) -> str | None:
  """A one-line message for the first `--config.KEY=VALUE` of argv whose KEY is not in
  `config`, naming the closest valid keys; None when every key exists."""
  for dotted in _flag_keys(argv):
    node, walked = config, []
    for part in dotted.split("."):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in keys:
        prefix = ".".join(walked + [""])
        close = _close_keys(node, part) if isinstance(node, ml_collections.ConfigDict) else []
        hint = ("did you mean " + " or ".join(prefix + key for key in close) + "?" if close
                else f"the keys{' of ' + prefix[:-1] if walked else ''} are listed in the config "
                     f"file")
        return f"--config.{dotted}: no such config key; {hint}"
      node, walked = node[part], walked + [part]
  return None


def _close_keys(node, name: str, limit: int = 3) -> list[str]:
  """The dotted keys under `node` (its own and its groups') whose last part is closest to
  `name`: a key mistyped, or named without its group ("learning_rate" for
  "optim.learning_rate")."""
  def dotted_keys(group, prefix=""):
    for key, value in group.items():
      yield prefix + key
      if isinstance(value, ml_collections.ConfigDict):
        yield from dotted_keys(value, f"{prefix}{key}.")

  keys = list(dotted_keys(node))
  leaves = sorted({key.rsplit(".", 1)[-1] for key in keys})
  close = difflib.get_close_matches(name, leaves, n=limit, cutoff=0.6)
  found = [key for leaf in close for key in keys if key.rsplit(".", 1)[-1] == leaf]
  return found[:limit]


def validate_config(config) -> None:
  """Raises `UserError` naming the first config key whose value is not usable."""
  check_no_moved_keys(config)
  require(is_int(config.seed), "seed", "an integer", config.seed)
  require(is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
          "a positive number (a fraction trains part of one more epoch)", config.num_epochs)
  require(is_int(config.batch_size) and config.batch_size > 0, "batch_size",
          "a positive integer", config.batch_size)
  _validate_model(config.model)
  _validate_data(config.data)
  _validate_augment(config.augment)
  _validate_optim(config.optim)
  _validate_schedule(config.schedule, config.num_epochs)
  _validate_muon(config.muon)
  _validate_lookahead(config.lookahead)
  _validate_freeze(config.freeze)
  _validate_select(config.select, config.model.name)
  _validate_replicas(config.replicas, config.optim)
  _validate_eval(config.eval)
  _validate_operations(config.operations)
  if "benchmark" in config:
    _validate_benchmark(config.benchmark)


def _validate_model(model) -> None:
  require(model.name in MODELS, "model.name", f"one of {MODELS}", model.name)
  require(model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", model.dtype)
  require(model.conv_implementation in CONV_IMPLEMENTATIONS, "model.conv_implementation",
          f"one of {CONV_IMPLEMENTATIONS}", model.conv_implementation)
  try:
    conv.check_conv_implementation(model.conv_implementation)
  except conv.ConvUnavailable as error:
    raise error.naming_the_key(model.conv_implementation, "; use 'auto' (which falls back to "
                               "'im2col' here) or 'im2col'") from None
  require(model.batch_norm_implementation in BATCH_NORM_IMPLEMENTATIONS,
          "model.batch_norm_implementation", f"one of {BATCH_NORM_IMPLEMENTATIONS}",
          model.batch_norm_implementation)
  if model.batch_norm_implementation == "onednn":
    try:
      conv.check_conv_implementation("onednn")
    except conv.ConvUnavailable as error:
      raise UserError(f"config.model.batch_norm_implementation='onednn': {error}; use 'auto' or "
                      f"'jax'") from None
  require(is_int(model.resnet.width) and model.resnet.width > 0, "model.resnet.width",
          "a positive integer", model.resnet.width)
  options = model.airbench
  _validate_airbench_groups(options.widths, options.convs_per_group, "model.airbench.widths",
                            "model.airbench.convs_per_group")
  require(is_number(options.output_scale) and options.output_scale > 0,
          "model.airbench.output_scale", "a positive number", options.output_scale)
  require(isinstance(options.head_unit_std, bool), "model.airbench.head_unit_std",
          "True or False", options.head_unit_std)
  require(options.activation in airbench.ACTIVATIONS, "model.airbench.activation",
          f"one of {tuple(airbench.ACTIVATIONS)}", options.activation)
  require(is_int(options.whitening_examples) and options.whitening_examples > 0,
          "model.airbench.whitening_examples", "a positive number of training images",
          options.whitening_examples)


def _validate_airbench_groups(widths, convs_per_group, widths_key: str, convs_key: str) -> None:
  """An airbench network's conv groups: the model's, or the data selection's proxy."""
  require(isinstance(widths, (tuple, list)) and len(widths) == 3
          and all(is_int(w) and w > 0 for w in widths), widths_key,
          "three positive integers, the output channels of the conv groups", widths)
  require(convs_per_group in (2, 3), convs_key,
          "2 (airbench94's groups) or 3 (airbench96's, with a residual over the last two)",
          convs_per_group)


def _validate_select(select, model_name: str) -> None:
  require(is_number(select.keep_fraction) and 0 < select.keep_fraction <= 1,
          "select.keep_fraction", "a number in (0, 1] (1: no data selection)",
          select.keep_fraction)
  if select.keep_fraction == 1:
    return  # no proxy: its keys are not used
  require(model_name == "airbench94", "select.keep_fraction",
          f"1 with config.model.name={model_name!r} (the proxy is an airbench network: data "
          f"selection is for model.name='airbench94')", select.keep_fraction)
  _validate_airbench_groups(select.proxy_widths, select.proxy_convs_per_group,
                            "select.proxy_widths", "select.proxy_convs_per_group")
  require(is_int(select.proxy_update_every) and select.proxy_update_every > 0,
          "select.proxy_update_every", "a positive number of steps", select.proxy_update_every)


def _validate_data(data) -> None:
  require(data.dataset in DATASETS, "data.dataset", f"one of {DATASETS}", data.dataset)
  classes = data.classes
  require(isinstance(classes, (tuple, list)) and len(classes) >= 2, "data.classes",
          "a tuple of at least two CIFAR-10 class ids", classes)
  for class_id in classes:
    require(is_int(class_id) and 0 <= class_id < input_pipeline.NUM_CIFAR10_CLASSES,
            "data.classes", "class ids between 0 and 9", classes)
  require(len(set(classes)) == len(classes), "data.classes", "no repeated class id", classes)
  for key in ("max_train_examples", "max_test_examples"):
    require(is_int(data[key]) and data[key] >= 0, f"data.{key}",
            "0 (all) or a positive integer", data[key])
  require(isinstance(data.drop_last_batch, bool), "data.drop_last_batch", "True or False",
          data.drop_last_batch)
  require(data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}", data.source)
  if data.source == "binary" and data.dir:
    input_pipeline.check_binary_files(data.dir)


def _validate_augment(augment) -> None:
  require(isinstance(augment.enabled, bool), "augment.enabled", "True or False",
          augment.enabled)
  require(is_int(augment.translate) and 0 <= augment.translate <= 16, "augment.translate",
          "an integer number of pixels in [0, 16]", augment.translate)
  require(augment.padding in AUGMENT_PADDINGS, "augment.padding",
          f"one of {AUGMENT_PADDINGS}", augment.padding)
  require(augment.flip in AUGMENT_FLIPS, "augment.flip", f"one of {AUGMENT_FLIPS}",
          augment.flip)
  for key in ("brightness", "contrast"):
    require(is_number(augment[key]) and 0 <= augment[key] < 1, f"augment.{key}",
            "a number in [0, 1)", augment[key])
  require(is_int(augment.cutout) and 0 <= augment.cutout <= input_pipeline.IMAGE_SHAPE[0],
          "augment.cutout", f"0 (none) or a square's side in pixels, at most "
          f"{input_pipeline.IMAGE_SHAPE[0]}", augment.cutout)


def _validate_optim(optim_config) -> None:
  require(is_number(optim_config.label_smoothing) and 0 <= optim_config.label_smoothing < 1,
          "optim.label_smoothing", "a number in [0, 1)", optim_config.label_smoothing)
  require(optim_config.loss_reduction in LOSS_REDUCTIONS, "optim.loss_reduction",
          f"one of {LOSS_REDUCTIONS}", optim_config.loss_reduction)
  require(is_number(optim_config.learning_rate) and optim_config.learning_rate >= 0,
          "optim.learning_rate", "a non-negative number", optim_config.learning_rate)
  require(is_number(optim_config.momentum) and 0 <= optim_config.momentum < 1,
          "optim.momentum", "a number in [0, 1)", optim_config.momentum)
  require(isinstance(optim_config.nesterov, bool), "optim.nesterov", "True or False",
          optim_config.nesterov)
  # PyTorch refuses Nesterov without momentum too: it would silently be plain SGD.
  require(not optim_config.nesterov or optim_config.momentum > 0, "optim.nesterov",
          "False when config.optim.momentum is 0 (Nesterov needs momentum)",
          optim_config.nesterov)
  require(is_number(optim_config.weight_decay) and optim_config.weight_decay >= 0,
          "optim.weight_decay", "a non-negative number", optim_config.weight_decay)
  require(isinstance(optim_config.decoupled_hyperparameters, bool),
          "optim.decoupled_hyperparameters", "True or False",
          optim_config.decoupled_hyperparameters)
  # The decoupled weight decay is weight_decay * batch_size / learning_rate.
  require(not optim_config.decoupled_hyperparameters or optim_config.learning_rate > 0,
          "optim.learning_rate", "a positive number with config.optim.decoupled_hyperparameters",
          optim_config.learning_rate)
  require(is_number(optim_config.offset_lr_multiplier) and optim_config.offset_lr_multiplier > 0,
          "optim.offset_lr_multiplier", "a positive number", optim_config.offset_lr_multiplier)
  pairs = optim_config.lr_multipliers
  require(isinstance(pairs, (tuple, list)) and all(
      isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
      and pair[0] and is_number(pair[1]) and pair[1] > 0 for pair in pairs),
          "optim.lr_multipliers", 'pairs of a parameter path and a positive multiplier, such '
          'as (("whiten/bias", 0.08),)', pairs)


def _validate_schedule(schedule, num_epochs) -> None:
  require(schedule.name in SCHEDULES, "schedule.name", f"one of {SCHEDULES}", schedule.name)
  if schedule.name == "warmup_linear":
    require(is_number(schedule.warmup_fraction) and 0 <= schedule.warmup_fraction < 1,
            "schedule.warmup_fraction", "a number in [0, 1)", schedule.warmup_fraction)
    for key in ("warmup_start_factor", "final_lr_factor"):
      require(is_number(schedule[key]) and schedule[key] >= 0, f"schedule.{key}",
              "a non-negative number", schedule[key])
  if schedule.name != "step":
    return  # the boundaries and factor are not used
  boundaries = schedule.boundaries_epochs
  require(isinstance(boundaries, (tuple, list)) and all(is_int(b) for b in boundaries),
          "schedule.boundaries_epochs", "a tuple of integer epochs", boundaries)
  require(all(0 < b < num_epochs for b in boundaries), "schedule.boundaries_epochs",
          f"epochs between 1 and num_epochs - 1 = {math.ceil(num_epochs) - 1}", boundaries)
  require(all(a < b for a, b in zip(boundaries, boundaries[1:])), "schedule.boundaries_epochs",
          "strictly increasing epochs", boundaries)
  require(is_number(schedule.decay_factor) and 0 < schedule.decay_factor <= 1,
          "schedule.decay_factor", "a number in (0, 1]", schedule.decay_factor)


def _validate_lookahead(lookahead) -> None:
  require(is_int(lookahead.every_steps) and lookahead.every_steps >= 0,
          "lookahead.every_steps", "0 (no lookahead) or a positive integer",
          lookahead.every_steps)
  require(is_number(lookahead.decay) and 0 <= lookahead.decay <= 1, "lookahead.decay",
          "a number in [0, 1]", lookahead.decay)
  require(is_number(lookahead.power) and lookahead.power >= 0, "lookahead.power",
          "a non-negative number", lookahead.power)


def _validate_freeze(freeze) -> None:
  for key in ("parameters", "late_parameters"):
    require(isinstance(freeze[key], (tuple, list)) and all(
        isinstance(name, str) and name for name in freeze[key]), f"freeze.{key}",
            'a tuple of parameter paths such as "whiten/kernel"', freeze[key])
  require(is_number(freeze.late_epochs) and freeze.late_epochs >= 0, "freeze.late_epochs",
          "a non-negative number of epochs", freeze.late_epochs)
  require(freeze.late_schedule in LATE_FREEZE_SCHEDULES, "freeze.late_schedule",
          f"one of {LATE_FREEZE_SCHEDULES}", freeze.late_schedule)
  require(freeze.late_schedule == "main" or freeze.late_epochs > 0, "freeze.late_epochs",
          'a positive number of epochs with freeze.late_schedule="linear_to_zero"',
          freeze.late_epochs)


def _validate_eval(eval_config) -> None:
  require(is_int(eval_config.batch_size) and eval_config.batch_size > 0, "eval.batch_size",
          "a positive integer", eval_config.batch_size)
  require(eval_config.test_time_augmentation in tta.LEVELS, "eval.test_time_augmentation",
          f"one of {tta.LEVELS}", eval_config.test_time_augmentation)
  require(eval_config.batch_norm_statistics in steps_lib.BATCH_NORM_STATISTICS,
          "eval.batch_norm_statistics", f"one of {steps_lib.BATCH_NORM_STATISTICS}",
          eval_config.batch_norm_statistics)


def _validate_replicas(replicas, optim_config) -> None:
  count = replicas.count
  require(is_int(count) and count > 0, "replicas.count", "a positive integer", count)
  for key, check, expected in (
      ("seeds", is_int, "integer seeds"),
      ("learning_rates", lambda v: is_number(v) and v >= 0, "non-negative numbers"),
      ("momenta", lambda v: is_number(v) and 0 <= v < 1, "numbers in [0, 1)")):
    values = replicas[key]
    require(isinstance(values, (tuple, list)) and (not values or len(values) == count),
            f"replicas.{key}", f"() or a tuple of replicas.count={count} values", values)
    require(all(check(v) for v in values), f"replicas.{key}", expected, values)
  require(not optim_config.nesterov or all(m > 0 for m in replicas.momenta), "optim.nesterov",
          "False when a replica's momentum is 0 (Nesterov needs momentum)",
          optim_config.nesterov)


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
  for key, size in (("batch_size", config.batch_size),
                    ("eval.batch_size", config.eval.batch_size)):
    require(size % count == 0, key,
            f"a multiple of the {count} data-parallel devices (config.operations.num_devices, "
            f"0: all jax.device_count())", size)


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


def _validate_muon(muon) -> None:
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
  """Every path of `freeze.parameters`, `freeze.late_parameters`, `optim.lr_multipliers` and
  `muon.parameters` names parameters of the model (`params`: its parameter tree, or its
  shapes), and Muon's name 4-D kernels that are not frozen."""
  leaves = [(optim.parameter_name(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)]
  names = [name for name, _ in leaves]
  patterns = {"freeze.parameters": tuple(config.freeze.parameters),
              "freeze.late_parameters": tuple(config.freeze.late_parameters),
              "optim.lr_multipliers": tuple(pattern for pattern, _ in config.optim.lr_multipliers),
              "muon.parameters": tuple(config.muon.parameters)}
  for key, key_patterns in patterns.items():
    for pattern in key_patterns:
      require(any(optim.matches(name, (pattern,)) for name in names), key,
              f"paths of {config.model.name}'s parameters (such as {names[0]!r}); "
              f"{pattern!r} names none", key_patterns)
  frozen = patterns["freeze.parameters"] + patterns["freeze.late_parameters"]
  for pattern in patterns["muon.parameters"]:
    kernels = [name for name, leaf in leaves
               if optim.matches(name, (pattern,)) and len(leaf.shape) == 4]
    require(bool(kernels), "muon.parameters",
            f"paths with 4-D convolution kernels under them; {pattern!r} has none",
            patterns["muon.parameters"])
    for name in kernels:
      require(not optim.matches(name, frozen), "muon.parameters",
              f"kernels that are not also frozen; {name!r} is", patterns["muon.parameters"])


def check_batch_sizes(config, num_train_examples: int, num_test_examples: int) -> None:
  """Neither batch may be larger than its set (the evaluation's batches are the test set's
  slices, and BatchNorm normalises each with its own statistics)."""
  require(config.batch_size <= num_train_examples, "batch_size",
          f"at most the {num_train_examples} training examples", config.batch_size)
  require(config.eval.batch_size <= num_test_examples, "eval.batch_size",
          f"at most the {num_test_examples} test examples", config.eval.batch_size)
