"""The study a sweep's trials live in: samplers, storage (SQLite for one process, any database
server for several workers), the re-running of trials whose worker died, and what is left to do.
"""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from convnet_jax.runs import stopping
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import one_line
from convnet_jax.errors import StorageUnavailable
from convnet_jax.errors import UserError
from convnet_jax.sweep import config as sweep_config

# A trial whose worker stops sending heartbeats (shared storage) is re-run at most this often.
MAX_RETRIES = 3
# Tries at opening the study, for workers started together on an empty database.
STARTUP_ATTEMPTS = 5
# The user attr that marks a trial started beyond `num_trials` (two workers started the last
# place at the same moment); it ends PRUNED without training and takes no place.
SURPLUS_ATTR = "surplus"
# The longest wait between two tries at a database that cannot be reached.
MAX_RETRY_DELAY = 15

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


class _GridByPlace(optuna.samplers.GridSampler):
  """optuna's GridSampler (the grid shuffled by the seed), giving each fresh trial the grid point
  of its place in the budget (`place_in_budget`) instead of its trial number.

  Re-run copies take trial numbers too, so numbering would skip points and leave the later
  trials to GridSampler's random pick among unvisited points, which two workers starting
  together draw alike (same seed, same state): one point run twice, another never. Places are
  dense and every worker computes the same one. Uses GridSampler's `_search_space` and
  `_all_grids` (optuna 5) and sets the same system attrs as its own `before_trial`.
  """

  def before_trial(self, study, trial):
    if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
      return  # a re-run copy keeps its grid point
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    place = place_in_budget(trials, trial)
    # A place beyond the grid is surplus (num_trials <= grid size) and is pruned untrained.
    study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
    study._storage.set_trial_system_attr(trial._trial_id, "grid_id", place % len(self._all_grids))


def create_sampler(config) -> optuna.samplers.BaseSampler:
  """The configured sampler, deterministic given `config.seed`."""
  if config.sampler == "grid":
    return _GridByPlace(dict(config.grid), seed=config.seed)
  if config.sampler == "random":
    return _SeedPerTrial(lambda seed: optuna.samplers.RandomSampler(seed=seed), config.seed)
  return _SeedPerTrial(lambda seed: optuna.samplers.TPESampler(seed=seed), config.seed)


