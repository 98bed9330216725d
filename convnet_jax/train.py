"""Training and evaluation: pure `train_step`/`eval_step`, each epoch compiled as one program,
and `train_and_evaluate`, the loop that runs them.

The whole data set lives on the device as uint8; an epoch is one compiled call that shuffles
with the PRNG key, runs `train_step` over the full batches with `lax.scan` and then over the
short last batch, so the host never waits inside an epoch. The machinery around the loop lives
in its own modules: `optim` (schedules, SGD), `parallel` (mesh, split batches), `replicas`
(models trained together), `checkpoints`, `workdir` (run files, same-run check) and `reporting`
(stdout, metrics.jsonl, TensorBoard, preds).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state as flax_train_state
from jax.experimental import multihost_utils

from convnet_jax import checkpoints
from convnet_jax import conv
from convnet_jax import input_pipeline
from convnet_jax import models
from convnet_jax import optim
from convnet_jax import parallel
from convnet_jax import replicas
from convnet_jax import reporting
from convnet_jax import validation
from convnet_jax import workdir as workdir_lib
from convnet_jax.errors import TrainingDiverged
from convnet_jax.errors import UserError

TrainState = flax_train_state.TrainState

__all__ = ["TrainState", "TrainingDiverged", "train_and_evaluate", "train_step", "eval_step"]


# ---------------------------------------------------------------------------------------------
# Steps: pure functions of (state or parameters, batch).

def create_train_state(config, model, key: jax.Array, steps_per_epoch: int, learning_rate=None,
                       momentum=None) -> TrainState:
  """Initialises the parameters from `key` and the optimiser state (see `optim.create_optimizer` for
  `learning_rate` and `momentum`)."""
  # lazy_init: the same parameters as `init`, without computing the forward pass on a dummy.
  dummy = jax.ShapeDtypeStruct((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  params = model.lazy_init(key, dummy)["params"]
  tx = optim.create_optimizer(config, steps_per_epoch, learning_rate, momentum)
  return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx,
                    opt_state=tx.init(params))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over the batch of -log softmax(logits)[label]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
  """One SGD step on a normalised batch. Returns the new state and the batch's summed loss and
  number of correct predictions (sums, so that batches of any size add up exactly)."""

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    return cross_entropy_loss(logits, labels), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  count = labels.shape[0]
  metrics = {"loss_sum": loss * count,
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)}
  return state, metrics


def eval_step(params, apply_fn: Callable, images: jax.Array, labels: jax.Array):
  """Predictions, summed loss and number correct for one normalised evaluation batch."""
  logits = apply_fn({"params": params}, images)
  predictions = jnp.argmax(logits, -1)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return predictions, {"loss_sum": jnp.sum(losses),
                       "correct": jnp.sum(predictions == labels).astype(jnp.float32)}


def _sum_metrics(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


# ---------------------------------------------------------------------------------------------
# Epochs: every step of an epoch, or the whole test set, in one compiled program.

# Folded into each epoch's key to give the augmentation its own stream of keys, so that the
# shuffle keeps using the epoch key itself (and the runs without augmentation stay as they were).
AUGMENT_KEY_STREAM = 1


def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                mean: jax.Array, std: jax.Array, *, batch_size: int, drop_last_batch: bool,
                augment: bool = False, batch_sharding=None):
  """One epoch: a fresh permutation from `key`, every example once (the last batch short unless
  `drop_last_batch`). With `augment`, each gathered uint8 batch is randomly cropped and flipped
  (`input_pipeline.augment`) before normalisation, under the key
  fold_in(fold_in(key, AUGMENT_KEY_STREAM), step index within the epoch), so every image gets a
  fresh augmentation every epoch. With `batch_sharding`, each batch is split over its devices
  (`parallel.split_batch`). Returns the new state and the epoch's summed metrics, with each
  step's mean loss under "step_losses"."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size
  order = jax.random.permutation(key, num_examples)
  augment_key = jax.random.fold_in(key, AUGMENT_KEY_STREAM)

  def step(state, batch):
    indices, step_index = batch
    # Sharding the indices makes each device gather only its own part of the batch.
    indices = parallel.split_batch(indices, batch_sharding)
    batch_images = images[indices]
    if augment:
      batch_images = input_pipeline.augment(jax.random.fold_in(augment_key, step_index),
                                            batch_images)
    batch_images = parallel.split_batch(input_pipeline.normalize(batch_images, mean, std),
                               batch_sharding)
    return train_step(state, batch_images, parallel.split_batch(labels[indices], batch_sharding))

  full_batches = order[:num_full * batch_size].reshape(num_full, batch_size)
  state, per_step = jax.lax.scan(step, state, (full_batches, jnp.arange(num_full)))
  totals = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_step)
  step_losses = per_step["loss_sum"] / batch_size
  remainder = num_examples % batch_size
  if remainder and not drop_last_batch:
    state, last = step(state, (order[num_full * batch_size:], num_full))
    totals = _sum_metrics(totals, last)
    step_losses = jnp.concatenate([step_losses, last["loss_sum"][None] / remainder])
  # Each step's mean loss, for naming the first non-finite one.
  totals["step_losses"] = step_losses
  return state, totals


