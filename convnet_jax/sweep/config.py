"""A sweep config: its checks (a dry run of `sweep(trial)` before any training), its identity
and the check that a sweep folder holds this sweep.

A sweep config file (see `configs/sweep_lr.py`) holds, in its `get_config()`, the training config
every trial starts from (`base`), the sampler ("grid", "random" or "tpe") and its settings, and
defines a module-level function `sweep(trial)` that returns one trial's training-config values
from optuna's `trial.suggest_*` calls.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import optuna
import sqlalchemy
from optuna.distributions import (BaseDistribution, CategoricalDistribution,
                                  distribution_to_json)

from convnet_jax.runs import validation
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import UserError

SweepFunction = Callable[[optuna.Trial], Mapping[str, Any]]

SAMPLERS = ("grid", "random", "tpe")
METRIC_KEYS = ("test_acc", "test_loss", "train_acc", "train_loss")
DIRECTIONS = ("", "maximize", "minimize")
REQUIRED_KEYS = ("base", "sampler", "num_trials", "seed", "objective", "direction", "storage",
                 "study_name", "heartbeat_interval", "grace_period")
# Sweep keys that may change between runs of one sweep: how many trials to run and how workers
# watch each other, not what any trial computes (so a finished sweep can be extended).
OPERATIONAL_KEYS = ("num_trials", "heartbeat_interval", "grace_period", "storage_retry_seconds")
# Shared storage: how long workers retry a database that cannot be reached, where a sweep
# config does not say (`storage_retry_seconds`, see configs/sweep_lr.py).
DEFAULT_STORAGE_RETRY_SECONDS = 300
# Keys naming things on one machine: the workers of a shared study may differ in them.
MACHINE_KEYS = ("storage", "base.data.dir", "base.data.url", "base.data.tfds_data_dir",
                "base.data.tfds_manual_dir")
_require = functools.partial(validation.require, prefix="sweep")
_is_int = validation.is_int


def load_sweep_function(path: str | os.PathLike) -> SweepFunction:
  """The module-level `sweep(trial)` of the sweep config file at `path`."""
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  function = getattr(module, "sweep", None)
  if not callable(function):
    raise UserError(f"{path}: defines no function sweep(trial) returning the training-config "
                    f"values of a trial")
  return function


def direction(config) -> str:
  """`config.direction`, or when empty: maximize accuracies, minimize losses."""
  if config.direction:
    return config.direction
  return "maximize" if config.objective.endswith("_acc") else "minimize"


def trial_config(base: ml_collections.ConfigDict,
                 overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of the training config `base` with a trial's values set, each under its dotted key
  ("optim.learning_rate"); `UserError` for a key that is not in it (naming the new place of a
  key of the flat config of before the groups) or a value of the wrong type."""
  if not isinstance(overrides, Mapping):
    raise UserError(f"sweep(trial) returned {overrides!r}: expected a dict of training-config "
                    f"values")
  config = copy.deepcopy(base)
  config.lock()  # a misspelt key must fail, not add a key that training ignores
  for key, value in overrides.items():
    *groups, leaf = key.split(".")
    node = config
    for group in groups:
      node = node.get(group) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
        node[leaf], ml_collections.ConfigDict):
      moved = validation.MOVED_KEYS.get(key)
      hint = f"; it is now {moved!r}" if moved else ""
      raise UserError(f"sweep(trial) returned {key!r}, which is not a key of the training "
                      f"config{hint}")
    try:
      node[leaf] = value
    except TypeError as error:
      raise UserError(f"sweep(trial) returned {key}={value!r}: {error}") from None
  return config


def _validate_base(base) -> None:
  validation.check_no_moved_keys(base, prefix="sweep.base")
  try:
    validation.validate_config(base)
  except UserError as error:
    message = str(error)
    # Name the key as the command line does: --config.base.KEY.
    raise UserError("sweep.base." + message.removeprefix("config.")
                    if message.startswith("config.") else message) from None


