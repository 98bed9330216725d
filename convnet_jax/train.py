"""Training: `train_and_evaluate`, the loop that runs each epoch as calls of the compiled
training program of `steps` and evaluates after each, and its per-epoch pieces.

The machinery around the loop lives in its own modules: `steps` (the pure train and eval steps
and the programs), `epoch_calls` (how an epoch is cut into calls, an epoch in progress),
`run_setup` (checks, state, data on the device, compiled programs), `optim` (schedules, SGD),
`parallel` (mesh, split batches), `replicas` (models trained together), `checkpoints`,
`stopping` (SIGTERM and Ctrl-C), `workdir` (run files, its lock, same-run check), `logs` and
`reporting` (stdout, metrics.jsonl, TensorBoard, preds).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from convnet_jax import models
from convnet_jax import optim
from convnet_jax import programs as programs_lib
from convnet_jax import steps as steps_lib
from convnet_jax.parallel import data_parallel
from convnet_jax.parallel import replicas
from convnet_jax.runs import allocator
from convnet_jax.runs import checkpoints
from convnet_jax.runs import compile_cache
from convnet_jax.runs import epoch_calls
from convnet_jax.runs import errors
from convnet_jax.runs import logs
from convnet_jax.runs import reporting
from convnet_jax.runs import setup as run_setup
from convnet_jax.runs import stopping
from convnet_jax.runs import validation
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.runs.errors import RunStopped
from convnet_jax.runs.errors import TrainingDiverged

__all__ = ["RunStopped", "TrainingDiverged", "train_and_evaluate"]


# ---------------------------------------------------------------------------------------------
# One epoch of the loop.

def run_evaluation(programs: programs_lib.Programs, state, data: programs_lib.DeviceData,
                   test_time_augmentation: str = "none"):
  """Test predictions and summed test metrics (on the device) of the state's parameters."""
  return programs.evaluation_program(test_time_augmentation)(state.params, data.test_images,
                                                   data.test_labels, data.mean, data.std)


def _host_totals(totals):
  # float64 on the host, so that an accuracy is exactly correct / count.
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(totals))


def test_time_accuracy(config, programs: programs_lib.Programs, state,
                       data: programs_lib.DeviceData, diverged: np.ndarray) -> dict[str, Any]:
  """{"tta_test_acc": accuracy} with `config.test_time_augmentation` (one value per replica,
  null once diverged), or {} without it."""
  if config.test_time_augmentation == "none":
    return {}
  _, totals = run_evaluation(programs, state, data, config.test_time_augmentation)
  accuracy = _host_totals(totals)["correct"] / len(data.test_labels)
  return {"tta_test_acc": replicas.metric_values(accuracy, diverged)}


def examples_trained(config, num_examples: int, steps_per_epoch: int, num_steps: int) -> int:
  """Examples an epoch of `num_steps` steps trains on: all of them, the full batches only when
  the short last batch is dropped, `num_steps` full batches in a fractional last epoch."""
  if num_steps < steps_per_epoch or config.drop_last_batch:
    return num_steps * config.batch_size
  return num_examples


def initial_divergence(config, history: list[dict]) -> np.ndarray:
  """Which replicas had diverged by the end of `history` (a 0-d False for one model)."""
  if config.num_replicas == 1:
    return np.zeros((), bool)
  diverged = np.zeros(config.num_replicas, bool)
  if history:
    diverged[history[-1]["diverged"]] = True
  return diverged


def check_divergence(step_losses: np.ndarray, diverged: np.ndarray, *, epoch: int,
                     num_steps: int, last_checkpoint: str | None, checkpoint_dir: Path):
  """The updated mask of diverged replicas after these step losses of epoch `epoch` (one row
  per replica; the epoch's steps so far). Raises `TrainingDiverged`, naming the first bad step
  and the checkpoint kept (`last_checkpoint`, where the run stood at it), when every model's
  loss has stopped being finite."""
  bad_steps = replicas.first_nonfinite_steps(step_losses)
  stacked = bad_steps.ndim > 0
  if np.all(bad_steps >= 0):
    bad_step = int(np.min(bad_steps))
    subject = "loss in every replica" if stacked else "loss"
    raise TrainingDiverged(
        f"non-finite {subject} at step {epoch * num_steps + bad_step} (epoch {epoch}, step "
        f"{bad_step} of the epoch); the last good checkpoint ({last_checkpoint or 'none yet'}) "
        f"is kept in {checkpoint_dir}")
  for replica in np.flatnonzero((bad_steps >= 0) & ~diverged):
    logging.warning("replica %d: non-finite loss at step %d of epoch %d; it goes on as null",
                    replica, bad_steps[replica], epoch)
  return diverged | (bad_steps >= 0)


