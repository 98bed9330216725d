"""A sweep config for tests: configs/sweep_lr.py's sweep on configs/smoke.py, seconds a trial."""

import ml_collections

from configs import smoke as smoke_lib
from configs import sweep_lr as sweep_lr_lib


def get_config():
  config = sweep_lr_lib.get_config()
  config.base = smoke_lib.get_config()
  # Whole batches only: a short last batch would be one more program to compile per trial.
  config.base.data.max_train_examples = 128
  config.base.data.max_test_examples = 64
  config.base.operations.tensorboard = False
  config.grid = ml_collections.ConfigDict({"learning_rate": (0.05, 0.2), "momentum": (0.9,)})
  config.num_trials = 2
  config.study_name = "tiny"
  return config


def sweep(trial):
  # The range reaches 1e38 so that a test can make a trial diverge to NaN.
  return {
      "optim.learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e38, log=True),
      "optim.momentum": trial.suggest_float("momentum", 0.0, 0.95),
  }
