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
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from convnet_jax import checkpoints
from convnet_jax import conv
from convnet_jax import input_pipeline
from convnet_jax import models
from convnet_jax import validation
from convnet_jax.errors import UserError

TrainState = flax_train_state.TrainState

# The mesh axis that data parallelism splits batches over.
DATA_AXIS = "data"


def create_learning_rate_fn(config, steps_per_epoch: int,
                            peak: float | None = None) -> optax.Schedule:
  """The learning rate at each step, from `config.schedule`, with `peak` (default
  `config.learning_rate`) as the largest value:

  * "linear": from the peak to 0 over all of training (the seed run);
  * "step": the peak, multiplied by `lr_decay_factor` at each epoch of `lr_boundaries_epochs`,
    from the first step of that epoch on (PyTorch's MultiStepLR stepped once per epoch);
  * "cosine": peak * (1 + cos(pi * step / total_steps)) / 2, reaching 0 at the end.
  """
  peak = config.learning_rate if peak is None else peak
  total_steps = config.num_epochs * steps_per_epoch
  schedule = config.schedule
  if schedule == "linear":
    return optax.linear_schedule(peak, 0.0, transition_steps=total_steps)
  if schedule == "step":
    return optax.piecewise_constant_schedule(
        peak,
        {epoch * steps_per_epoch: config.lr_decay_factor for epoch in config.lr_boundaries_epochs})
  if schedule == "cosine":
    return optax.cosine_decay_schedule(peak, decay_steps=total_steps)
  raise ValueError(f"unknown schedule {schedule!r}")


def create_optimizer(config, steps_per_epoch: int, learning_rate=None,
                     momentum=None) -> optax.GradientTransformation:
  """SGD with PyTorch's momentum formulation: v = m v + g; w = w - lr(t) v (Nesterov:
  w = w - lr(t) (g + m v)), lr(t) = learning_rate * the schedule's shape (`config.schedule`
  with peak 1).

  `learning_rate` (the peak, default `config.learning_rate`) and `momentum` (default
  `config.momentum`) live in the optimiser state (`optax.inject_hyperparams`), not in the
  compiled program, so replicas trained together under `vmap` can each have their own and a
  checkpoint records them.

  Weight decay is PyTorch SGD's: g = g + weight_decay * w before the momentum, on every parameter
  (convolution and linear weights, the linear bias and BatchNorm's scale and offset alike), as the
  PyTorch CIFAR tutorial applies it to `model.parameters()`.
  """
  shape = create_learning_rate_fn(config, steps_per_epoch, peak=1.0)

  def sgd(learning_rate, momentum):
    decay = (optax.add_decayed_weights(config.weight_decay) if config.weight_decay
             else optax.identity())
    return optax.chain(decay, optax.trace(decay=momentum, nesterov=config.nesterov),
                       optax.scale_by_schedule(lambda count: -learning_rate * shape(count)))

  return optax.inject_hyperparams(sgd)(
      learning_rate=config.learning_rate if learning_rate is None else learning_rate,
      momentum=config.momentum if momentum is None else momentum)


def current_learning_rate(config, steps_per_epoch: int, state) -> np.ndarray:
  """The learning rate of the state's next step (one per replica for replicated states)."""
  shape = create_learning_rate_fn(config, steps_per_epoch, peak=1.0)
  hyperparams = jax.device_get(state.opt_state.hyperparams)
  return np.asarray(hyperparams["learning_rate"]) * np.asarray(
      shape(jax.device_get(state.step)))