def retried_numbers(trials) -> set[int]:
  """Numbers of the trials that were interrupted and re-run as a later trial (their copies carry
  the original numbers in the "retry_history" that RetryHeartbeatStaleTrialCallback writes)."""
  return {number for trial in trials for number in trial.system_attrs.get("retry_history", ())}


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry=None) -> None:
  """Queues a copy of an interrupted trial: same values, same workdir (so training resumes from
  its last checkpoint), same grid point."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def is_surplus(trial: optuna.trial.FrozenTrial) -> bool:
  """Whether the trial was found beyond `num_trials` (see `SURPLUS_ATTR`)."""
  return bool(trial.user_attrs.get(SURPLUS_ATTR))


def budget_roots(trials) -> list[optuna.trial.FrozenTrial]:
  """The trials that take a place of the `num_trials`: every trial started fresh (not a re-run
  copy, which continues its original's place), except the surplus ones."""
  return [trial for trial in trials
          if not trial.system_attrs.get("retry_history") and not is_surplus(trial)]


def place_in_budget(trials, trial: optuna.trial.FrozenTrial) -> int:
  """The 0-based place of `trial` (of its original, for a re-run copy) among `budget_roots`,
  by trial number. Trial numbers are given out under a lock on the study row, so every trial
  with a smaller number is in the database before this one exists: every worker computes the
  same place, and places >= `num_trials` are surplus."""
  history = trial.system_attrs.get("retry_history")
  original = history[0] if history else trial.number
  return sum(1 for root in budget_roots(trials) if root.number < original)


def trials_left(study: optuna.Study, num_trials: int) -> int:
  """Trials still to start: the queued (re-run) ones, and new ones up to `num_trials` places in
  all. Counts every worker's trials, running ones included, across restarts."""
  trials = study.get_trials(deepcopy=False)
  waiting = sum(1 for trial in trials if trial.state == TrialState.WAITING)
  return waiting + max(0, num_trials - len(budget_roots(trials)))


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
  """The study's RUNNING trials (of live workers, or of dead ones not yet found stale)."""
  return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def requeue_stale_trials(study: optuna.Study) -> None:
  """Shared storage: fails the RUNNING trials whose worker sent no heartbeat for
  `grace_period` s, and (the storage's stale-trial callback) queues a copy of each."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)


def _unreachable(error: BaseException) -> BaseException | None:
  """The database driver's error in `error`'s chain when it says the database could not be
  reached (refused, closed, reset: SQLAlchemy's OperationalError and InterfaceError, or a
  connection it invalidated); None for any other error, which no retry would mend."""
  while error is not None:
    if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
        isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated):
      return error
    error = error.__cause__ or error.__context__
  return None


class _Outage:
  """One database outage, shared by the threads that meet it (the trial loop, optuna's
  heartbeat thread): when it began, whether it was announced, whether the worker gave up."""

  def __init__(self, where: str, retry_seconds: float):
    self.where, self.retry_seconds = where, retry_seconds
    self.lock = threading.Lock()
    self.since: float | None = None
    self.gave_up = False
    self.local = threading.local()  # set while a call retries: calls inside it do not

  def failed(self, error: BaseException) -> float:
    """Records a failed call; returns the seconds left to retry (<= 0: give up)."""
    with self.lock:
      now = time.monotonic()
      if self.since is None:
        self.since = now
        reason = _unreachable(error)
        driver_error = getattr(reason, "orig", None) or reason  # the driver's own words
        print(f"sweep.storage={self.where}: the database cannot be reached "
              f"({type(driver_error).__name__}: {one_line(driver_error, 160)}); retrying for "
              f"up to {self.retry_seconds:g} s", file=sys.stderr, flush=True)
      left = self.since + self.retry_seconds - now
      if left <= 0:
        self.gave_up = True
      return left

  def recovered(self) -> None:
    with self.lock:
      if self.since is not None:
        print(f"sweep.storage={self.where}: reachable again after "
              f"{time.monotonic() - self.since:.0f} s; the sweep goes on", file=sys.stderr,
              flush=True)
        self.since = None

  def give_up_error(self) -> StorageUnavailable:
    return StorageUnavailable(
        f"sweep.storage={self.where}: the database could not be reached for "
        f"{self.retry_seconds:g} s (sweep.storage_retry_seconds); this worker stops. Its trial "
        f"in flight stays RUNNING in the study and is resumed from its checkpoint when the "
        f"sweep is started again once the database is back")


def _retrying(method, name: str):
  """`method` of `RetryingRDBStorage`, retried with backoff through an outage."""
  @functools.wraps(method)
  def call(self, *args, **kwargs):
    outage = self._outage
    if outage is None or getattr(outage.local, "retrying", False):
      return method(self, *args, **kwargs)
    if outage.gave_up:
      raise outage.give_up_error()
    outage.local.retrying = True
    try:
      delay = 0.5
      while True:
        try:
          result = method(self, *args, **kwargs)
          break
        except Exception as error:
          if _unreachable(error) is None:
            raise
          left = outage.failed(error)
          if left <= 0:
            if name == "record_heartbeat":
              # optuna's heartbeat thread would die with a traceback, and the trial train on:
              # stop the trial as SIGTERM does, with a checkpoint; the main thread's next call
              # of the storage reports the outage.
              stopping.request_stop()
              return None
            raise outage.give_up_error() from None
          time.sleep(min(delay, left))
          delay = min(2 * delay, MAX_RETRY_DELAY)
    finally:
      outage.local.retrying = False
    outage.recovered()
    return result

  return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
  """optuna's RDBStorage whose calls, when the database cannot be reached (a server restarted,
  a network gone for a minute), are retried with backoff for `retry_seconds`, with one line
  when the outage starts and one when it ends; past that a `StorageUnavailable`. Pooled
  connections are checked before use, so the first call after a restart does not fail on a
  connection the server closed."""

  def __init__(self, url: str, *, retry_seconds: float, where: str, **kwargs):
    self._outage = None  # none while optuna creates its tables (open_study retries that)
    super().__init__(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
    self._outage = _Outage(where, retry_seconds)

  def __getstate__(self):
    state = super().__getstate__()
    state.pop("_outage", None)
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    self._outage = None


for _name, _method in list(vars(optuna.storages.RDBStorage).items()):
  if callable(_method) and not isinstance(_method, (staticmethod, classmethod)) and (
      not _name.startswith("_") or _name in ("_get_trials", "_get_stale_trial_ids")) and (
      _name not in ("remove_session", "get_heartbeat_interval",
                    "get_heartbeat_stale_trial_callback")):
    setattr(RetryingRDBStorage, _name, _retrying(_method, _name))


def _load_study(config, workdir: Path, shared: dict, where: str):
  """(storage, study, the study's sweep record), creating each where it does not exist yet."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if config.storage:
      storage = RetryingRDBStorage(
          sweep_config.database_url(config.storage),
          retry_seconds=sweep_config.storage_retry_seconds(config),
          where=where,
          heartbeat_interval=config.heartbeat_interval,
          grace_period=config.grace_period,
          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
    else:
      storage = optuna.storages.RDBStorage(f"sqlite:///{(workdir / 'sweep.db').resolve()}")
    study = optuna.create_study(storage=storage, study_name=config.study_name,
                                direction=sweep_config.direction(config),
                                sampler=create_sampler(config), load_if_exists=True)
  saved = study.user_attrs.get("sweep")
  if saved is None:
    study.set_user_attr("sweep", shared)
    saved = shared
  return storage, study, saved


def open_study(config, workdir: Path, identity: dict) -> optuna.Study:
  """Creates or loads the study. Default storage: DIR/sweep.db, used by this process only (a
  lock file makes sure), so trials it finds RUNNING were left by a killed run and are queued
  again. Any other storage may be shared: there optuna's heartbeat tells dead workers' trials
  (no heartbeat for `grace_period` s) from live ones, and queues only the dead ones again."""
  # Several machines on one study must run the same sweep; only machine-local paths may differ.
  shared = sweep_config.compared(identity, sweep_config.MACHINE_KEYS)
  for attempt in range(STARTUP_ATTEMPTS):
    try:
      storage, study, saved = _load_study(config, workdir, shared, repr(identity["storage"]))
      break
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
      # Workers started together on an empty database race to create optuna's tables, the
      # study and its record ("relation already exists", a duplicate key): the losers try
      # again and find them made.
      if attempt + 1 == STARTUP_ATTEMPTS:
        cause = error.__cause__ or error
        reason = " ".join(str(getattr(cause, "orig", cause)).split())
        raise UserError(f"sweep.storage={identity['storage']!r}: could not open the study "
                        f"({type(cause).__name__}: {reason[:300]})") from error
      time.sleep(0.2 + random.random())
  if saved != shared:
    raise UserError(f"study {config.study_name!r} in {identity['storage'] or 'DIR/sweep.db'}: "
                    f"holds a sweep of another sweep config "
                    f"({workdir_lib.differences(shared, saved)})")
  if config.storage:
    requeue_stale_trials(study)  # before counting what is left to do
  else:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
      trial_id = storage.get_trial_id_from_study_id_trial_number(
          storage.get_study_id_from_name(config.study_name), trial.number)
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
      retry(study, storage.get_trial(trial_id))
      print(f"trial {trial.number} was left running by a stopped sweep; running it again "
            f"in {trial.user_attrs.get('workdir', 'a new workdir')}", file=sys.stderr)
  return study


def lock_sweep_dir(workdir: Path) -> workdir_lib.FolderLock:
  """The lock on DIR/sweep.lock that keeps a second process off the default SQLite storage (a
  `workdir.FolderLock`, to enter)."""
  return workdir_lib.FolderLock(
      workdir, "sweep.lock", advice="the default SQLite storage takes one sweep process at a "
      "time (give several workers a database server: sweep.storage)")
