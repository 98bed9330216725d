"""What the trainer builds from a config (`runs.prepare` takes it apart), for tests that build
one piece of a run by hand: a step budget of a given epoch length, the optimiser, a train state
and the learning-rate schedule."""

from __future__ import annotations

import pytest

from convnet_jax import optim
from convnet_jax import steps
from convnet_jax.budget import StepBudget
from convnet_jax.runs import prepare
from convnet_jax.runs import reporting
from convnet_jax.runs import validation
from convnet_jax.errors import UserError


def budget(config, steps_per_epoch: int) -> StepBudget:
  """The config's step budget with epochs of `steps_per_epoch` steps."""
  return StepBudget(steps_per_epoch, config.num_epochs, config.freeze.late_epochs)


def optimizer(config, step_budget: StepBudget, learning_rate=None, momentum=None):
  """The config's optimiser (`optim.create_optimizer`)."""
  return optim.create_optimizer(prepare.optimizer_options(config), step_budget, learning_rate,
                                momentum)


def train_state(config, model, key, step_budget: StepBudget, learning_rate=None,
                momentum=None) -> steps.TrainState:
  """A fresh train state of `model` with the config's optimiser (and lookahead)."""
  return steps.create_train_state(model, key, optimizer(config, step_budget, learning_rate,
                                                        momentum),
                                  with_lookahead=config.lookahead.every_steps > 0)


def schedule(config, step_budget: StepBudget, peak: float | None = None):
  """The config's learning-rate schedule, peaking at `optim.learning_rate` unless `peak`."""
  return optim.create_learning_rate_fn(config.schedule, step_budget,
                                       config.optim.learning_rate if peak is None else peak)


def with_values(config, values: dict):
  """`config` with each dotted key of `values` ("optim.learning_rate") set, in place, as the
  command line sets them."""
  for key, value in values.items():
    *groups, leaf = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[leaf] = value
  return config


def reporter(config, files, is_writer: bool = True) -> reporting.Reporter:
  """The reporter a run of `config` writes its files in `files` with."""
  return reporting.Reporter(files, prepare.config_values(config), config.operations,
                            is_writer=is_writer)


def validation_error(config, key: str, value) -> str:
  """The one line `validation.validate_config` refuses `config` with, once the dotted `key` is
  set to `value` (the test fails where it accepts it)."""
  with_values(config, {key: value})
  with pytest.raises(UserError) as error:
    validation.validate_config(config)
  return str(error.value)
