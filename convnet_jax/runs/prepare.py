"""Preparing a run: the one place where a config is taken apart into what each part of the
package needs (the step budget, the optimiser's options, the programs' options, the model and
data groups), and everything `train.train_and_evaluate` does before its first epoch: checks,
workdir, train state, data on the device and compiled programs. The benchmark and the
ahead-of-time compile build their runs with the same functions."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from convnet_jax import errors
from convnet_jax import models
from convnet_jax import optim
from convnet_jax import programs as programs_lib
from convnet_jax import budget as budget_lib
from convnet_jax import steps as steps_lib
from convnet_jax.budget import StepBudget
from convnet_jax.data import input_pipeline
from convnet_jax.errors import UserError
from convnet_jax.ops import conv
from convnet_jax.parallel import data_parallel
from convnet_jax.parallel import replicas
from convnet_jax.runs import checkpoints
from convnet_jax.runs import compile_cache
from convnet_jax.runs import epoch_calls
from convnet_jax.runs import reporting
from convnet_jax.runs import validation
from convnet_jax.runs import workdir as workdir_lib


# ---------------------------------------------------------------------------------------------
# The config, taken apart.

def step_budget(config, num_examples: int) -> StepBudget:
  """The run's steps on a training set of `num_examples`."""
  return StepBudget.for_examples(num_examples, config.batch_size, config.data.drop_last_batch,
                                 config.num_epochs, config.freeze.late_epochs)


def optimizer_options(config) -> optim.OptimizerOptions:
  """What the optimiser is built from (`optim.create_optimizer`)."""
  return optim.OptimizerOptions(config.optim, config.schedule, config.muon, config.freeze,
                                config.batch_size)


def proxy_optimizer_options(config) -> optim.OptimizerOptions:
  """The data selection proxy's optimiser: the run's SGD without Muon, its late-frozen
  parameters (airbench's whitening bias) frozen from the start, as airbench96_faster's."""
  freeze = config.freeze.copy_and_resolve_references()
  freeze.parameters = tuple(freeze.parameters) + tuple(freeze.late_parameters)
  freeze.late_parameters = ()
  muon = config.muon.copy_and_resolve_references()
  muon.parameters = ()
  return optim.OptimizerOptions(config.optim, config.schedule, muon, freeze, config.batch_size)


def create_proxy(config, model, budget: StepBudget, learning_rate=None,
                 momentum=None) -> steps_lib.Proxy | None:
  """The data selection's proxy (`config.select`): `model` (an airbench network) with the
  proxy's conv groups, and its optimiser, updating every `select.proxy_update_every` steps on
  the run's schedule; None without selection."""
  select = config.select
  if select.keep_fraction >= 1:
    return None
  proxy_model = model.clone(widths=tuple(select.proxy_widths),
                            convs_per_group=select.proxy_convs_per_group)
  tx = optim.create_optimizer(proxy_optimizer_options(config), budget, learning_rate, momentum,
                              steps_per_update=select.proxy_update_every)
  return steps_lib.Proxy(proxy_model, tx)


def step_options(config, budget: StepBudget) -> steps_lib.StepOptions:
  """What a training step computes beyond plain SGD (`steps.StepOptions`)."""
  return steps_lib.StepOptions(
      label_smoothing=config.optim.label_smoothing,
      loss_reduction=config.optim.loss_reduction,
      frozen_parameters=tuple(config.freeze.parameters),
      late_frozen_parameters=tuple(config.freeze.late_parameters),
      late_freeze_step=budget.late_freeze_step,
      lookahead_every_steps=config.lookahead.every_steps,
      lookahead_decay=config.lookahead.decay, lookahead_power=config.lookahead.power,
      total_steps=budget.total_steps, keep_fraction=config.select.keep_fraction,
      proxy_update_every=config.select.proxy_update_every)


def program_options(config, budget: StepBudget) -> programs_lib.ProgramOptions:
  """What the run's programs compute besides the model (`programs.ProgramOptions`)."""
  epoch = steps_lib.EpochOptions(
      batch_size=config.batch_size, drop_last_batch=config.data.drop_last_batch,
      augment=steps_lib.augment_options(config.augment), step=step_options(config, budget))
  only_last = not any(budget_lib.evaluation_is_due(config.operations.eval_every_epochs, epoch,
                                                   budget.epochs_run)
                       for epoch in range(budget.epochs_run - 1))
  return programs_lib.ProgramOptions(
      epoch, eval_batch_size=config.eval.batch_size, replicated=config.replicas.count > 1,
      # Evaluated only after the last epoch: with its test-time augmentation (`train.py`).
      first_evaluation=config.eval.test_time_augmentation if only_last else "none",
      eval_population=steps_lib.population_options(config.eval.batch_norm_statistics,
                                                   config.batch_size, epoch.augment))