def evaluate(params, images: jax.Array, labels: jax.Array, mean: jax.Array, std: jax.Array, *,
             apply_fn: Callable, batch_size: int, batch_sharding=None):
  """Evaluates on the whole set in order, in batches of `batch_size` (the last one short), as
  BatchNorm uses each batch's statistics; with `batch_sharding` each batch is split over its
  devices. Returns predictions and summed metrics."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size

  def batch_step(batch_images, batch_labels):
    batch_images = parallel.split_batch(input_pipeline.normalize(batch_images, mean, std),
                                        batch_sharding)
    return eval_step(params, apply_fn, batch_images,
                     parallel.split_batch(batch_labels, batch_sharding))

  def step(_, start):
    return None, batch_step(jax.lax.dynamic_slice_in_dim(images, start, batch_size),
                            jax.lax.dynamic_slice_in_dim(labels, start, batch_size))

  _, (predictions, per_step) = jax.lax.scan(step, None, jnp.arange(num_full) * batch_size)
  predictions = predictions.reshape(-1)
  totals = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_step)
  if num_examples % batch_size:
    start = num_full * batch_size
    last_predictions, last = batch_step(images[start:], labels[start:])
    predictions = jnp.concatenate([predictions, last_predictions])
    totals = _sum_metrics(totals, last)
  return predictions, totals


def compiler_options(run_once: bool = False) -> dict[str, Any]:
  """XLA options for the training programs on the current backend; `run_once` for a program
  that runs a single time (initialisation), where compile time is all that counts."""
  if jax.default_backend() == "cpu":
    # LLVM optimisation level 1 instead of 2: compiles the im2col epoch program ~3x faster, and
    # the step time measured the same, as its time goes to library calls, not generated code.
    # Level 0 for the initialisation: 0.6 s to compile instead of 1.2 s, and it runs once.
    return {"xla_backend_optimization_level": 0 if run_once else 1}
  return {}


def compile_train_epoch(state, images, labels, key, mean, std, *, batch_size: int,
                        drop_last_batch: bool, augment: bool = False, vmap_replicas: bool = False,
                        mesh=None):
  """Compiles `train_epoch` ahead of time for these shapes; the state argument is donated.

  `vmap_replicas`: the state and key have a leading replica axis and one program trains all
  replicas (`vmap`) on the same data, each in its own order. `mesh`: batches are split over the
  mesh's devices and the outputs (state, metrics) are mirrored on all of them.
  """
  batch_sharding = parallel.split_sharding(mesh)
  epoch = functools.partial(train_epoch, batch_size=batch_size,
                            drop_last_batch=drop_last_batch, augment=augment,
                            batch_sharding=batch_sharding)
  if vmap_replicas:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, 0, None, None))
  # Donating the state lets XLA update parameters and momenta in place.
  return jax.jit(epoch, donate_argnums=0, out_shardings=parallel.mirrored_sharding(mesh)).lower(
      state, images, labels, key, mean, std).compile(compiler_options=compiler_options())


def compile_evaluate(params, images, labels, mean, std, *, apply_fn: Callable, batch_size: int,
                     vmap_replicas: bool = False, mesh=None):
  """Compiles `evaluate` ahead of time for these shapes (`vmap_replicas`, `mesh`: as
  `compile_train_epoch`)."""
  batch_sharding = parallel.split_sharding(mesh)
  run = functools.partial(evaluate, apply_fn=apply_fn, batch_size=batch_size,
                          batch_sharding=batch_sharding)
  if vmap_replicas:
    run = jax.vmap(run, in_axes=(0, None, None, None, None))
  return jax.jit(run, out_shardings=parallel.mirrored_sharding(mesh)).lower(
      params, images, labels, mean, std).compile(compiler_options=compiler_options())


def steps_per_epoch(num_examples: int, batch_size: int, drop_last_batch: bool) -> int:
  """79 for 10,000 examples in batches of 128 (the last one 16 long) unless it is dropped."""
  if drop_last_batch:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


# ---------------------------------------------------------------------------------------------
# Setting up a run.

def create_run_state(config, model, steps: int, mesh):
  """The train state and data-order key of the run: one model, or `config.num_replicas` stacked
  along a leading axis (seed, learning rate and momentum from `replicas.replica_settings`). A
  model of seed s has the parameters and data order of `jax.random.split(jax.random.key(s))`,
  so replica i of a replicated run starts exactly as a single run of its seed."""
  settings = replicas.replica_settings(config)
  stacked = config.num_replicas > 1

  def create(seed, learning_rate, momentum):
    init_key, data_key = jax.random.split(jax.random.key(seed))
    state = create_train_state(config, model, init_key, steps, learning_rate, momentum)
    return state, data_key

  if stacked:
    create = jax.vmap(create)
  args = [np.asarray(values if stacked else values[0]) for values in settings.values()]
  args[1:] = [np.asarray(value, np.float32) for value in args[1:]]
  state, data_key = jax.jit(create, out_shardings=parallel.mirrored_sharding(mesh)).lower(
      *args).compile(compiler_options=compiler_options(run_once=True))(*args)
  logging.info("model %s: %d parameters x %d replicas; %d steps per epoch on %d devices",
               config.model, models.count_parameters(state.params) // config.num_replicas,
               config.num_replicas, steps, parallel.mesh_size(mesh))
  # The optimiser built inside `jit` only served to initialise: its hyperparameters are in
  # `opt_state`, and a concrete one is kept for the updates.
  return state.replace(tx=optim.create_optimizer(config, steps)), data_key


def check_inputs(config, workdir: str | Path):
  """Every check that can fail on user input, before any compilation: the config, the devices,
  the workdir (returns whether it holds this run to resume) and the data, which it loads.
  Returns (run files, run identity, resuming, data set)."""
  validation.validate_config(config)
  validation.check_devices(config, jax.device_count())
  files = workdir_lib.RunFiles(workdir)
  identity = workdir_lib.run_identity(config)
  resuming = workdir_lib.check_workdir(files, identity)
  data = input_pipeline.load_dataset(config)
  validation.check_batch_sizes(config, len(data.train_labels))
  return files, identity, resuming, data


def choose_convolutions(config, mesh) -> conv.ConvChoice:
  """The convolution path of this run (`conv.choose_conv_implementation`); `UserError` when
  the one asked for cannot run here."""
  try:
    return conv.choose_conv_implementation(config.conv_implementation, config.dtype,
                                           parallel.mesh_size(mesh))
  except conv.ConvUnavailable as error:
    raise UserError(f"config.conv_implementation={config.conv_implementation!r}: "
                    f"{error}") from None


def create_workdir(files: workdir_lib.RunFiles, is_writer: bool) -> None:
  """Creates the workdir, once every process of a multi-process run has checked it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("convnet_jax: workdir checked")
  if is_writer:
    files.workdir.mkdir(parents=True, exist_ok=True)


