"""Hyperparameter sweeps: `python -m convnet_jax.sweep --config configs/sweep_lr.py --workdir DIR`.

A sweep config file (see `configs/sweep_lr.py`) holds, in its `get_config()`, the training config
every trial starts from (`base`), the sampler ("grid", "random" or "tpe") and its settings, and
defines a module-level function `sweep(trial)` that returns one trial's training-config values
from optuna's `trial.suggest_*` calls. optuna runs the trials, each one call of
`train.train_and_evaluate` in its own workdir `DIR/trials/NNNN`, and keeps the study in a
database: by default the SQLite file `DIR/sweep.db` (run the same command again to resume), or
any SQLAlchemy URL in `storage`, which lets several machines work on one sweep. After every
trial `DIR/trials.md` and `DIR/trials.csv` (the trials, best first) and `DIR/objective.png` (the
objective against each swept value) are rewritten.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import importlib.util
import io
import json
import math
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import optuna
import sqlalchemy
from absl import app
from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags
from optuna.distributions import (BaseDistribution, CategoricalDistribution,
                                  distribution_to_json)
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from convnet_jax import cli
from convnet_jax import train
from convnet_jax import validation
from convnet_jax.errors import UserError

SweepFunction = Callable[[optuna.Trial], Mapping[str, Any]]

SAMPLERS = ("grid", "random", "tpe")
METRIC_KEYS = ("test_acc", "test_loss", "train_acc", "train_loss")
DIRECTIONS = ("", "maximize", "minimize")
REQUIRED_KEYS = ("base", "sampler", "num_trials", "seed", "objective", "direction", "storage",
                 "study_name", "heartbeat_interval", "grace_period")
# Sweep keys that may change between runs of one sweep: how many trials to run and how workers
# watch each other, not what any trial computes (so a finished sweep can be extended).
OPERATIONAL_KEYS = ("num_trials", "heartbeat_interval", "grace_period")
# Keys naming things on one machine: the workers of a shared study may differ in them.
MACHINE_KEYS = ("storage", "base.data_dir", "base.data_url", "base.tfds_data_dir",
                "base.tfds_manual_dir")
# A trial whose worker stops sending heartbeats (shared storage) is re-run at most this often.
MAX_RETRIES = 3


def _require(condition: bool, key: str, expected: str, value) -> None:
  if not condition:
    raise UserError(f"sweep.{key}={value!r}: expected {expected}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


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
  """A copy of the training config `base` with a trial's values set; `UserError` for a key that
  is not in it or a value of the wrong type."""
  if not isinstance(overrides, Mapping):
    raise UserError(f"sweep(trial) returned {overrides!r}: expected a dict of training-config "
                    f"values")
  config = copy.deepcopy(base)
  config.lock()  # a misspelt key must fail, not add a key that training ignores
  for key, value in overrides.items():
    if key not in config:
      raise UserError(f"sweep(trial) returned {key!r}, which is not a key of the training config")
    try:
      config[key] = value
    except TypeError as error:
      raise UserError(f"sweep(trial) returned {key}={value!r}: {error}") from None
  return config


def _validate_base(base) -> None:
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
  if config.storage:
    try:
      sqlalchemy.engine.make_url(config.storage)
    except sqlalchemy.exc.ArgumentError:
      _require(False, "storage", "'' (DIR/sweep.db) or a database URL such as "
               "postgresql://user@host/db or sqlite:////path/sweep.db", config.storage)
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


def _flatten(values: Mapping, prefix: str = "") -> dict:
  flat = {}
  for key, value in values.items():
    if isinstance(value, Mapping) and key != "search_space":
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _compared(identity: Mapping, ignored=()) -> dict:
  """The flattened identity without the keys that may differ between runs of one sweep."""
  ignored = set(OPERATIONAL_KEYS) | {f"base.{key}" for key in validation.PRESENTATION_KEYS} | set(
      ignored)
  return {key: value for key, value in _flatten(identity).items()
          if key not in ignored and not any(key.startswith(f"{name}.") for name in ignored)}


def _differences(here: Mapping, there: Mapping) -> str:
  differing = sorted(key for key in set(here) | set(there) if here.get(key) != there.get(key))
  return ", ".join(f"{key}: {here.get(key)!r} here, {there.get(key)!r} there"
                   for key in differing[:3]) + (", ..." if len(differing) > 3 else "")


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
  if not isinstance(saved, dict) or _compared(saved) != _compared(identity):
    details = _differences(_compared(identity), _compared(saved if isinstance(saved, dict) else {}))
    raise UserError(f"--workdir {workdir}: holds a sweep of another sweep config ({details}); "
                    f"use a new workdir or the same config to resume")
  return True


class _SeedPerTrial(optuna.samplers.BaseSampler):
  """Samples each trial with a fresh `make_sampler(seed + trial number)`.

  optuna's samplers draw from one random stream per process, which restarts with the process:
  a resumed random sweep would repeat its first trials' values. Seeding by trial number makes a
  trial's values depend only on the seed, its number and (TPE) the trials before it, whichever
  process or machine runs it.
  """

  def __init__(self, make_sampler: Callable[[int], optuna.samplers.BaseSampler], seed: int):
    self._make_sampler = make_sampler
    self._seed = seed
    self._sampler = make_sampler(seed)

  def before_trial(self, study, trial):
    self._sampler = self._make_sampler(self._seed + trial.number)
    self._sampler.before_trial(study, trial)

  def infer_relative_search_space(self, study, trial):
    return self._sampler.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._sampler.sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._sampler.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study, trial, state, values):
    self._sampler.after_trial(study, trial, state, values)


def create_sampler(config) -> optuna.samplers.BaseSampler:
  """The configured sampler, deterministic given `config.seed`."""
  if config.sampler == "grid":
    # GridSampler shuffles the grid with the seed and gives trial n the n-th point.
    return optuna.samplers.GridSampler(dict(config.grid), seed=config.seed)
  if config.sampler == "random":
    return _SeedPerTrial(lambda seed: optuna.samplers.RandomSampler(seed=seed), config.seed)
  return _SeedPerTrial(lambda seed: optuna.samplers.TPESampler(seed=seed), config.seed)


def _retried_numbers(trials) -> set[int]:
  """Numbers of the trials that were interrupted and re-run as a later trial (their copies carry
  the original numbers in the "retry_history" that RetryHeartbeatStaleTrialCallback writes)."""
  return {number for trial in trials for number in trial.system_attrs.get("retry_history", ())}


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry=None) -> None:
  """Queues a copy of an interrupted trial: same values, same workdir (so training resumes from
  its last checkpoint), same grid point."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def trials_left(study: optuna.Study, num_trials: int) -> int:
  """Trials still to start: the queued (re-run) ones, and new ones up to `num_trials` trials in
  all. Counts every worker's trials, running ones included, across restarts."""
  trials = study.get_trials(deepcopy=False)
  retried = _retried_numbers(trials)
  counted = sum(1 for trial in trials if trial.number not in retried)
  waiting = sum(1 for trial in trials if trial.state == TrialState.WAITING)
  return waiting + max(0, num_trials - counted)


