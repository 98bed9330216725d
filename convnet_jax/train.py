"""Training: `train_and_evaluate`, the loop that runs the compiled epochs of `steps` and evaluates
after each, and its per-epoch pieces.

The machinery around the loop lives in its own modules: `steps` (the pure train and eval steps
and the epoch programs), `run_setup` (checks, state, data on the device, compiled programs),
`optim` (schedules, SGD), `parallel` (mesh, split batches), `replicas` (models trained
together), `checkpoints`, `workdir` (run files, same-run check) and `reporting` (stdout,
metrics.jsonl, TensorBoard, preds).
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

from convnet_jax import checkpoints
from convnet_jax import models
from convnet_jax import optim
from convnet_jax import parallel
from convnet_jax import replicas
from convnet_jax import reporting
from convnet_jax import run_setup
from convnet_jax import steps as steps_lib
from convnet_jax import workdir as workdir_lib
from convnet_jax.errors import TrainingDiverged

__all__ = ["TrainingDiverged", "train_and_evaluate"]


# ---------------------------------------------------------------------------------------------
# One epoch of the loop.

def run_evaluation(programs: run_setup.Programs, state, data: run_setup.DeviceData,
                   test_time_augmentation: str = "none"):
  """Test predictions and summed test metrics (on the device) of the state's parameters."""
  return programs.evaluate(test_time_augmentation)(state.params, data.test_images,
                                                   data.test_labels, data.mean, data.std)


def _host_totals(totals):
  # float64 on the host, so that an accuracy is exactly correct / count.
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(totals))


def run_epoch(programs: run_setup.Programs, state, data: run_setup.DeviceData,
              data_key: jax.Array, epoch: int, num_steps: int):
  """Trains `num_steps` steps of epoch `epoch` and evaluates the result. Returns the new state,
  the test predictions and the training and test totals on the host."""
  state, train_totals = programs.train_epoch(num_steps)(
      state, data.train_images, data.train_labels, data_key, np.int32(epoch), data.mean,
      data.std)
  predictions, test_totals = run_evaluation(programs, state, data)
  train_totals, test_totals = _host_totals((train_totals, test_totals))
  return state, predictions, train_totals, test_totals


def test_time_accuracy(config, programs: run_setup.Programs, state,
                       data: run_setup.DeviceData, diverged: np.ndarray) -> dict[str, Any]:
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
                     num_steps: int, last_checkpoint: int | None, checkpoint_dir: Path):
  """The updated mask of diverged replicas after an epoch with these step losses (one row per
  replica). Raises `TrainingDiverged`, naming the first bad step and the checkpoint kept, when
  every model's loss has stopped being finite."""
  bad_steps = replicas.first_nonfinite_steps(step_losses)
  stacked = bad_steps.ndim > 0
  if np.all(bad_steps >= 0):
    bad_step = int(np.min(bad_steps))
    kept = f"after epoch {last_checkpoint - 1}" if last_checkpoint else "none yet"
    subject = "loss in every replica" if stacked else "loss"
    raise TrainingDiverged(
        f"non-finite {subject} at step {epoch * num_steps + bad_step} (epoch {epoch}, step "
        f"{bad_step} of the epoch); the last good checkpoint ({kept}) is kept in "
        f"{checkpoint_dir}")
  for replica in np.flatnonzero((bad_steps >= 0) & ~diverged):
    logging.warning("replica %d: non-finite loss at step %d of epoch %d; it goes on as null",
                    replica, bad_steps[replica], epoch)
  return diverged | (bad_steps >= 0)


def epoch_record(epoch: int, train_totals: dict, test_totals: dict, learning_rate: np.ndarray,
                 diverged: np.ndarray, *, num_trained: int, num_test: int, seconds: float,
                 compile_seconds: float, seeds: list[int] | None = None) -> dict[str, Any]:
  """The epoch's JSON record: mean losses and accuracies over the `num_trained` examples seen
  and the `num_test` test examples, the learning rate the epoch started with, the seconds since
  the loop started and the compile time. Replicas (`seeds` given): each metric one value per
  replica (null once diverged), the test accuracy summary, the diverged ones and the seeds."""
  def values(metric):
    return replicas.metric_values(metric, diverged)

  record = {
      "epoch": epoch,
      "test_acc": values(test_totals["correct"] / num_test),
      "time": round(seconds, 3),
      "train_loss": values(train_totals["loss_sum"] / num_trained),
      "train_acc": values(train_totals["correct"] / num_trained),
      "test_loss": values(test_totals["loss_sum"] / num_test),
      "learning_rate": replicas.metric_values(learning_rate, np.zeros_like(diverged)),
      "compile_time": round(compile_seconds, 3),
  }
  if seeds is not None:
    record.update(replicas.replica_summary(record["test_acc"]),
                  diverged=np.flatnonzero(diverged).tolist(), seeds=seeds)
  return record