def epoch_record(epoch: int, train_totals: dict, test_totals: dict | None,
                 learning_rate: np.ndarray,
                 diverged: np.ndarray, *, num_trained: int, num_test: int, seconds: float,
                 compile_seconds: float, seeds: list[int] | None = None) -> dict[str, Any]:
  """The epoch's JSON record: mean losses and accuracies over the `num_trained` examples seen
  and the `num_test` test examples (no test metrics without `test_totals`: an epoch not
  evaluated), the learning rate the epoch started with, the seconds since the loop started and
  the compile time. Replicas (`seeds` given): each metric one value per replica (null once
  diverged), the test accuracy summary, the diverged ones and the seeds."""
  def values(metric):
    return replicas.metric_values(metric, diverged)

  record = {
      "epoch": epoch,
      "test_acc": None,
      "time": round(seconds, 3),
      "train_loss": values(train_totals["loss_sum"] / num_trained),
      "train_acc": values(train_totals["correct"] / num_trained),
      "test_loss": None,
      "learning_rate": replicas.metric_values(learning_rate, np.zeros_like(diverged)),
      "compile_time": round(compile_seconds, 3),
  }
  if test_totals is None:
    del record["test_acc"], record["test_loss"]
  else:  # in place, keeping the keys' order
    record.update(test_acc=values(test_totals["correct"] / num_test),
                  test_loss=values(test_totals["loss_sum"] / num_test))
  if seeds is not None:
    if test_totals is not None:
      record.update(replicas.replica_summary(record["test_acc"]))
    record.update(diverged=np.flatnonzero(diverged).tolist(), seeds=seeds)
  return record


def evaluation_is_due(config, epoch: int, epochs_run: int) -> bool:
  """Every `operations.eval_every_epochs` epochs (0: never), and after the last."""
  every = config.operations.eval_every_epochs
  return epoch + 1 == epochs_run or (every > 0 and (epoch + 1) % every == 0)


def checkpoint_is_due(config, epoch: int) -> bool:
  """Every `operations.checkpoint_every_epochs` epochs, and after the last."""
  return ((epoch + 1) % config.operations.checkpoint_every_epochs == 0
          or epoch + 1 == steps_lib.epochs_run(config.num_epochs))


def checkpoint_record(history: list[dict], fingerprint: str, data_key: jax.Array,
                      position: str, in_progress: epoch_calls.EpochInProgress | None = None
                      ) -> dict:
  """What a checkpoint keeps beside the state: the metrics of the epochs done, those of the
  epoch in progress (a mid-epoch checkpoint), where the run stands in words, the config
  fingerprint and the data-order key."""
  record = {"history": history, "config_fingerprint": fingerprint, "position": position,
            "data_key": np.asarray(jax.random.key_data(data_key)).tolist()}
  if in_progress is not None and in_progress.steps_done:
    record["epoch_in_progress"] = in_progress.to_json()
  return record


# ---------------------------------------------------------------------------------------------
# The loop.