def open_study(config, workdir: Path, identity: dict) -> optuna.Study:
  """Creates or loads the study. Default storage: DIR/sweep.db, used by this process only (a
  lock file makes sure), so trials it finds RUNNING were left by a killed run and are queued
  again. Any other storage may be shared: there optuna's heartbeat tells dead workers' trials
  (no heartbeat for `grace_period` s) from live ones, and queues only the dead ones again."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if config.storage:
      storage = optuna.storages.RDBStorage(
          config.storage, heartbeat_interval=config.heartbeat_interval,
          grace_period=config.grace_period,
          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
    else:
      storage = optuna.storages.RDBStorage(f"sqlite:///{(workdir / 'sweep.db').resolve()}")
    study = optuna.create_study(storage=storage, study_name=config.study_name,
                                direction=direction(config), sampler=create_sampler(config),
                                load_if_exists=True)
  # Several machines on one study must run the same sweep; only machine-local paths may differ.
  shared = _compared(identity, MACHINE_KEYS)
  saved = study.user_attrs.get("sweep")
  if saved is None:
    study.set_user_attr("sweep", shared)
  elif saved != shared:
    raise UserError(f"study {config.study_name!r} in {identity['storage'] or 'DIR/sweep.db'}: "
                    f"holds a sweep of another sweep config ({_differences(shared, saved)})")
  if config.storage:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(study)  # before counting what is left to do
  else:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
      trial_id = storage.get_trial_id_from_study_id_trial_number(
          storage.get_study_id_from_name(config.study_name), trial.number)
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
      _retry(study, storage.get_trial(trial_id))
      print(f"trial {trial.number} was left running by a stopped sweep; running it again "
            f"in {trial.user_attrs.get('workdir', 'a new workdir')}", file=sys.stderr)
  return study


def _lock(workdir: Path):
  """An exclusive lock on DIR/sweep.lock, held until the returned file is closed (the kernel
  drops it when the process dies, even by SIGKILL); `UserError` if another process holds it."""
  lock_file = open(workdir / "sweep.lock", "w")
  try:
    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock_file.close()
    raise UserError(f"--workdir {workdir}: another sweep process is running in it; the default "
                    f"SQLite storage takes one process at a time (give several workers a "
                    f"database server: sweep.storage)") from None
  return lock_file


def _trial_workdir(trial) -> str:
  """DIR-relative workdir: a re-run trial keeps its original's (inherited in its user attrs)."""
  return trial.user_attrs.get("workdir") or f"trials/{trial.number:04d}"