def run_identity(config) -> dict:
  """What a run computes, as plain JSON data: the config without its operation groups
  (`workdir.identity`)."""
  return workdir_lib.identity(config_values(config))


def config_values(config) -> dict:
  """The config as plain JSON data, as config.json holds it."""
  return json.loads(config.to_json_best_effort())


def model_subject(config) -> str:
  """What the run trains, in an out-of-memory line: "model resnet18 in float32 (4 replicas)"."""
  replicated = f" ({config.replicas.count} replicas)" if config.replicas.count > 1 else ""
  return f"model {config.model.name} in {config.model.dtype}{replicated}"


# ---------------------------------------------------------------------------------------------
# Before the first epoch.

def create_run_state(config, model, budget: StepBudget, mesh, data=None):
  """The train state and data-order key of the run: one model, or `config.replicas.count` stacked
  along a leading axis (seed, learning rate and momentum from `replicas.replica_settings`). A
  model of seed s has the parameters and data order of `jax.random.split(jax.random.key(s))`,
  so replica i of a replicated run starts exactly as a single run of its seed. Models whose
  initialisation depends on the data (`models.DATA_INITIALISERS`) take it from the training set
  `data` (an `input_pipeline.Dataset`; required for them)."""
  settings = replicas.replica_settings(config.replicas, config.seed, config.optim.learning_rate,
                                      config.optim.momentum)
  stacked = config.replicas.count > 1
  options = optimizer_options(config)

  def create(seed, learning_rate, momentum):
    init_key, data_key = jax.random.split(jax.random.key(seed))
    tx = optim.create_optimizer(options, budget, learning_rate, momentum)
    state = steps_lib.create_train_state(
        model, init_key, tx, with_lookahead=config.lookahead.every_steps > 0,
        proxy=create_proxy(config, model, budget, learning_rate, momentum))
    return state, data_key

  if stacked:
    create = jax.vmap(create)
  args = [np.asarray(values if stacked else values[0]) for values in settings.values()]
  args[1:] = [np.asarray(value, np.float32) for value in args[1:]]
  state, data_key = jax.jit(create, out_shardings=data_parallel.mirrored_sharding(mesh)).lower(
      *args).compile(compiler_options=programs_lib.compiler_options(run_once=True))(*args)
  # The optimiser state only holds momenta (zeros) and counts: it does not depend on params.
  state = state.replace(params=models.initialise_from_data(config.model, state.params, data))
  proxy = create_proxy(config, model, budget)
  if proxy is not None:  # its whitening from the same images, and a concrete optimiser as below
    state = state.replace(proxy=state.proxy.replace(
        params=models.initialise_from_data(config.model, state.proxy.params, data),
        tx=proxy.tx))
  if state.lookahead_params is not None:
    # Lookahead's slow copy starts as the (data-initialised) parameters, in buffers of its own,
    # since the epoch program donates both.
    state = state.replace(lookahead_params=jax.tree_util.tree_map(jnp.copy, state.params))
  # The optimiser built inside `jit` only served to initialise: its hyperparameters are in
  # `opt_state`, and a concrete one is kept for the updates.
  return state.replace(tx=optim.create_optimizer(options, budget)), data_key


def describe_run(config, state, budget: StepBudget, mesh) -> str:
  """The start-up line on the model and the devices: "model seed: 102,784 parameters x 1
  replicas; 79 steps per epoch on 1 devices"."""
  proxy = "" if state.proxy is None else (
      f" (and a selection proxy of "
      f"{models.count_parameters(state.proxy.params) // config.replicas.count:,})")
  return (f"model {config.model.name}: "
          f"{models.count_parameters(state.params) // config.replicas.count:,} parameters{proxy} "
          f"x {config.replicas.count} replicas; {budget.steps_per_epoch} steps per epoch on "
          f"{data_parallel.mesh_size(mesh)} devices")


def load_data(config) -> input_pipeline.Dataset:
  """The run's data set, loaded, and the batch sizes checked against it. The config is checked
  before (`validation.validate_config`), the workdir too (`workdir.check_workdir`)."""
  data = input_pipeline.load_dataset(config.data)
  validation.check_batch_sizes(config, len(data.train_labels), len(data.test_labels))
  return data


