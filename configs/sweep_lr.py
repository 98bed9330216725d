"""Sweep of the seed run's learning rate and momentum: 8 trials on CIFAR-2, one epoch each.

python -m convnet_jax.sweep --config configs/sweep_lr.py --workdir runs/sweep_lr \
    --config.base.data.dir=../shared/data/cifar10

A sweep config holds everything but the search space in `get_config()`, and the search space in
`sweep(trial)` below: optuna's `trial.suggest_*` calls, whose values it returns as training-config
keys. Any key can be changed on the command line: `--config.num_trials=16`,
`--config.sampler=tpe`, and the training config of every trial as `--config.base.KEY=VALUE`.
"""

import ml_collections

from configs import default as default_lib


def get_config():
  config = ml_collections.ConfigDict()
  # The training config every trial starts from; sweep(trial) sets the swept keys on a copy.
  config.base = default_lib.get_config()
  # One epoch of the default run (the lr still decays linearly to 0 over it): ~1 min on a CPU.
  config.base.num_epochs = 1

  # "grid" (every point of `grid`, in an order shuffled by `seed`), "random" or "tpe" (optuna's
  # Tree-structured Parzen Estimator; random for its first 10 trials) over sweep(trial)'s ranges.
  config.sampler = "grid"
  # grid only: the values of each parameter that sweep(trial) suggests; they must lie within
  # its ranges. Log-spaced learning rates, as the range is log-scale.
  config.grid = ml_collections.ConfigDict({
      "learning_rate": (0.01, 0.03, 0.1, 0.3),
      "momentum": (0.5, 0.9),
  })
  # Trials in all, over every run and worker (grid: at most the number of grid points).
  config.num_trials = 8
  config.seed = 0  # of the sampler

  # A key of the final epoch's metrics, and "maximize" or "minimize" ("": maximize accuracies,
  # minimize losses).
  config.objective = "test_acc"
  config.direction = ""

  # Where optuna keeps the study: "" is the SQLite file WORKDIR/sweep.db, for one process. Any
  # SQLAlchemy URL (postgresql://user@host/db with `pip install -e ".[postgres]"`, ...) lets
  # several machines work on one sweep under the same study_name; with one --workdir on a
  # shared file system, a dead worker's trial is resumed from its checkpoint (docs/sweeps.md).
  config.storage = ""
  config.study_name = "sweep_lr"
  # Shared storage only: each worker's running trial sends a heartbeat every heartbeat_interval
  # seconds; a trial without one for grace_period seconds is taken as dead and run again by a
  # waiting or starting worker. A worker exits once no trial of the study is left running.
  config.heartbeat_interval = 60
  config.grace_period = 180
  # Shared storage only: a database that cannot be reached (a server restarted, a network gone
  # for a while) is retried with backoff for this long, with one line when it goes and one when
  # it is back; past it the worker stops (exit 75), and its trial in flight is resumed from its
  # checkpoint when the sweep is started again.
  config.storage_retry_seconds = 300
  return config


def sweep(trial):
  """The training-config values of one trial, by their dotted keys."""
  return {
      "optim.learning_rate": trial.suggest_float("learning_rate", 1e-3, 1.0, log=True),
      "optim.momentum": trial.suggest_float("momentum", 0.0, 0.95),
  }