def _dry_run_trials(config, sweep_fn: SweepFunction):
  """Calls the sweep function on an in-memory study: once per grid point, or once on a random
  sample. Yields each trial's params, distributions and training config."""
  if config.sampler == "grid":
    sampler = optuna.samplers.GridSampler(dict(config.grid), seed=config.seed)
    num_points = math.prod(len(values) for values in config.grid.values())
  else:
    sampler, num_points = optuna.samplers.RandomSampler(seed=config.seed), 1
  verbosity = optuna.logging.get_verbosity()
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" for a dry run
  try:
    study = optuna.create_study(sampler=sampler)
  finally:
    optuna.logging.set_verbosity(verbosity)
  for _ in range(num_points):
    trial = study.ask()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # out-of-range grid values are reported below instead
      try:
        overrides = sweep_fn(trial)
      except ValueError as error:
        if config.sampler == "grid" and "not found in the given grid" in str(error):
          raise UserError(f"sweep.grid={_plain(config.grid)!r}: expected values for every "
                          f"parameter sweep(trial) suggests ({error})") from None
        raise UserError(f"sweep(trial) raised ValueError: {error}") from None
      except Exception as error:
        raise UserError(f"sweep(trial) raised {type(error).__name__}: {error}") from None
    yield trial.params, trial.distributions, trial_config(config.base, overrides)


def _plain(value):
  """ConfigDict values as plain Python data, for messages and JSON."""
  return json.loads(ml_collections.ConfigDict({"v": value}).to_json_best_effort())["v"]


def _contains(distribution: BaseDistribution, value) -> bool:
  if isinstance(distribution, CategoricalDistribution):
    return value in distribution.choices
  return distribution.low <= value <= distribution.high


def validate_sweep_config(config, sweep_fn: SweepFunction) -> dict[str, BaseDistribution]:
  """Checks the sweep config and its sweep function before any training; raises `UserError`
  naming the first bad key. Returns the search space: each suggested parameter's distribution,
  in the order sweep(trial) suggests them."""
  for key in REQUIRED_KEYS + (("grid",) if config.get("sampler") == "grid" else ()):
    if key not in config:
      raise UserError(f"sweep.{key}: missing; expected it in the sweep config (see "
                      f"configs/sweep_lr.py)")
  _require(config.sampler in SAMPLERS, "sampler", f"one of {SAMPLERS}", config.sampler)
  _require(_is_int(config.num_trials) and config.num_trials > 0, "num_trials",
           "a positive integer", config.num_trials)
  _require(config.objective in METRIC_KEYS, "objective", f"one of the final metrics {METRIC_KEYS}",
           config.objective)
  _require(config.direction in DIRECTIONS, "direction",
           "'maximize', 'minimize' or '' (maximize accuracies, minimize losses)", config.direction)
  _require(_is_int(config.seed), "seed", "an integer", config.seed)
  _require(isinstance(config.study_name, str) and config.study_name.strip(), "study_name",
           "a non-empty name", config.study_name)
  for key in ("heartbeat_interval", "grace_period"):
    _require(_is_int(config[key]) and config[key] > 0, key, "a positive number of seconds",
             config[key])
  _validate_storage(config)
  _validate_base(config.base)
  if config.sampler == "grid":
    _require(isinstance(config.grid, ml_collections.ConfigDict) and len(config.grid) > 0, "grid",
             "a search space: parameter names mapped to lists of values", _plain(config.grid))
    for name, values in config.grid.items():
      _require(isinstance(values, (tuple, list)) and len(values) > 0, f"grid.{name}",
               "a non-empty list or tuple of values", _plain(values))

  space: dict[str, BaseDistribution] = {}
  for params, distributions, training_config in _dry_run_trials(config, sweep_fn):
    if config.sampler == "grid":
      # The grid and the function must name the same parameters, within the function's ranges,
      # or the grid would silently sweep something else than the plot and table say.
      for name in config.grid:
        _require(name in params, f"grid.{name}",
                 f"a parameter that sweep(trial) suggests (it suggests {sorted(params)})",
                 _plain(config.grid[name]))
      for name, value in params.items():
        _require(_contains(distributions[name], value), f"grid.{name}",
                 f"values within sweep(trial)'s {distributions[name]}", _plain(config.grid[name]))
    try:
      validation.validate_config(training_config)
    except UserError as error:
      where = "sweep.grid point" if config.sampler == "grid" else "sweep(trial) sample"
      raise UserError(f"{where} {params}: {error}") from None
    space.update({name: distributions[name] for name in params if name not in space})
  if not space:
    raise UserError("sweep(trial) suggests no parameter: expected at least one "
                    "trial.suggest_float/int/categorical call")
  if config.sampler == "grid":
    num_points = math.prod(len(values) for values in config.grid.values())
    _require(config.num_trials <= num_points, "num_trials",
             f"at most the number of points of sweep.grid, {num_points}", config.num_trials)
  return space