def checkpoint_is_due(config, epoch: int) -> bool:
  """Every `operations.checkpoint_every_epochs` epochs, and after the last."""
  return ((epoch + 1) % config.operations.checkpoint_every_epochs == 0
          or epoch + 1 == optim.num_epochs_run(config))


def checkpoint_record(history: list[dict], fingerprint: str, data_key: jax.Array) -> dict:
  """What a checkpoint keeps beside the state: the metrics so far, the config fingerprint and
  the data-order key."""
  return {"history": history, "config_fingerprint": fingerprint,
          "data_key": np.asarray(jax.random.key_data(data_key)).tolist()}


# ---------------------------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the configured model, evaluating after every epoch; resumes from the workdir's
  newest intact checkpoint if it holds one of the same config.

  Prints one JSON line per new epoch on stdout; keeps config.json, metrics.jsonl, preds,
  checkpoints/ and tensorboard/ in `workdir` (see `reporting`). Returns the last epoch's record.
  Raises `UserError` for bad configs, data or workdirs before any work, and `TrainingDiverged`
  when the loss stops being finite (the last good checkpoint stays). Replicas (`num_replicas` >
  1) train together, see `replicas`; several devices split each batch, see `parallel`.
  """
  files, identity, resuming, data = run_setup.check_inputs(config, workdir)
  mesh = parallel.create_mesh(config.operations.num_devices)
  reporter = reporting.Reporter(config, files, is_writer=jax.process_index() == 0)
  conv_choice = run_setup.choose_convolutions(config, mesh)
  reporter.note(conv_choice.describe())
  run_setup.create_workdir(files, reporter.is_writer)

  model = models.create_model(config, data.num_classes, conv_choice.implementation)
  run_setup.check_model(config, model)
  num_steps = steps_lib.steps_per_epoch(len(data.train_labels), config.batch_size,
                                        config.drop_last_batch)
  state, data_key = run_setup.create_run_state(config, model, num_steps, mesh, data)
  store = checkpoints.CheckpointStore(files.checkpoints,
                                      config.operations.max_checkpoints_to_keep)
  fingerprint = checkpoints.config_fingerprint(identity)
  state, history = run_setup.restore_history(store, state, fingerprint, resuming, reporter)
  reporter.start(history, {workdir_lib.CONV_RECORD_KEY: conv_choice.record()})

  device_data = run_setup.put_data(data, mesh)
  run_setup.report_shapes(reporter, config, model, state, device_data)
  programs = run_setup.Programs(config, model, state, device_data, data_key, mesh, num_steps)
  reporter.note(f"compile time: {programs.compile_seconds:.2f} s")

  diverged = initial_divergence(config, history)
  seeds = replicas.replica_settings(config)["seed"] if config.num_replicas > 1 else None
  predictions, start = None, time.perf_counter()
  with reporter, contextlib.closing(store):
    for epoch in range(len(history), optim.num_epochs_run(config)):
      learning_rate = optim.current_learning_rate(config, num_steps, state)
      steps_this_epoch = optim.epoch_steps(config, num_steps, epoch)
      epoch_start = time.perf_counter()
      state, predictions, train_totals, test_totals = run_epoch(
          programs, state, device_data, data_key, epoch, steps_this_epoch)
      epoch_seconds = time.perf_counter() - epoch_start
      diverged = check_divergence(train_totals["step_losses"], diverged, epoch=epoch,
                                  num_steps=num_steps, last_checkpoint=store.newest_intact,
                                  checkpoint_dir=files.checkpoints)
      num_trained = examples_trained(config, len(data.train_labels), num_steps,
                                     steps_this_epoch)
      history.append(epoch_record(
          epoch, train_totals, test_totals, learning_rate, diverged, num_trained=num_trained,
          num_test=len(data.test_labels), seconds=time.perf_counter() - start,
          compile_seconds=programs.compile_seconds, seeds=seeds))
      if epoch + 1 == optim.num_epochs_run(config):
        history[-1].update(test_time_accuracy(config, programs, state, device_data, diverged))
      if checkpoint_is_due(config, epoch):
        store.save(epoch + 1, state, checkpoint_record(history, fingerprint, data_key))
      reporter.epoch(history[-1], step_time_ms=1e3 * epoch_seconds / steps_this_epoch,
                     images_per_second=num_trained * config.num_replicas / epoch_seconds)
  if predictions is None:  # every epoch was already done: only the predictions may be missing
    predictions, _ = run_evaluation(programs, state, device_data)
  reporter.finish(np.asarray(jax.device_get(predictions)), history[-1])
  return history[-1]