def check_model(config, model) -> None:
  """The checks that need the model's parameter tree (its shapes only: nothing is computed)."""
  if not (config.freeze.parameters or config.freeze.late_parameters
          or config.optim.lr_multipliers or config.muon.parameters):
    return  # nothing to check: no need to trace the model
  dummy = jax.ShapeDtypeStruct((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  validation.check_parameter_paths(
      config, jax.eval_shape(lambda: model.lazy_init(jax.random.key(0), dummy))["params"])


def resolve_dtype(config, backend: str | None = None):
  """(config, choice): a config naming `model.dtype="auto"` as a copy with the dtype chosen for
  this process or for `backend` (`conv.choose_dtype`), and the choice; any other config as it is,
  and None. Resolved before the run's identity, so config.json and the checkpoints name the dtype
  the run computes in."""
  if config.model.dtype != "auto":
    return config, None
  choice = conv.choose_dtype(config.model.dtype, backend)
  resolved = config.copy_and_resolve_references()
  resolved.model.dtype = choice.dtype
  return resolved, choice


def choose_convolutions(config, mesh) -> conv.ConvChoice:
  """The convolution path of this run (`conv.choose_conv_implementation`); `UserError` when
  the one asked for cannot run here."""
  try:
    return conv.choose_conv_implementation(config.model.conv_implementation, config.model.dtype,
                                           data_parallel.mesh_size(mesh))
  except conv.ConvUnavailable as error:
    raise error.naming_the_key(config.model.conv_implementation) from None


def create_workdir(files: workdir_lib.RunFiles, is_writer: bool) -> None:
  """Creates the workdir, once every process of a multi-process run has checked it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("convnet_jax: workdir checked")
  if is_writer:
    files.workdir.mkdir(parents=True, exist_ok=True)


def restore_state_and_history(store: checkpoints.CheckpointStore, state,
                              fingerprints: Sequence[str], resuming: bool,
                              reporter: reporting.Reporter):
  """(state, history, epoch in progress): restored from the newest intact checkpoint of one of
  the config `fingerprints` when resuming and there is one, else the fresh `state`, no history
  and None. The epoch in progress is an `epoch_calls.EpochInProgress` (a checkpoint taken
  mid-epoch) or None."""
  if not resuming:
    return state, [], None
  try:
    restored = store.restore_latest(state, fingerprints)
  except checkpoints.ForeignCheckpointError as error:
    raise UserError(str(error)) from None
  if restored is None:
    return state, [], None
  state, record = restored
  history = record["history"]
  in_progress = record.get("epoch_in_progress")
  where = (f"at step {in_progress['steps_done']} of epoch {in_progress['epoch']}" if in_progress
           else f"after epoch {len(history) - 1}")
  logging.info("resuming from %s %s", store.directory, where)
  reporter.note(f"resuming {where} from {store.directory}")
  return state, history, in_progress and epoch_calls.EpochInProgress.from_json(in_progress)


@contextlib.contextmanager
def open_checkpoints(config, files: workdir_lib.RunFiles):
  """The run's `CheckpointStore`, closed at the end; a write that fails inside says which
  checkpoint is intact (`errors.naming_the_intact_checkpoint`)."""
  with contextlib.closing(checkpoints.CheckpointStore(
      files.checkpoints, config.operations.max_checkpoints_to_keep)) as store:
    with errors.naming_the_intact_checkpoint(store):
      yield store


def program_store(config, cache_choice, conv_choice: conv.ConvChoice):
  """Where the run's compiled programs are kept between runs (`compile_cache.ProgramStore`),
  under the identity of what they compute."""
  return compile_cache.ProgramStore(cache_choice, program_identity(config, conv_choice))


def program_identity(config, conv_choice: conv.ConvChoice) -> dict:
  """What the run's programs compute, for `compile_cache.ProgramStore`: the run's identity
  (`run_identity`) less the data folder, and the convolution path it resolved to."""
  identity = run_identity(config)
  identity["data"].pop("dir", None)
  return {**identity, "convolutions": conv_choice.implementation}


def report_shapes(reporter: reporting.Reporter, config, model, state,
                  data: steps_lib.DeviceData) -> None:
  """With `operations.trace_shapes`, the shapes of a training step of the first model (replica
  0 when stacked) on stderr."""
  if not config.operations.trace_shapes:
    return
  params = state.params
  if config.replicas.count > 1:
    params = jax.tree_util.tree_map(lambda x: x[0], params)
  images = data.train_images[:config.batch_size].astype(jnp.float32)
  for line in reporting.shape_trace(model, params, images,
                                    data.train_labels[:config.batch_size]):
    reporter.note(line)


def report_finished_run(config, files: workdir_lib.RunFiles, is_writer: bool) -> dict | None:
  """When the workdir holds this run finished (the same command run again), says so in one
  line on stderr, prints its last epoch line again on stdout and returns that record, touching
  no file; None when there is training left to do."""
  lines = workdir_lib.finished_run(files, budget_lib.epochs_run(config.num_epochs))
  if not lines:
    return None
  record = json.loads(lines[-1])
  if is_writer:
    print(reporting.finished_run_line(record, files.workdir), file=sys.stderr)
    print(lines[-1], flush=True)
  return record