def make_objective(config, workdir: Path, sweep_fn: SweepFunction):
  """The optuna objective: trains one trial in its workdir and returns its final
  `config.objective`. Records in the trial's user attrs its workdir (relative to DIR), host and
  absolute path, its final metrics and, if it fails, its error ("Type: message")."""

  def objective(trial: optuna.Trial) -> float:
    relative = _trial_workdir(trial)
    trial.set_user_attr("workdir", relative)
    # Where it ran, for the workers of a shared study (each has its own DIR).
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("path", str((workdir / relative).resolve()))
    try:
      overrides = sweep_fn(trial)
      training_config = trial_config(config.base, overrides)
      values = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else
                         f"{name}={value}" for name, value in trial.params.items())
      print(f"trial {trial.number}: {values} in {workdir / relative}", file=sys.stderr,
            flush=True)
      # stdout is kept for the final table; the epochs' JSON lines are in each metrics.jsonl.
      with contextlib.redirect_stdout(sys.stderr):
        metrics = train.train_and_evaluate(training_config, workdir / relative)
    except KeyboardInterrupt:
      # Ctrl-C: queue this trial again before optuna marks it failed, so it is resumed.
      _retry(trial.study, next(t for t in trial.study.get_trials(deepcopy=False)
                               if t.number == trial.number))
      raise
    except Exception as error:
      trial.set_user_attr("error", f"{type(error).__name__}: {error}")
      print(f"trial {trial.number} failed: {type(error).__name__}: {error}", file=sys.stderr,
            flush=True)
      if not isinstance(error, (UserError, train.TrainingDiverged)):
        traceback.print_exc(file=sys.stderr)  # unexpected: the traceback helps
      raise
    trial.set_user_attr("metrics", metrics)
    print(f"trial {trial.number}: {config.objective}={metrics[config.objective]:.4f}",
          file=sys.stderr, flush=True)
    return metrics[config.objective]

  return objective


def columns(param_names, objective: str) -> list[str]:
  """The table's columns: trial number, state, each swept value, the objective, two more final
  metrics, the trial's wall time, its workdir (relative to DIR) and its error if it failed."""
  extra = [key for key in ("test_acc", "train_loss") if key != objective]
  return ["trial", "state", *param_names, objective, *extra, "time_s", "workdir", "error"]


def trial_rows(study: optuna.Study, objective: str, maximize: bool, param_names) -> list[dict]:
  """One dict per trial (an interrupted trial only through its re-run) with the `columns` and
  its host and path, best first: completed trials by the objective, then running and queued
  ones, then failed ones."""
  trials = study.get_trials(deepcopy=False)
  retried = _retried_numbers(trials)
  rows = []
  for trial in trials:
    if trial.number in retried:
      continue
    metrics = trial.user_attrs.get("metrics", {})
    # Besides the columns, where it ran: host and absolute path.
    row = dict.fromkeys(columns(param_names, objective) + ["host", "path"], "")
    row.update({"trial": trial.number, "state": trial.state.name,
                **{key: trial.user_attrs.get(key, "") for key in ("workdir", "error", "host",
                                                                  "path")}})
    row.update({name: trial.params[name] for name in param_names if name in trial.params})
    row.update({key: metrics[key] for key in METRIC_KEYS if key in row and key in metrics})
    if trial.state == TrialState.COMPLETE:
      row[objective] = trial.value
    if trial.state == TrialState.FAIL and not row["error"]:
      row["error"] = "stopped without an error (its process was killed) and not re-run"
    if trial.datetime_start and trial.datetime_complete:
      row["time_s"] = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
    rows.append(row)

  def order(row):
    if row["state"] == "COMPLETE":
      return (0, -row[objective] if maximize else row[objective], row["trial"])
    return (1 if row["state"] in ("RUNNING", "WAITING") else 2, 0, row["trial"])

  return sorted(rows, key=order)


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(rows: list[dict], header: list[str]) -> str:
  """A GitHub markdown table of the rows (numbers to 4 significant digits)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(row[key]) for key in header) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], header: list[str]) -> str:
  """The rows as CSV, numbers at full precision."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return buffer.getvalue()