def restore_history(store: checkpoints.CheckpointStore, state, fingerprint: str,
                    resuming: bool, reporter: reporting.Reporter):
  """(state, history): restored from the newest intact checkpoint when resuming and there is
  one, else the fresh `state` and no history."""
  if not resuming:
    return state, []
  try:
    restored = store.restore_latest(state, fingerprint)
  except checkpoints.ForeignCheckpointError as error:
    raise UserError(str(error)) from None
  if restored is None:
    return state, []
  state, record = restored
  history = record["history"]
  logging.info("resuming from %s after epoch %d", store.directory, len(history))
  reporter.note(f"resuming after epoch {len(history) - 1} from {store.directory}")
  return state, history


class DeviceData(NamedTuple):
  """The data set on the device(s), as uint8 images and int labels, with the channel
  statistics that normalise it."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array


def put_data(data: input_pipeline.Dataset, mesh) -> DeviceData:
  """The whole data set on the device(s) once, mirrored on every device of a mesh."""
  return DeviceData(*parallel.put_mirrored(
      (data.train_images, data.train_labels, data.test_images, data.test_labels, data.mean,
       data.std), mesh))


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
  """The key of one epoch's data order and augmentation (one per replica for stacked keys)."""
  if data_key.ndim:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(data_key, epoch)
  return jax.random.fold_in(data_key, epoch)


class Programs(NamedTuple):
  """The run's compiled programs: (state, data, key) -> (state, totals) for a training epoch,
  (params, test data) -> (predictions, totals) for an evaluation."""
  train_epoch: Callable
  evaluate: Callable
  compile_seconds: float


def compile_programs(config, model, state, data: DeviceData, data_key: jax.Array,
                     mesh) -> Programs:
  """Compiles the training epoch and the evaluation for this run's shapes."""
  start = time.perf_counter()
  stacked = config.num_replicas > 1
  run_epoch = compile_train_epoch(
      state, data.train_images, data.train_labels, epoch_key(data_key, 0), data.mean, data.std,
      batch_size=config.batch_size, drop_last_batch=config.drop_last_batch,
      augment=config.augment, vmap_replicas=stacked, mesh=mesh)
  run_eval = compile_evaluate(state.params, data.test_images, data.test_labels, data.mean,
                              data.std, apply_fn=model.apply, batch_size=config.eval_batch_size,
                              vmap_replicas=stacked, mesh=mesh)
  seconds = time.perf_counter() - start
  logging.info("compiled the epoch and evaluation programs in %.2f s", seconds)
  return Programs(run_epoch, run_eval, seconds)