def create_train_state(config, model, key: jax.Array, steps_per_epoch: int, learning_rate=None,
                       momentum=None) -> TrainState:
  """Initialises the parameters from `key` and the optimiser state (see `create_optimizer` for
  `learning_rate` and `momentum`)."""
  # lazy_init: the same parameters as `init`, without computing the forward pass on a dummy.
  dummy = jax.ShapeDtypeStruct((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  params = model.lazy_init(key, dummy)["params"]
  tx = create_optimizer(config, steps_per_epoch, learning_rate, momentum)
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


# Folded into each epoch's key to give the augmentation its own stream of keys, so that the
# shuffle keeps using the epoch key itself (and the runs without augmentation stay as they were).
AUGMENT_KEY_STREAM = 1


def shard_batch(batch: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  """Splits a batch (leading axis) over the data-parallel devices of `sharding`. The math is
  unchanged: the compiler partitions the step and all-reduces what spans the global batch (the
  gradients, the loss and BatchNorm's mean and variance), so results match one device. A batch
  that does not divide evenly (a short last batch) stays whole on every device."""
  if sharding is None or batch.shape[0] % sharding.mesh.size:
    return batch
  return jax.lax.with_sharding_constraint(batch, sharding)


def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                mean: jax.Array, std: jax.Array, *, batch_size: int, drop_last_batch: bool,
                augment: bool = False, batch_sharding: NamedSharding | None = None):
  """One epoch: a fresh permutation from `key`, every example once (the last batch short unless
  `drop_last_batch`). With `augment`, each gathered uint8 batch is randomly cropped and flipped
  (`input_pipeline.augment`) before normalisation, under the key
  fold_in(fold_in(key, AUGMENT_KEY_STREAM), step index within the epoch), so every image gets a
  fresh augmentation every epoch. With `batch_sharding`, each batch is split over its devices
  (`shard_batch`). Returns the new state and the epoch's summed metrics, with each step's mean
  loss under "step_losses"."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size
  order = jax.random.permutation(key, num_examples)
  augment_key = jax.random.fold_in(key, AUGMENT_KEY_STREAM)

  def step(state, batch):
    indices, step_index = batch
    # Sharding the indices makes each device gather only its own part of the batch.
    indices = shard_batch(indices, batch_sharding)
    batch_images = images[indices]
    if augment:
      batch_images = input_pipeline.augment(jax.random.fold_in(augment_key, step_index),
                                            batch_images)
    batch_images = shard_batch(input_pipeline.normalize(batch_images, mean, std),
                               batch_sharding)
    return train_step(state, batch_images, shard_batch(labels[indices], batch_sharding))

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
             apply_fn: Callable, batch_size: int, batch_sharding: NamedSharding | None = None):
  """Evaluates on the whole set in order, in batches of `batch_size` (the last one short), as
  BatchNorm uses each batch's statistics; with `batch_sharding` each batch is split over its
  devices. Returns predictions and summed metrics."""
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size

  def batch_step(batch_images, batch_labels):
    batch_images = shard_batch(input_pipeline.normalize(batch_images, mean, std), batch_sharding)
    return eval_step(params, apply_fn, batch_images, shard_batch(batch_labels, batch_sharding))

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


def _shardings(mesh: Mesh | None):
  """(batch sharding, replicated sharding) over the mesh's "data" axis, or (None, None)."""
  if mesh is None:
    return None, None
  return NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())


def compile_train_epoch(state, images, labels, key, mean, std, *, batch_size: int,
                        drop_last_batch: bool, augment: bool = False, replicated: bool = False,
                        mesh: Mesh | None = None):
  """Compiles `train_epoch` ahead of time for these shapes; the state argument is donated.

  `replicated`: the state and key have a leading replica axis and one program trains all
  replicas (`vmap`) on the same data, each in its own order. `mesh`: batches are split over the
  mesh's devices and the outputs (state, metrics) are replicated on all of them.
  """
  batch_sharding, replicated_sharding = _shardings(mesh)
  epoch = functools.partial(train_epoch, batch_size=batch_size,
                            drop_last_batch=drop_last_batch, augment=augment,
                            batch_sharding=batch_sharding)
  if replicated:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, 0, None, None))
  # Donating the state lets XLA update parameters and momenta in place.
  return jax.jit(epoch, donate_argnums=0, out_shardings=replicated_sharding).lower(
      state, images, labels, key, mean, std).compile(compiler_options=compiler_options())


