"""The study a sweep's trials live in: samplers, storage (SQLite for one process, any database
server for several workers), the re-running of trials whose worker died, and what is left to do.
"""

from __future__ import annotations

import fcntl
import sys
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from convnet_jax import sweep_config
from convnet_jax import workdir as workdir_lib
from convnet_jax.errors import UserError

# A trial whose worker stops sending heartbeats (shared storage) is re-run at most this often.
MAX_RETRIES = 3



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


def trials_left(study: optuna.Study, num_trials: int) -> int:
  """Trials still to start: the queued (re-run) ones, and new ones up to `num_trials` trials in
  all. Counts every worker's trials, running ones included, across restarts."""
  trials = study.get_trials(deepcopy=False)
  retried = retried_numbers(trials)
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
                                direction=sweep_config.direction(config),
                                sampler=create_sampler(config), load_if_exists=True)
  # Several machines on one study must run the same sweep; only machine-local paths may differ.
  shared = sweep_config.compared(identity, sweep_config.MACHINE_KEYS)
  saved = study.user_attrs.get("sweep")
  if saved is None:
    study.set_user_attr("sweep", shared)
  elif saved != shared:
    raise UserError(f"study {config.study_name!r} in {identity['storage'] or 'DIR/sweep.db'}: "
                    f"holds a sweep of another sweep config "
                    f"({workdir_lib.differences(shared, saved)})")
  if config.storage:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(study)  # before counting what is left to do
  else:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
      trial_id = storage.get_trial_id_from_study_id_trial_number(
          storage.get_study_id_from_name(config.study_name), trial.number)
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
      retry(study, storage.get_trial(trial_id))
      print(f"trial {trial.number} was left running by a stopped sweep; running it again "
            f"in {trial.user_attrs.get('workdir', 'a new workdir')}", file=sys.stderr)
  return study


def lock_sweep_dir(workdir: Path):
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
