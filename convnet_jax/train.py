"""Training and evaluation: pure `train_step`/`eval_step`, each epoch compiled as one program.

The whole data set lives on the device as uint8; an epoch is one compiled call that shuffles
with the PRNG key, runs `train_step` over the full batches with `lax.scan` and then over the
short last batch, so the host never waits inside an epoch.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state as flax_train_state

from convnet_jax import checkpoints
from convnet_jax import input_pipeline
from convnet_jax import models
from convnet_jax import validation
from convnet_jax.errors import UserError

TrainState = flax_train_state.TrainState


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step, from `config.schedule`:

  * "linear": from `learning_rate` to 0 over all of training (the seed run);
  * "step": `learning_rate`, multiplied by `lr_decay_factor` at each epoch of
    `lr_boundaries_epochs`, from the first step of that epoch on (PyTorch's MultiStepLR stepped
    once per epoch);
  * "cosine": learning_rate * (1 + cos(pi * step / total_steps)) / 2, reaching 0 at the end.
  """
  total_steps = config.num_epochs * steps_per_epoch
  schedule = config.schedule
  if schedule == "linear":
    return optax.linear_schedule(config.learning_rate, 0.0, transition_steps=total_steps)
  if schedule == "step":
    return optax.piecewise_constant_schedule(
        config.learning_rate,
        {epoch * steps_per_epoch: config.lr_decay_factor for epoch in config.lr_boundaries_epochs})
  if schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate, decay_steps=total_steps)
  raise ValueError(f"unknown schedule {schedule!r}")


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with PyTorch's momentum formulation: v = m v + g; w = w - lr v (Nesterov:
  w = w - lr (g + m v)).

  Weight decay is PyTorch SGD's: g = g + weight_decay * w before the momentum, on every parameter
  (convolution and linear weights, the linear bias and BatchNorm's scale and offset alike), as the
  PyTorch CIFAR tutorial applies it to `model.parameters()`.
  """
  sgd = optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov)
  weight_decay = config.weight_decay
  if not weight_decay:
    return sgd
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd)


def create_train_state(config, model, key: jax.Array, learning_rate_fn) -> TrainState:
  """Initialises the parameters from `key` and the optimiser state."""
  dummy = jnp.zeros((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  params = model.init(key, dummy)["params"]
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=create_optimizer(config, learning_rate_fn))


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


# Folded into each epoch's key to give the augmentation its own stream of keys, so that the
# shuffle keeps using the epoch key itself (and the runs without augmentation stay as they were).
AUGMENT_KEY_STREAM = 1


def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                mean: jax.Array, std: jax.Array, *, batch_size: int, drop_last_batch: bool,
                augment: bool = False):
  """One epoch: a fresh permutation from `key`, every example once (the last batch short unless
  `drop_last_batch`). With `augment`, each gathered uint8 batch is randomly cropped and flipped
  (`input_pipeline.augment`) before normalisation, under the key
  fold_in(fold_in(key, AUGMENT_KEY_STREAM), step index within the epoch), so every image gets a
  fresh augmentation every epoch. Returns the new state and the epoch's summed metrics, with each
  step's mean loss under "step_losses"."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size
  order = jax.random.permutation(key, num_examples)
  augment_key = jax.random.fold_in(key, AUGMENT_KEY_STREAM)

  def step(state, batch):
    indices, step_index = batch
    batch_images = images[indices]
    if augment:
      batch_images = input_pipeline.augment(jax.random.fold_in(augment_key, step_index),
                                            batch_images)
    batch_images = input_pipeline.normalize(batch_images, mean, std)
    return train_step(state, batch_images, labels[indices])

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
             apply_fn: Callable, batch_size: int):
  """Evaluates on the whole set in order, in batches of `batch_size` (the last one short), as
  BatchNorm uses each batch's statistics. Returns predictions and summed metrics."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size

  def step(_, start):
    batch_images = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
    batch_labels = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
    return None, eval_step(params, apply_fn, input_pipeline.normalize(batch_images, mean, std),
                           batch_labels)

  _, (predictions, per_step) = jax.lax.scan(step, None, jnp.arange(num_full) * batch_size)
  predictions = predictions.reshape(-1)
  totals = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_step)
  if num_examples % batch_size:
    start = num_full * batch_size
    last_predictions, last = eval_step(
        params, apply_fn, input_pipeline.normalize(images[start:], mean, std), labels[start:])
    predictions = jnp.concatenate([predictions, last_predictions])
    totals = _sum_metrics(totals, last)
  return predictions, totals


def compiler_options() -> dict[str, Any]:
  """XLA options for the training programs on the current backend."""
  if jax.default_backend() == "cpu":
    # LLVM optimisation level 1 instead of 2: compiles the epoch program ~3x faster, and the
    # step time measured the same, as its time goes to library matmuls, not generated code.
    return {"xla_backend_optimization_level": 1}
  return {}


def compile_train_epoch(state, images, labels, key, mean, std, *, batch_size: int,
                        drop_last_batch: bool, augment: bool = False):
  """Compiles `train_epoch` ahead of time for these shapes; the state argument is donated."""
  # Donating the state lets XLA update parameters and momenta in place.
  return jax.jit(functools.partial(train_epoch, batch_size=batch_size,
                                   drop_last_batch=drop_last_batch, augment=augment),
                 donate_argnums=0).lower(state, images, labels, key, mean, std).compile(
                     compiler_options=compiler_options())


def compile_evaluate(params, images, labels, mean, std, *, apply_fn: Callable, batch_size: int):
  """Compiles `evaluate` ahead of time for these shapes."""
  return jax.jit(functools.partial(evaluate, apply_fn=apply_fn, batch_size=batch_size)).lower(
      params, images, labels, mean, std).compile(compiler_options=compiler_options())


def steps_per_epoch(num_examples: int, batch_size: int, drop_last_batch: bool) -> int:
  """79 for 10,000 examples in batches of 128 (the last one 16 long) unless it is dropped."""
  if drop_last_batch:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def shape_trace(model, params, images: jax.Array, labels: jax.Array) -> list[str]:
  """Reference-style trace of a training step's shapes: input, target, each layer, pooled
  features (named by the model's `global_pool_name`) and output."""
  lines = [f"input: {tuple(images.shape)}", f"target: {tuple(labels.shape)}"]
  layers = models.describe_shapes(model, params, images)
  for line in layers:
    if line.startswith("head "):
      pooled = line.split(": ", 1)[1].split(" -> ")[0]
      lines.append(f"{model.global_pool_name}: {pooled}")
    lines.append(line)
  output = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images)
  lines.append(f"output: {tuple(output.shape)}")
  return lines