def plot_objective(rows: list[dict], space: Mapping[str, BaseDistribution],
                   objective: str) -> Figure:
  """One panel per swept parameter: the objective of each completed trial against its value (log
  x axis for log-scale parameters), the best trial as a star and failed trials as crosses on the
  x axis."""
  complete = [row for row in rows if row["state"] == "COMPLETE"]
  failed = [row for row in rows if row["state"] == "FAIL"]
  figure = Figure(figsize=(4.5 * len(space), 3.8), layout="constrained")
  FigureCanvasAgg(figure)
  for axes, (name, distribution) in zip(figure.subplots(1, len(space), squeeze=False)[0],
                                        space.items()):
    axes.plot([row[name] for row in complete], [row[objective] for row in complete], "o",
              label="trial")
    if complete:  # rows are sorted best first
      axes.plot(complete[0][name], complete[0][objective], "*", markersize=16, color="C3",
                label=f"best (trial {complete[0]['trial']})")
    points = [row[name] for row in failed if row[name] != ""]
    if points:
      # At the bottom edge: failed trials have no objective.
      axes.plot(points, [0] * len(points), "x", color="grey", clip_on=False,
                transform=axes.get_xaxis_transform(), label="failed")
    if getattr(distribution, "log", False):
      axes.set_xscale("log")
    axes.set_xlabel(name)
    axes.set_ylabel(objective)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
  return figure


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
  """Writes via a temporary file and a rename, so a kill never leaves a half-written file."""
  temporary = path.with_name(path.name + ".tmp")
  write(temporary)
  temporary.replace(path)


def write_reports(study: optuna.Study, config, workdir: Path,
                  space: Mapping[str, BaseDistribution]) -> list[dict]:
  """Writes DIR/trials.md, DIR/trials.csv and DIR/objective.png; returns the rows."""
  header = columns(list(space), config.objective)
  rows = trial_rows(study, config.objective, direction(config) == "maximize", list(space))
  _write_atomically(workdir / "trials.md", lambda p: p.write_text(markdown_table(rows, header)))
  _write_atomically(workdir / "trials.csv", lambda p: p.write_text(csv_table(rows, header)))
  figure = plot_objective(rows, space, config.objective)
  figure.suptitle(f"{config.study_name}: {config.objective} of {len(rows)} trials")
  _write_atomically(workdir / "objective.png",
                    lambda p: figure.savefig(p, format="png", dpi=100))
  return rows


def run_sweep(config, workdir: str | os.PathLike, sweep_fn: SweepFunction) -> list[dict]:
  """Runs (or resumes) the sweep in `workdir` until `config.num_trials` trials have finished,
  counting every worker and every earlier run; returns the trials' rows, best first. Raises
  `UserError` before any training for a bad sweep config or a workdir of another sweep."""
  workdir = Path(workdir)
  space = validate_sweep_config(config, sweep_fn)
  identity = sweep_identity(config, space)
  if not check_sweep_dir(workdir, identity):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(json.dumps(identity, indent=2) + "\n")
  with contextlib.ExitStack() as stack:
    if not config.storage:
      stack.enter_context(_lock(workdir))
    study = open_study(config, workdir, identity)
    left = trials_left(study, config.num_trials)

    def stop_when_done(study, _):
      if trials_left(study, config.num_trials) == 0:  # other workers' trials count too
        study.stop()

    try:
      if left:
        study.optimize(make_objective(config, workdir, sweep_fn), n_trials=left,
                       catch=(Exception,), gc_after_trial=True,
                       callbacks=[lambda study, _: write_reports(study, config, workdir, space),
                                  stop_when_done])
    finally:  # also when interrupted: the tables show the trials so far
      rows = write_reports(study, config, workdir, space)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so the module imports beside the other
  commands (which define flags of the same names)."""
  flags.DEFINE_string("workdir", None, "Sweep folder: sweep.json, sweep.db, trials/NNNN, "
                      "trials.md, trials.csv, objective.png. Run again to resume.")
  config_flags.DEFINE_config_file("config", None, "Sweep configuration file (a get_config() and "
                                  "a sweep(trial) function).", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = FLAGS.config, Path(FLAGS.workdir)
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # the objective reports each trial
  if not jax.config.jax_compilation_cache_dir:  # unless set, e.g. by $JAX_COMPILATION_CACHE_DIR
    # Trials differ only in hyperparameters: initialisation and evaluation compile to the same
    # programs in every trial, and a resumed trial to the same programs as before the kill.
    jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").resolve()))
  try:
    rows = run_sweep(config, workdir, load_sweep_function(FLAGS["config"].config_filename))
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"interrupted: run the same command again to resume the sweep in {workdir}",
          file=sys.stderr)
    sys.exit(130)
  print((workdir / "trials.md").read_text(), end="")
  complete = [row for row in rows if row["state"] == "COMPLETE"]
  if not complete:
    print(f"error: no trial completed; see {workdir / 'trials.md'}", file=sys.stderr)
    sys.exit(1)
  best = complete[0]
  print(f"best: trial {best['trial']}, {config.objective}={best[config.objective]:.4f}, "
        f"workdir {best['host']}:{best['path']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