def report_shapes(reporter: reporting.Reporter, config, model, state, data: DeviceData) -> None:
  """With `operations.trace_shapes`, the shapes of a training step of the first model (replica
  0 when stacked) on stderr."""
  if not config.operations.trace_shapes:
    return
  params = state.params
  if config.num_replicas > 1:
    params = jax.tree_util.tree_map(lambda x: x[0], params)
  images = data.train_images[:config.batch_size].astype(jnp.float32)
  for line in reporting.shape_trace(model, params, images,
                                    data.train_labels[:config.batch_size]):
    reporter.note(line)


# ---------------------------------------------------------------------------------------------
# One epoch of the loop.

def run_evaluation(programs: Programs, state, data: DeviceData):
  """Test predictions and summed test metrics (on the device) of the state's parameters."""
  return programs.evaluate(state.params, data.test_images, data.test_labels, data.mean,
                           data.std)


def run_epoch(programs: Programs, state, data: DeviceData, key: jax.Array):
  """Trains one epoch and evaluates the result. Returns the new state, the test predictions
  and the training and test totals on the host, in float64 so that an accuracy is exactly
  correct / count."""
  state, train_totals = programs.train_epoch(state, data.train_images, data.train_labels, key,
                                             data.mean, data.std)
  predictions, test_totals = run_evaluation(programs, state, data)
  train_totals, test_totals = jax.tree_util.tree_map(
      lambda x: np.asarray(x, np.float64), jax.device_get((train_totals, test_totals)))
  return state, predictions, train_totals, test_totals


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
          or epoch + 1 == config.num_epochs)


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
  files, identity, resuming, data = check_inputs(config, workdir)
  mesh = parallel.create_mesh(config.operations.num_devices)
  reporter = reporting.Reporter(config, files, is_writer=jax.process_index() == 0)
  conv_choice = choose_convolutions(config, mesh)
  reporter.note(conv_choice.describe())
  create_workdir(files, reporter.is_writer)

  model = models.create_model(config, data.num_classes, conv_choice.implementation)
  num_steps = steps_per_epoch(len(data.train_labels), config.batch_size, config.drop_last_batch)
  num_trained = (num_steps * config.batch_size if config.drop_last_batch
                 else len(data.train_labels))
  state, data_key = create_run_state(config, model, num_steps, mesh)
  store = checkpoints.CheckpointStore(files.checkpoints,
                                      config.operations.max_checkpoints_to_keep)
  fingerprint = checkpoints.config_fingerprint(identity)
  state, history = restore_history(store, state, fingerprint, resuming, reporter)
  reporter.start(history, {workdir_lib.CONV_RECORD_KEY: conv_choice.record()})

  device_data = put_data(data, mesh)
  report_shapes(reporter, config, model, state, device_data)
  programs = compile_programs(config, model, state, device_data, data_key, mesh)
  reporter.note(f"compile time: {programs.compile_seconds:.2f} s")

  diverged = initial_divergence(config, history)
  seeds = replicas.replica_settings(config)["seed"] if config.num_replicas > 1 else None
  predictions, start = None, time.perf_counter()
  with reporter, contextlib.closing(store):
    for epoch in range(len(history), config.num_epochs):
      learning_rate = optim.current_learning_rate(config, num_steps, state)
      epoch_start = time.perf_counter()
      state, predictions, train_totals, test_totals = run_epoch(
          programs, state, device_data, epoch_key(data_key, epoch))
      epoch_seconds = time.perf_counter() - epoch_start
      diverged = check_divergence(train_totals["step_losses"], diverged, epoch=epoch,
                                  num_steps=num_steps, last_checkpoint=store.newest_intact,
                                  checkpoint_dir=files.checkpoints)
      history.append(epoch_record(
          epoch, train_totals, test_totals, learning_rate, diverged, num_trained=num_trained,
          num_test=len(data.test_labels), seconds=time.perf_counter() - start,
          compile_seconds=programs.compile_seconds, seeds=seeds))
      if checkpoint_is_due(config, epoch):
        store.save(epoch + 1, state, checkpoint_record(history, fingerprint, data_key))
      reporter.epoch(history[-1], step_time_ms=1e3 * epoch_seconds / num_steps,
                     images_per_second=num_trained * config.num_replicas / epoch_seconds)
  if predictions is None:  # every epoch was already done: only the predictions may be missing
    predictions, _ = run_evaluation(programs, state, device_data)
  reporter.finish(np.asarray(jax.device_get(predictions)), history[-1])
  return history[-1]