class RunFiles:
  """The paths of a workdir's outputs."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.config = self.workdir / "config.json"
    self.metrics = self.workdir / "metrics.jsonl"
    self.predictions = self.workdir / "preds"
    self.checkpoints = self.workdir / "checkpoints"
    self.tensorboard = self.workdir / "tensorboard"


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the step and epoch."""


def _write_atomically(path: Path, text: str) -> None:
  """Writes via a temporary file and a rename, so a kill never leaves a half-written file."""
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text)
  temporary.replace(path)


def _first_nonfinite_step(step_losses) -> int | None:
  bad = np.flatnonzero(~np.isfinite(np.asarray(step_losses)))
  return int(bad[0]) if bad.size else None


def _progress_bar(config, total: int, done: int):
  """An epoch progress bar with ETA on stderr, only when stderr is a terminal."""
  import tqdm  # imported here: only interactive runs draw one

  enabled = config.progress_bar and sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=done, unit="epoch", disable=not enabled,
                   file=sys.stderr, dynamic_ncols=True)


def _tensorboard_writer(config, files: RunFiles):
  if not config.tensorboard:
    return None
  import tensorboardX  # imported here: writes event files without TensorFlow

  return tensorboardX.SummaryWriter(str(files.tensorboard))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the configured model, evaluating after every epoch; resumes from the workdir's
  newest intact checkpoint if it holds one of the same config.

  Prints one JSON line per new epoch on stdout and keeps in `workdir`: config.json,
  metrics.jsonl (every epoch so far), preds (final test predictions, one integer per line, in
  test order), checkpoints/ (orbax) and tensorboard/ (event files). Returns the last epoch's
  metrics. Raises `UserError` for bad configs, data or workdirs before any work, and
  `TrainingDiverged` when the loss stops being finite (the last good checkpoint stays).
  """
  validation.validate_config(config)
  files = RunFiles(workdir)
  identity = validation.run_identity(config)
  resuming = validation.check_workdir(files, identity)

  data = input_pipeline.load_dataset(config)
  validation.check_batch_sizes(config, len(data.train_labels))
  files.workdir.mkdir(parents=True, exist_ok=True)

  model = models.create_model(config, data.num_classes)
  num_steps = steps_per_epoch(len(data.train_labels), config.batch_size, config.drop_last_batch)
  learning_rate_fn = create_learning_rate_fn(config, num_steps)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(functools.partial(create_train_state, config, model,
                                    learning_rate_fn=learning_rate_fn))(init_key)
  logging.info("model %s: %d parameters; %d steps per epoch", config.model,
               models.count_parameters(state.params), num_steps)

  store = checkpoints.CheckpointStore(files.checkpoints, config.max_checkpoints_to_keep)
  fingerprint = checkpoints.config_fingerprint(identity)
  history: list[dict[str, Any]] = []
  if resuming:
    try:
      restored = store.restore_latest(state, fingerprint)
    except checkpoints.ForeignCheckpointError as error:
      raise UserError(str(error)) from None
    if restored is not None:
      state, record = restored
      history = record["history"]
      logging.info("resuming from %s after epoch %d", files.checkpoints, len(history))
      print(f"resuming after epoch {len(history) - 1} from {files.checkpoints}", file=sys.stderr)
  # Epochs after the newest checkpoint are recomputed, so the file restarts from its history.
  _write_atomically(files.metrics, "".join(json.dumps(r) + "\n" for r in history))
  _write_atomically(files.config, config.to_json_best_effort(indent=2) + "\n")

  # The whole data set goes to the device once, as uint8.
  train_images, train_labels = jax.device_put((data.train_images, data.train_labels))
  test_images, test_labels = jax.device_put((data.test_images, data.test_labels))
  mean, std = jax.device_put((data.mean, data.std))

  if config.trace_shapes:
    batch = train_images[:config.batch_size].astype(jnp.float32)
    for line in shape_trace(model, state.params, batch, train_labels[:config.batch_size]):
      print(line, file=sys.stderr)

  compile_start = time.perf_counter()
  run_epoch = compile_train_epoch(state, train_images, train_labels, data_key, mean, std,
                                  batch_size=config.batch_size,
                                  drop_last_batch=config.drop_last_batch,
                                  augment=config.augment)
  run_eval = compile_evaluate(state.params, test_images, test_labels, mean, std,
                              apply_fn=model.apply, batch_size=config.eval_batch_size)
  compile_seconds = time.perf_counter() - compile_start
  logging.info("compiled the epoch and evaluation programs in %.2f s", compile_seconds)
  print(f"compile time: {compile_seconds:.2f} s", file=sys.stderr)

  num_train, num_test = len(data.train_labels), len(data.test_labels)
  num_seen = num_steps * config.batch_size if config.drop_last_batch else num_train
  writer = _tensorboard_writer(config, files)
  progress = _progress_bar(config, config.num_epochs, len(history))
  predictions = None
  saved_epochs = len(history)  # epochs in the newest checkpoint on disk
  start = time.perf_counter()
  try:
    for epoch in range(len(history), config.num_epochs):
      learning_rate = float(learning_rate_fn(state.step))
      epoch_start = time.perf_counter()
      state, train_totals = run_epoch(state, train_images, train_labels,
                                      jax.random.fold_in(data_key, epoch), mean, std)
      predictions, test_totals = run_eval(state.params, test_images, test_labels, mean, std)
      train_totals, test_totals = jax.device_get((train_totals, test_totals))
      bad_step = _first_nonfinite_step(train_totals["step_losses"])
      if bad_step is not None:
        kept = f"after epoch {saved_epochs - 1}" if saved_epochs else "none yet"
        raise TrainingDiverged(
            f"non-finite loss at step {epoch * num_steps + bad_step} (epoch {epoch}, step "
            f"{bad_step} of the epoch); the last good checkpoint ({kept}) is kept in "
            f"{files.checkpoints}")
      epoch_seconds = time.perf_counter() - epoch_start
      record = {
          "epoch": epoch,
          "test_acc": float(test_totals["correct"]) / num_test,
          "time": round(time.perf_counter() - start, 3),
          "train_loss": float(train_totals["loss_sum"]) / num_seen,
          "train_acc": float(train_totals["correct"]) / num_seen,
          "test_loss": float(test_totals["loss_sum"]) / num_test,
          "learning_rate": learning_rate,
          "compile_time": round(compile_seconds, 3),
      }
      history.append(record)
      if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
        store.save(epoch + 1, state, {"history": history, "config_fingerprint": fingerprint,
                                      "data_key": np.asarray(
                                          jax.random.key_data(data_key)).tolist()})
        saved_epochs = epoch + 1
      line = json.dumps(record)
      print(line, flush=True)
      with files.metrics.open("a") as metrics_file:
        metrics_file.write(line + "\n")
      if writer is not None:
        for name in ("train_loss", "train_acc", "test_loss", "test_acc", "learning_rate"):
          writer.add_scalar(name, record[name], epoch + 1)
        writer.add_scalar("step_time_ms", 1e3 * epoch_seconds / num_steps, epoch + 1)
        writer.add_scalar("images_per_second", num_seen / epoch_seconds, epoch + 1)
        writer.flush()
      progress.update(1)
  finally:
    progress.close()
    store.close()
    if writer is not None:
      writer.close()
  if predictions is None:  # every epoch was already done: only the predictions may be missing
    predictions, _ = run_eval(state.params, test_images, test_labels, mean, std)
  _write_atomically(files.predictions, "".join(f"{p}\n" for p in np.asarray(predictions)))
  return history[-1]