def compile_evaluate(params, images, labels, mean, std, *, apply_fn: Callable, batch_size: int,
                     replicated: bool = False, mesh: Mesh | None = None):
  """Compiles `evaluate` ahead of time for these shapes (`replicated`, `mesh`: as
  `compile_train_epoch`)."""
  batch_sharding, replicated_sharding = _shardings(mesh)
  run = functools.partial(evaluate, apply_fn=apply_fn, batch_size=batch_size,
                          batch_sharding=batch_sharding)
  if replicated:
    run = jax.vmap(run, in_axes=(0, None, None, None, None))
  return jax.jit(run, out_shardings=replicated_sharding).lower(
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


def _nonfinite_steps(step_losses) -> np.ndarray:
  """Index of the first non-finite step loss per row of `step_losses` (-1 where all are finite);
  one row per replica, or a 0-d result for a single model."""
  bad = ~np.isfinite(np.asarray(step_losses))
  return np.where(bad.any(axis=-1), bad.argmax(axis=-1), -1)


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


def replica_settings(config) -> dict[str, list]:
  """Seed, peak learning rate and momentum of each of the `config.num_replicas` models: replica
  i has `replica_seeds[i]` (default `seed + i`), `replica_learning_rates[i]` (default
  `learning_rate`) and `replica_momenta[i]` (default `momentum`). One model: its config values."""
  count = config.num_replicas
  return {
      "seed": list(config.replica_seeds) or [config.seed + i for i in range(count)],
      "learning_rate": list(config.replica_learning_rates) or [config.learning_rate] * count,
      "momentum": list(config.replica_momenta) or [config.momentum] * count,
  }


def create_mesh(config) -> Mesh | None:
  """A one-axis ("data") mesh over the first `config.num_devices` devices of all processes (0:
  all of them), or None for one device, which then runs the plain single-device program."""
  devices = jax.devices()
  count = config.num_devices or len(devices)
  if count == 1:
    return None
  return Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def _put_replicated(tree, mesh: Mesh | None):
  """Host arrays -> device arrays, a full copy on every device of the mesh. Built from each
  process's own copy of the data, so it also works when the mesh spans several processes."""
  if mesh is None:
    return jax.device_put(tree)
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
      tree)


def create_run_state(config, model, steps: int, mesh: Mesh | None):
  """The train state and data-order key of the run: one model, or `config.num_replicas` stacked
  along a leading axis (seed, learning rate and momentum from `replica_settings`). A model of
  seed s has the parameters and data order of `jax.random.split(jax.random.key(s))`, so replica
  i of a replicated run starts exactly as a single run of its seed."""
  settings = replica_settings(config)
  replicated = config.num_replicas > 1

  def create(seed, learning_rate, momentum):
    init_key, data_key = jax.random.split(jax.random.key(seed))
    state = create_train_state(config, model, init_key, steps, learning_rate, momentum)
    return state, data_key

  if replicated:
    create = jax.vmap(create)
  args = [np.asarray(values if replicated else values[0]) for values in settings.values()]
  args[1:] = [np.asarray(value, np.float32) for value in args[1:]]
  _, replicated_sharding = _shardings(mesh)
  state, data_key = jax.jit(create, out_shardings=replicated_sharding).lower(*args).compile(
      compiler_options=compiler_options(run_once=True))(*args)
  # The optimiser built inside `jit` only served to initialise: its hyperparameters are in
  # `opt_state`, and a concrete one is kept for the updates.
  return state.replace(tx=create_optimizer(config, steps)), data_key


def _to_json_values(values: np.ndarray, diverged: np.ndarray):
  """A metric as JSON: a float for one model, a list for replicas with null for diverged ones."""
  if values.ndim == 0:
    return float(values)
  return [None if bad else float(v) for v, bad in zip(values, diverged)]


def replica_summary(test_accuracies: list) -> dict[str, float]:
  """Mean, sample standard deviation (n - 1), min and max of the replicas' test accuracies,
  leaving out diverged replicas (None)."""
  values = np.asarray([v for v in test_accuracies if v is not None], np.float64)
  if values.size == 0:
    return {}
  return {"test_acc_mean": float(values.mean()),
          "test_acc_std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
          "test_acc_min": float(values.min()), "test_acc_max": float(values.max())}