class TrainingLoop:
  """The epochs of one run, each as calls of the training program (`epoch_calls`), evaluated
  after each; checkpoints, stops on a signal and reports as it goes."""

  def __init__(self, config, programs: programs_lib.Programs, data: programs_lib.DeviceData,
               data_key: jax.Array, budget: steps_lib.StepBudget,
               store: checkpoints.CheckpointStore,
               fingerprint: str, reporter: reporting.Reporter, signals: stopping.StopSignals):
    self.config, self.programs, self.data, self.data_key = config, programs, data, data_key
    self.budget = budget
    self.store, self.fingerprint = store, fingerprint
    self.reporter, self.signals = reporter, signals
    self.planner = epoch_calls.CallPlanner(config.operations, budget)
    self.num_train = int(data.train_labels.shape[0])
    self.num_test = int(data.test_labels.shape[0])
    self.seeds = replicas.replica_settings(config)["seed"] if config.num_replicas > 1 else None
    self.start = time.perf_counter()

  def run(self, state, history: list[dict], in_progress: epoch_calls.EpochInProgress | None):
    """Trains from where `history` and `in_progress` stand to the end; returns the last
    record and the final predictions (None if there was nothing left to train)."""
    config = self.config
    diverged = initial_divergence(config, history)
    predictions = None
    for epoch in range(len(history), self.budget.epochs_run):
      progress = in_progress or epoch_calls.EpochInProgress.start(
          epoch, optim.current_learning_rate(config, self.budget, state),
          config.num_replicas)
      in_progress = None
      state, diverged = self.train_epoch(state, history, progress, diverged)
      test_totals = None
      if evaluation_is_due(config, epoch, self.budget.epochs_run):
        with errors.naming_the_batch_size(config, "eval_batch_size"):
          predictions, test_totals = run_evaluation(self.programs, state, self.data)
          test_totals = _host_totals(test_totals)
      epoch_steps = progress.steps_done
      num_trained = examples_trained(config, self.num_train, self.budget.steps_per_epoch,
                                     epoch_steps)
      history.append(epoch_record(
          epoch, progress.totals(self.num_train, config.batch_size), test_totals,
          progress.learning_rate, diverged, num_trained=num_trained, num_test=self.num_test,
          seconds=time.perf_counter() - self.start,
          compile_seconds=self.programs.compile_seconds, seeds=self.seeds))
      if epoch + 1 == self.budget.epochs_run:
        history[-1].update(test_time_accuracy(config, self.programs, state, self.data, diverged))
      global_step = self.budget.global_step(epoch, epoch_steps)
      if checkpoint_is_due(config, epoch) or self.planner.checkpoint_due(global_step):
        self.save(state, history, None)
      self.reporter.epoch(history[-1], step_time_ms=1e3 * progress.seconds / epoch_steps,
                          images_per_second=num_trained * config.num_replicas / progress.seconds)
    return state, predictions

  def train_epoch(self, state, history: list[dict], progress: epoch_calls.EpochInProgress,
                  diverged: np.ndarray):
    """Runs the rest of `progress`'s epoch, call by call; returns the state and the updated
    divergence mask. Between calls: the stop check, the divergence check, the progress bar and
    the checkpoints of `operations.checkpoint_every_steps`."""
    config, epoch = self.config, progress.epoch
    epoch_steps = self.budget.epoch_steps(epoch)
    while progress.steps_done < epoch_steps:
      first = progress.steps_done
      stop, end = self.signals.agree_on_stop_and_call_end(
          self.planner.call_end(epoch, first, epoch_steps))
      if stop:
        self.stop(stop, state, history, progress)
      call_start = time.perf_counter()
      with errors.naming_the_batch_size(config, "batch_size"):
        state, per_step = self.programs.train_steps(
            state, self.data.train_images, self.data.train_labels, self.data_key,
            np.int32(epoch), np.int32(first), np.int32(end), self.data.mean, self.data.std)
        per_step = jax.device_get(per_step)
      seconds = time.perf_counter() - call_start
      progress.add(per_step, first, end, seconds)
      self.planner.measured(end - first, seconds)
      diverged = check_divergence(
          progress.step_losses(self.num_train, config.batch_size), diverged, epoch=epoch,
          num_steps=self.budget.steps_per_epoch,
          last_checkpoint=self.store.newest_intact_position,
          checkpoint_dir=self.store.directory)
      self.reporter.steps(end - first, epoch, images_per_second=(
          (end - first) * config.batch_size * config.num_replicas / seconds))
      global_step = self.budget.global_step(epoch, end)
      if end < epoch_steps and self.planner.checkpoint_due(global_step):
        self.save(state, history, progress)
    return state, diverged

  def save(self, state, history: list[dict], progress: epoch_calls.EpochInProgress | None):
    """A checkpoint of where the run stands: after the epochs of `history`, and `progress`'s
    steps into the next one."""
    steps_done = progress.steps_done if progress is not None else 0
    epoch = len(history)
    position = self.budget.position(epoch, steps_done)
    self.store.save(self.budget.global_step(epoch, steps_done), state,
                    checkpoint_record(history, self.fingerprint, self.data_key, position,
                                      progress))

  def stop(self, signum: int, state, history: list[dict],
           progress: epoch_calls.EpochInProgress) -> None:
    """Saves a checkpoint of where the run stands (unless it has one) and raises
    `RunStopped`."""
    epoch, steps_done = len(history), progress.steps_done
    global_step = self.budget.global_step(epoch, steps_done)
    name = stopping.StopSignals.name(signum)
    if global_step == 0:
      message = f"stopped by {name} before the first step; run the same command to start again"
    else:
      if self.store.newest_intact != global_step:
        self.save(state, history, progress)
      where = self.budget.position(epoch, steps_done)
      message = (f"stopped by {name} {where}; checkpoint saved in {self.store.directory}; run "
                 f"the same command to resume")
    logging.info("%s", message)  # for log.txt; `main` prints it on stderr
    raise stopping.RunStopped(message, stopping.exit_status(signum))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the configured model, evaluating after every epoch; resumes from the workdir's
  newest intact checkpoint if it holds one of the same config, mid-epoch if it was taken there.

  Prints one JSON line per new epoch on stdout; keeps config.json, metrics.jsonl, preds, log.txt,
  checkpoints/ and tensorboard/ in `workdir` (`reporting`), locked while it runs. Returns the
  last epoch's record. Raises `UserError` for bad configs, data or workdirs before any work,
  `TrainingDiverged` when the loss stops being finite (the last good checkpoint stays), and
  `RunStopped` after a SIGTERM or SIGINT, with a checkpoint saved where it stopped (`stopping`).
  Replicas train together (`parallel.replicas`); devices split each batch (`data_parallel`)."""
  validation.validate_config(config)
  validation.check_devices(config, jax.device_count())
  files = workdir_lib.RunFiles(workdir)
  is_writer = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    if is_writer:  # the other processes of a multi-process run share process 0's workdir
      stack.enter_context(workdir_lib.holding(files))
    signals = stack.enter_context(stopping.StopSignals())
    identity = workdir_lib.run_identity(config)
    resuming = workdir_lib.check_workdir(files, identity)
    if resuming and (finished := run_setup.report_finished_run(config, files, is_writer)):
      return finished
    data = run_setup.load_data(config)
    cache_choice = compile_cache.enable(config.operations.compilation_cache)
    cache_watch = stack.enter_context(compile_cache.Watch(cache_choice))
    stack.enter_context(logs.log_file(files.log if is_writer else None))
    mesh = data_parallel.create_mesh(config.operations.num_devices)
    reporter = reporting.Reporter(config, files, is_writer=is_writer)
    conv_choice = run_setup.choose_convolutions(config, mesh)
    reporter.note(conv_choice.describe())
    # The CPU runtime's temporaries are what the allocator settings are for (`allocator`).
    malloc = allocator.describe()
    if jax.default_backend() == "cpu" and allocator.untuned():
      reporter.note(malloc)
    logging.info(malloc)
    run_setup.create_workdir(files, reporter.is_writer)
    model = models.create_model(config, data.num_classes, conv_choice.implementation)
    run_setup.check_model(config, model)
    budget = steps_lib.StepBudget.for_examples(config, len(data.train_labels))
    state, data_key = run_setup.create_run_state(config, model, budget, mesh, data)
    reporter.note(run_setup.describe_run(config, state, budget, mesh))
    store = stack.enter_context(run_setup.open_checkpoints(config, files))
    fingerprint = checkpoints.config_fingerprint(identity)
    state, history, in_progress = run_setup.restore_state_and_history(
        store, state, fingerprint, resuming, reporter)
    reporter.start(history, {workdir_lib.CONV_RECORD_KEY: conv_choice.record()},
                   total_steps=budget.total_steps, steps_done=budget.global_step(
                       len(history), in_progress.steps_done if in_progress else 0))
    stack.enter_context(reporter)
    device_data = programs_lib.put_data(data, mesh)
    run_setup.report_shapes(reporter, config, model, state, device_data)
    programs = programs_lib.Programs(config, model, state, device_data, data_key, mesh, budget,
                                     run_setup.program_store(config, cache_choice, conv_choice))
    reporter.note(reporting.compile_time_line(programs.compile_seconds, cache_watch.finish()))

    loop = TrainingLoop(config, programs, device_data, data_key, budget, store,
                        fingerprint, reporter, signals)
    state, predictions = loop.run(state, history, in_progress)
    if predictions is None:  # every epoch was already done: only the predictions may be missing
      predictions, _ = run_evaluation(programs, state, device_data)
    reporter.finish(np.asarray(jax.device_get(predictions)), history[-1])
  return history[-1]