def _validate_storage(config) -> None:
  """The database keys: a usable URL whose driver is installed, and the retry time."""
  retry = storage_retry_seconds(config)
  _require(validation.is_number(retry) and retry >= 0, "storage_retry_seconds",
           "a number of seconds, 0 or more", retry)
  if not config.storage:
    return
  try:
    url = sqlalchemy.engine.make_url(database_url(config.storage))
  except sqlalchemy.exc.ArgumentError:
    _require(False, "storage", "'' (DIR/sweep.db) or a database URL such as "
             "postgresql://user@host/db or sqlite:////path/sweep.db", config.storage)
  try:
    url.get_dialect().import_dbapi()
  except (ImportError, sqlalchemy.exc.NoSuchModuleError) as error:
    _require(False, "storage", f"a database whose Python driver is installed ({error}; "
             f"for PostgreSQL: pip install 'convnet_jax[postgres]')",
             url.render_as_string(hide_password=True))


def storage_retry_seconds(config) -> float:
  """How long a worker retries a shared database that cannot be reached."""
  return config.get("storage_retry_seconds", DEFAULT_STORAGE_RETRY_SECONDS)


def database_url(url: str) -> str:
  """The SQLAlchemy URL of a sweep storage. A plain "postgresql://" names SQLAlchemy's default
  driver, psycopg2; where that is missing and psycopg (3, the `[postgres]` extra) is installed,
  psycopg is used, so the URL a user would write works as written."""
  parsed = sqlalchemy.engine.make_url(url)
  if (parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None
      and importlib.util.find_spec("psycopg") is not None):
    parsed = parsed.set(drivername="postgresql+psycopg")
  return parsed.render_as_string(hide_password=False)


def sweep_identity(config, space: Mapping[str, BaseDistribution]) -> dict:
  """What a sweep computes, as JSON data: the sweep config (the storage URL without password)
  and its search space. Saved as DIR/sweep.json; a DIR is resumed only by the same identity."""
  values = json.loads(config.to_json_best_effort())
  if values["storage"]:
    values["storage"] = sqlalchemy.engine.make_url(values["storage"]).render_as_string(
        hide_password=True)
  values["search_space"] = {name: json.loads(distribution_to_json(distribution))
                            for name, distribution in space.items()}
  return values


def compared(identity: Mapping, ignored=()) -> dict:
  """The flattened identity without the keys that may differ between runs of one sweep."""
  ignored = (set(OPERATIONAL_KEYS) | {f"base.{group}" for group in validation.OPERATION_GROUPS}
             | set(ignored))
  return {key: value for key, value in workdir_lib.flatten(identity, keep=("search_space",)).items()
          if key not in ignored and not any(key.startswith(f"{name}.") for name in ignored)}


def check_sweep_dir(workdir: Path, identity: dict) -> bool:
  """Checks DIR before anything is written: True if it holds this sweep (to resume), False if
  it is new or empty; `UserError` if it holds anything else, so nothing is overwritten."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir}: exists and is not a folder")
  saved_path = workdir / "sweep.json"
  if not saved_path.exists():
    if workdir.exists() and any(workdir.iterdir()):
      raise UserError(f"--workdir {workdir}: holds files but no sweep.json; not a sweep folder. "
                      f"Choose a new workdir so nothing is overwritten")
    return False
  try:
    saved = json.loads(saved_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{saved_path}: not valid JSON ({error}); corrupt sweep folder") from None
  if isinstance(saved, dict) and isinstance(saved.get("base"), dict):
    saved["base"] = workdir_lib.upgraded(saved["base"])
  if not isinstance(saved, dict) or compared(saved) != compared(identity):
    details = workdir_lib.differences(compared(identity),
                                      compared(saved if isinstance(saved, dict) else {}))
    raise UserError(f"--workdir {workdir}: holds a sweep of another sweep config ({details}); "
                    f"use a new workdir or the same config to resume")
  return True