def _write_tensorboard(writer, record: dict, step: int) -> None:
  """One epoch's scalars; for replicas, one curve per replica and the test accuracy summary."""
  for name in ("train_loss", "train_acc", "test_loss", "test_acc", "learning_rate",
               "step_time_ms", "images_per_second"):
    value = record[name]
    if not isinstance(value, list):
      writer.add_scalar(name, value, step)
      continue
    for replica, replica_value in enumerate(value):
      if replica_value is not None:
        writer.add_scalar(f"{name}/replica_{replica}", replica_value, step)
  if isinstance(record["test_acc"], list):
    for name, value in replica_summary(record["test_acc"]).items():
      writer.add_scalar(name, value, step)
  writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the configured model, evaluating after every epoch; resumes from the workdir's
  newest intact checkpoint if it holds one of the same config.

  Prints one JSON line per new epoch on stdout and keeps in `workdir`: config.json,
  metrics.jsonl (every epoch so far), preds (final test predictions, one integer per line, in
  test order), checkpoints/ (orbax) and tensorboard/ (event files). Returns the last epoch's
  metrics. Raises `UserError` for bad configs, data or workdirs before any work, and
  `TrainingDiverged` when the loss stops being finite (the last good checkpoint stays).

  With `config.num_replicas` > 1, that many models train together in one compiled program
  (`vmap` over parameters, optimiser states and data order; see `replica_settings`): each
  metric of a record is a list with one value per replica (null from the epoch a replica's loss
  stops being finite: it is listed under "diverged" and the others go on) plus the mean, sample
  std, min and max of the test accuracy; each line of preds holds every replica's prediction.
  With several devices (`config.num_devices`), each batch is split over them (data parallel);
  in a multi-process run (`jax.distributed`) only process 0 writes files and prints.
  """
  validation.validate_config(config)
  validation.check_devices(config, jax.device_count())
  files = RunFiles(workdir)
  identity = validation.run_identity(config)
  resuming = validation.check_workdir(files, identity)

  data = input_pipeline.load_dataset(config)
  validation.check_batch_sizes(config, len(data.train_labels))
  is_writer = jax.process_index() == 0
  if jax.process_count() > 1:
    # Every process has read the workdir before process 0 writes to it.
    multihost_utils.sync_global_devices("convnet_jax: workdir checked")
  if is_writer:
    files.workdir.mkdir(parents=True, exist_ok=True)

  replicated = config.num_replicas > 1
  mesh = create_mesh(config)
  try:
    conv_choice = conv.choose_conv_implementation(config.conv_implementation, config.dtype,
                                                  mesh.size if mesh else 1)
  except conv.ConvUnavailable as error:
    raise UserError(f"config.conv_implementation={config.conv_implementation!r}: {error}") from None
  if is_writer:
    print(conv_choice.describe(), file=sys.stderr)
  model = models.create_model(config, data.num_classes, conv_choice.implementation)
  num_steps = steps_per_epoch(len(data.train_labels), config.batch_size, config.drop_last_batch)
  state, data_key = create_run_state(config, model, num_steps, mesh)
  logging.info("model %s: %d parameters x %d replicas; %d steps per epoch on %d devices",
               config.model, models.count_parameters(state.params) // config.num_replicas,
               config.num_replicas, num_steps, mesh.size if mesh else 1)

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
  if is_writer:
    # Epochs after the newest checkpoint are recomputed, so the file restarts from its history.
    _write_atomically(files.metrics, "".join(json.dumps(r) + "\n" for r in history))
    recorded = dict(json.loads(config.to_json_best_effort()), **{validation.CONV_RECORD_KEY: {
        "implementation": conv_choice.implementation, "reason": conv_choice.reason}})
    _write_atomically(files.config, json.dumps(recorded, indent=2) + "\n")

  # The whole data set goes to the device(s) once, as uint8.
  train_images, train_labels, test_images, test_labels, mean, std = _put_replicated(
      (data.train_images, data.train_labels, data.test_images, data.test_labels, data.mean,
       data.std), mesh)

  if config.trace_shapes and is_writer:
    params = jax.tree_util.tree_map(lambda x: x[0], state.params) if replicated else state.params
    batch = train_images[:config.batch_size].astype(jnp.float32)
    for line in shape_trace(model, params, batch, train_labels[:config.batch_size]):
      print(line, file=sys.stderr)

  fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None)) if replicated else jax.random.fold_in
  compile_start = time.perf_counter()
  run_epoch = compile_train_epoch(state, train_images, train_labels, fold_in(data_key, 0), mean,
                                  std, batch_size=config.batch_size,
                                  drop_last_batch=config.drop_last_batch,
                                  augment=config.augment, replicated=replicated, mesh=mesh)
  run_eval = compile_evaluate(state.params, test_images, test_labels, mean, std,
                              apply_fn=model.apply, batch_size=config.eval_batch_size,
                              replicated=replicated, mesh=mesh)
  compile_seconds = time.perf_counter() - compile_start
  logging.info("compiled the epoch and evaluation programs in %.2f s", compile_seconds)
  print(f"compile time: {compile_seconds:.2f} s", file=sys.stderr)

  num_train, num_test = len(data.train_labels), len(data.test_labels)
  num_seen = num_steps * config.batch_size if config.drop_last_batch else num_train
  writer = _tensorboard_writer(config, files) if is_writer else None
  progress = _progress_bar(config, config.num_epochs, len(history))
  predictions = None
  saved_epochs = len(history)  # epochs in the newest checkpoint on disk
  # Replicas whose loss has stopped being finite; from then on their metrics are null.
  diverged = np.zeros(config.num_replicas if replicated else (), bool)
  if replicated and history:
    diverged[history[-1]["diverged"]] = True
  seeds = replica_settings(config)["seed"]
  start = time.perf_counter()
  try:
    for epoch in range(len(history), config.num_epochs):
      learning_rate = current_learning_rate(config, num_steps, state)
      epoch_start = time.perf_counter()
      state, train_totals = run_epoch(state, train_images, train_labels,
                                      fold_in(data_key, epoch), mean, std)
      predictions, test_totals = run_eval(state.params, test_images, test_labels, mean, std)
      # Float64 on the host, so that an accuracy is exactly correct / count.
      train_totals, test_totals = jax.tree_util.tree_map(
          lambda x: np.asarray(x, np.float64), jax.device_get((train_totals, test_totals)))
      bad_steps = _nonfinite_steps(train_totals["step_losses"])
      if np.all(bad_steps >= 0):
        bad_step = int(np.min(bad_steps))
        kept = f"after epoch {saved_epochs - 1}" if saved_epochs else "none yet"
        subject = "every replica" if replicated else "loss"
        raise TrainingDiverged(
            f"non-finite {'loss in ' if replicated else ''}{subject} at step "
            f"{epoch * num_steps + bad_step} (epoch {epoch}, step {bad_step} of the epoch); the "
            f"last good checkpoint ({kept}) is kept in {files.checkpoints}")
      newly_diverged = (bad_steps >= 0) & ~diverged
      for replica in np.flatnonzero(newly_diverged):
        logging.warning("replica %d: non-finite loss at step %d of epoch %d; it goes on as null",
                        replica, bad_steps[replica], epoch)
      diverged |= bad_steps >= 0
      epoch_seconds = time.perf_counter() - epoch_start
      record = {
          "epoch": epoch,
          "test_acc": _to_json_values(test_totals["correct"] / num_test, diverged),
          "time": round(time.perf_counter() - start, 3),
          "train_loss": _to_json_values(train_totals["loss_sum"] / num_seen, diverged),
          "train_acc": _to_json_values(train_totals["correct"] / num_seen, diverged),
          "test_loss": _to_json_values(test_totals["loss_sum"] / num_test, diverged),
          "learning_rate": _to_json_values(learning_rate, np.zeros_like(diverged)),
          "compile_time": round(compile_seconds, 3),
      }
      if replicated:
        record.update(replica_summary(record["test_acc"]), diverged=np.flatnonzero(
            diverged).tolist(), seeds=seeds)
      history.append(record)
      if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
        store.save(epoch + 1, state, {"history": history, "config_fingerprint": fingerprint,
                                      "data_key": np.asarray(
                                          jax.random.key_data(data_key)).tolist()})
        saved_epochs = epoch + 1
      if is_writer:
        line = json.dumps(record)
        print(line, flush=True)
        with files.metrics.open("a") as metrics_file:
          metrics_file.write(line + "\n")
      if writer is not None:
        _write_tensorboard(writer, dict(
            record, step_time_ms=1e3 * epoch_seconds / num_steps,
            images_per_second=num_seen * config.num_replicas / epoch_seconds), epoch + 1)
      progress.update(1)
  finally:
    progress.close()
    store.close()
    if writer is not None:
      writer.close()
  if predictions is None:  # every epoch was already done: only the predictions may be missing
    predictions, _ = run_eval(state.params, test_images, test_labels, mean, std)
  if is_writer:
    # One line per test example; a column per replica.
    rows = np.asarray(predictions).reshape(-1, num_test).T
    _write_atomically(files.predictions,
                      "".join(" ".join(map(str, row)) + "\n" for row in rows))
    if replicated:  # the last record holds the summary (some replica is left: else it raised)
      last = history[-1]
      print(f"final test accuracy over {len(seeds) - len(last['diverged'])} replicas (seeds "
            f"{seeds}): mean {last['test_acc_mean']:.4f}, std {last['test_acc_std']:.4f}, min "
            f"{last['test_acc_min']:.4f}, max {last['test_acc_max']:.4f}", file=sys.stderr)
  return history[-1]
