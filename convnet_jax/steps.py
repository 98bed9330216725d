"""The pure functions of training and evaluation: `train_step`/`eval_step`, and the epoch and
evaluation programs built from them, each compiled once.

The whole data set lives on the device as uint8. `train_steps` is one compiled program that
runs any stretch of steps of an epoch: it draws the epoch's order from the PRNG key, runs
`train_step` over the full batches in a loop with traced bounds and then, in the call that ends
the epoch, over the short last batch; the host never waits inside a call, and the loop in
`train` chooses how many steps a call runs. `programs` compiles them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state

from convnet_jax import optim
from convnet_jax.data import input_pipeline
from convnet_jax.data import tta
from convnet_jax.models import layers
from convnet_jax.parallel import data_parallel


class TrainState(flax_train_state.TrainState):
  """Flax's train state, plus lookahead's slow copy of the parameters (None without it)."""
  lookahead_params: Any = None
  # No proxy network (a class attribute, not a field): a run without data selection keeps the
  # state tree, and so reads the checkpoints, of the versions before selection existed.
  proxy = None


class SelectionTrainState(TrainState):
  """The train state of a run with data selection: with the proxy network that selects each
  batch's examples, a Flax train state of its own (`select_by_proxy`)."""
  proxy: Any = None


class Proxy(NamedTuple):
  """The proxy network of a run with data selection: its Flax module and its optimiser."""
  model: Any
  tx: optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a training step computes beyond plain SGD on the mean cross-entropy (static, hashable;
  `runs.prepare.step_options` builds it from a config).

  label_smoothing: the target is (1 - s) one_hot + s / num_classes (PyTorch's
  `CrossEntropyLoss(label_smoothing=s)`). loss_reduction: "mean" or "sum" over the batch.
  frozen_parameters: parameter paths (or their prefixes) that get no gradient at all.
  lookahead_every_steps: every k steps, slow = slow + (1 - d) (params - slow) and params = slow,
  with d = lookahead_decay * (step / total_steps) ** lookahead_power; at step total_steps the
  parameters become the slow copy (0: no lookahead). late_frozen_parameters: from step
  late_freeze_step on (counted over the run), `train_steps` treats them as frozen too (the
  optimiser already stops updating them there; this stops computing their gradient).
  keep_fraction: below 1, each batch trains on its `kept_count` examples of highest proxy loss
  and the proxy trains every `proxy_update_every` steps (`select_by_proxy`).
  """
  label_smoothing: float = 0.0
  loss_reduction: str = "mean"
  frozen_parameters: tuple[str, ...] = ()
  late_frozen_parameters: tuple[str, ...] = ()
  late_freeze_step: int = 0
  lookahead_every_steps: int = 0
  lookahead_decay: float = 0.0
  lookahead_power: float = 0.0
  total_steps: int = 0
  keep_fraction: float = 1.0
  proxy_update_every: int = 1


# ---------------------------------------------------------------------------------------------
# Steps: pure functions of (state or parameters, batch).

# The proxy's parameters are drawn from fold_in(the model's key, PROXY_KEY_STREAM).
PROXY_KEY_STREAM = 1


def create_train_state(model, key: jax.Array, tx: optax.GradientTransformation,
                       with_lookahead: bool = False, proxy: Proxy | None = None) -> TrainState:
  """The parameters of `model` initialised from `key`, the optimiser `tx`'s state, (with
  lookahead) a slow copy of the parameters and (with a `proxy`) the proxy's own state."""
  # lazy_init: the same parameters as `init`, without computing the forward pass on a dummy.
  dummy = jax.ShapeDtypeStruct((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  params = model.lazy_init(key, dummy)["params"]
  state = TrainState(step=0, apply_fn=model.apply, params=params, tx=tx,
                     opt_state=tx.init(params),
                     lookahead_params=params if with_lookahead else None)
  if proxy is None:
    return state
  proxy_params = proxy.model.lazy_init(jax.random.fold_in(key, PROXY_KEY_STREAM),
                                       dummy)["params"]
  return SelectionTrainState(**vars(state), proxy=flax_train_state.TrainState.create(
      apply_fn=proxy.model.apply, params=proxy_params, tx=proxy.tx))


def cross_entropy_losses(logits: jax.Array, labels: jax.Array,
                         label_smoothing: float = 0.0) -> jax.Array:
  """Each example's -sum(target * log softmax(logits)), the target one-hot, or label-smoothed:
  (1 - s) one_hot(label) + s / num_classes."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def stop_frozen_gradients(params, frozen: tuple[str, ...]):
  """`params` with the gradient of the frozen ones cut, so none is computed for them."""
  if not frozen:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jax.lax.stop_gradient(p) if optim.matches(optim.parameter_name(path),
                                                                frozen) else p, params)


def lookahead(state: TrainState, options: StepOptions) -> TrainState:
  """After the update that made `state.step`: every `lookahead_every_steps` steps the slow
  copy moves towards the parameters and the parameters jump to it; after the last step the
  parameters are the slow copy (airbench's final `decay=1` update)."""
  step = state.step
  progress = step.astype(jnp.float32) / options.total_steps
  sync = step % options.lookahead_every_steps == 0
  decay = jnp.where(sync, options.lookahead_decay * progress ** options.lookahead_power, 1.0)

  def update(state):
    slow = jax.tree_util.tree_map(lambda s, p: s + (1.0 - decay) * (p - s),
                                  state.lookahead_params, state.params)
    return state.replace(params=slow, lookahead_params=slow)

  return jax.lax.cond(sync | (step == options.total_steps), update, lambda s: s, state)


# What `train_step` returns for a batch, each a float32 scalar.
STEP_METRICS = ("loss_sum", "correct")
# What an evaluation with test-time augmentation sums besides: the same of the views' weighted
# logits.
AUGMENTED_PREFIX = "tta_"
AUGMENTED_METRICS = tuple(AUGMENTED_PREFIX + name for name in STEP_METRICS)


def evaluation_metrics(test_time_augmentation: str) -> tuple[str, ...]:
  """The sums `evaluate` returns with `test_time_augmentation`."""
  return STEP_METRICS + (AUGMENTED_METRICS if test_time_augmentation != "none" else ())


def kept_count(batch_size: int, keep_fraction: float) -> int:
  """How many examples of a batch of `batch_size` a step trains on: all of them, or with data
  selection (`keep_fraction` < 1) the nearest whole number to that fraction, at least one."""
  if keep_fraction >= 1:
    return batch_size
  return max(1, int(batch_size * keep_fraction + 0.5))


def select_by_proxy(state: TrainState, images: jax.Array, labels: jax.Array,
                    options: StepOptions):
  """airbench96_faster's data selection: the proxy network scores the batch (its per-example
  loss, label-smoothed as the model's) and the batch is cut to the `kept_count` examples of
  highest loss. On every `proxy_update_every`-th step of the run (state.step a multiple of it)
  the proxy also takes one step of its own optimiser on the summed loss of those same examples,
  from the scoring forward pass (`jax.vjp`), as the script's `(loss1 * mask).sum()` does.
  Returns the state with the proxy updated, and the kept images and labels."""
  proxy = state.proxy
  keep = kept_count(labels.shape[0], options.keep_fraction)
  # The proxy's frozen parameters: the model's, with the late-frozen ones (airbench's whitening
  # bias) frozen from the start, as the script's `model_proxy[0].bias.requires_grad = False`.
  frozen = options.frozen_parameters + options.late_frozen_parameters

  def losses_of(params):
    logits = proxy.apply_fn({"params": stop_frozen_gradients(params, frozen)}, images)
    return cross_entropy_losses(logits, labels, options.label_smoothing)

  def highest(losses):
    return jax.lax.top_k(jax.lax.stop_gradient(losses), keep)[1]

  def score(proxy):
    return proxy, highest(losses_of(proxy.params))

  def score_and_train(proxy):
    losses, pull_back = jax.vjp(losses_of, proxy.params)
    kept = highest(losses)
    # The gradient of the kept examples' loss (summed, or their mean as the model's loss
    # reduction says): a cotangent of 1, or 1 / keep, on each of them.
    weight = 1.0 if options.loss_reduction == "sum" else 1.0 / keep
    (grads,) = pull_back(jnp.zeros_like(losses).at[kept].set(weight))
    return proxy.apply_gradients(grads=grads), kept

  proxy, kept = jax.lax.cond(state.step % options.proxy_update_every == 0, score_and_train,
                             score, proxy)
  return state.replace(proxy=proxy), images[kept], labels[kept]


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               options: StepOptions = StepOptions()):
  """One SGD step on a normalised batch (with data selection, on the part of it that
  `select_by_proxy` keeps). Returns the new state and the summed loss and number of correct
  predictions of the examples trained on (sums, so that batches of any size add up exactly)."""
  if options.keep_fraction < 1:
    state, images, labels = select_by_proxy(state, images, labels, options)

  def loss_fn(params):
    params = stop_frozen_gradients(params, options.frozen_parameters)
    logits = state.apply_fn({"params": params}, images)
    losses = cross_entropy_losses(logits, labels, options.label_smoothing)
    return (losses.sum() if options.loss_reduction == "sum" else losses.mean()), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if options.lookahead_every_steps:
    state = lookahead(state, options)
  count = labels.shape[0]
  loss_sum = loss if options.loss_reduction == "sum" else loss * count
  metrics = {"loss_sum": loss_sum.astype(jnp.float32),
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)}
  return state, metrics


def eval_step(params, apply_fn: Callable, images: jax.Array, labels: jax.Array):
  """Predictions, summed loss and number correct for one normalised evaluation batch."""
  return _evaluate_logits(apply_fn({"params": params}, images), labels)


def _evaluate_logits(logits: jax.Array, labels: jax.Array):
  predictions = jnp.argmax(logits, -1)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return predictions, {"loss_sum": jnp.sum(losses),
                       "correct": jnp.sum(predictions == labels).astype(jnp.float32)}


def _sum_metrics(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


# ---------------------------------------------------------------------------------------------
# Epochs: every step of an epoch, or the whole test set, in one compiled program.

# The random streams, each folded into the key of its own level, so each draws apart from the
# others (both ones are fine: they fold into different keys). Into an epoch's key: the
# augmentation's stream, so that the shuffle keeps using the epoch key itself (and the runs
# without augmentation stay as they were).
EPOCH_KEY_AUGMENT_STREAM = 1
# Into a step's augmentation key: the colour jitter's draws and the cutout's, so the crops and
# flips stay those of the same run without them.
STEP_KEY_JITTER_STREAM = 1
STEP_KEY_CUTOUT_STREAM = 2
# Into the run's data key (with a value no epoch number takes): the flips of
# `augment.flip="alternate"`, drawn once per run.
ALTERNATE_FLIPS_KEY = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """The training augmentation (static): a random translation of up to `translate` pixels
  after padding with `padding` ("zeros" or "reflect"), and flips: "random" (each image with
  probability 1/2, fresh every epoch), "alternate" (each image flipped in every other epoch,
  which half in the first epoch drawn at random once per run) or "none"."""
  translate: int = input_pipeline.AUGMENT_PADDING
  padding: str = "zeros"
  flip: str = "random"
  # Colour jitter after normalisation (hiverge/cifar10-speedrun's): see `input_pipeline.jitter`.
  brightness: float = 0.0
  contrast: float = 0.0
  # Then a square of this size set to 0 in each image (airbench96's): `input_pipeline.cutout`.
  cutout: int = 0


def augment_options(augment) -> AugmentOptions | None:
  """The augmentation of the config's `augment` group, None when it is not enabled."""
  if not augment.enabled:
    return None
  return AugmentOptions(augment.translate, augment.padding, augment.flip, augment.brightness,
                        augment.contrast, augment.cutout)


def epoch_flips(data_key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """`augment_flip="alternate"`: whether each example is flipped in epoch `epoch`. A random half
  (drawn once per run from the data key) in even epochs, the other half in odd ones, so every
  image is seen both ways in every two epochs (airbench's)."""
  first = jax.random.bernoulli(jax.random.fold_in(data_key, ALTERNATE_FLIPS_KEY), 0.5,
                               (num_examples,))
  return first ^ (epoch % 2 == 1)


def _flips_of_the_epoch(augment: AugmentOptions | None, data_key: jax.Array, epoch,
                        num_examples: int) -> jax.Array | None:
  """Which images `augment` flips this epoch: `epoch_flips` for "alternate", none for "none",
  None where each batch draws its own ("random") or nothing is augmented."""
  if augment is not None and augment.flip == "alternate":
    return epoch_flips(data_key, epoch, num_examples)
  if augment is not None and augment.flip == "none":
    return jnp.zeros(num_examples, bool)
  return None


def training_batch(key: jax.Array, images: jax.Array, normalization, augment: AugmentOptions | None,
                   flips: jax.Array | None = None) -> jax.Array:
  """A gathered uint8 batch as a training step sees it: cropped and flipped
  (`input_pipeline.augment`, `flips` where the epoch fixes them), normalised with
  `normalization` (mean, std), colour-jittered and cut out, as `augment` says (None: only
  normalised); the jitter and the cutout each draw from a stream of `key` of their own."""
  if augment is not None:
    images = input_pipeline.augment(key, images, augment.translate, augment.padding, flips)
  images = input_pipeline.normalize(images, *normalization)
  if augment is not None and (augment.brightness or augment.contrast):
    images = input_pipeline.jitter(jax.random.fold_in(key, STEP_KEY_JITTER_STREAM), images,
                                   augment.brightness, augment.contrast)
  if augment is not None and augment.cutout:
    images = input_pipeline.cutout(jax.random.fold_in(key, STEP_KEY_CUTOUT_STREAM), images,
                                   augment.cutout)
  return images


def _record(per_step, metrics, step_index):
  """The per-step metric arrays with step `step_index`'s `metrics` put in."""
  return jax.tree_util.tree_map(lambda buffer, value: buffer.at[step_index].set(value),
                                per_step, metrics)


class DeviceData(NamedTuple):
  """The data set on the device(s), as uint8 images and int labels, with the channel
  statistics that normalise it (`programs.put_data`)."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array


@dataclasses.dataclass(frozen=True)
class EpochOptions:
  """How `train_steps` cuts and trains an epoch (static, hashable): batches of `batch_size`
  (`drop_last_batch`: the short last one dropped), the augmentation (None: none), what each
  step computes, and the sharding that splits each batch over the devices (None: one device)."""
  batch_size: int
  drop_last_batch: bool = False
  augment: AugmentOptions | None = None
  step: StepOptions = StepOptions()
  batch_sharding: Any = None


def train_steps(state: TrainState, data: DeviceData, data_key: jax.Array, epoch: jax.Array,
                first_step: jax.Array, end_step: jax.Array, *, options: EpochOptions):
  """Steps `first_step` to `end_step` - 1 of epoch `epoch` on the training set of `data`: a
  part of the epoch, or all of it.

  The epoch's order is a permutation drawn from the epoch key fold_in(data_key, epoch); step i
  trains on its i-th full batch, and step `num_examples // batch_size` on the short last batch
  (unless `options.drop_last_batch`). With `options.augment`, each gathered uint8 batch is
  augmented (`input_pipeline.augment`) before normalisation, under the key
  fold_in(fold_in(epoch key, EPOCH_KEY_AUGMENT_STREAM), step), so every image gets a fresh
  augmentation every epoch, and then, normalised, colour-jittered (`input_pipeline.jitter`)
  under that key folded with STEP_KEY_JITTER_STREAM and cut out (`input_pipeline.cutout`)
  under it folded with STEP_KEY_CUTOUT_STREAM. With `options.batch_sharding`, each batch
  is split over its devices (`data_parallel.split_batch`). From the run's step
  `options.step.late_freeze_step` on, the `options.step.late_frozen_parameters` get no
  gradient.

  `first_step` and `end_step` are traced: one compiled program runs any part of any epoch, and
  an epoch run in several calls computes exactly what one call computes. Returns the new state
  and each step's `train_step` metrics, in arrays of an entry a step, zero outside those run."""
  images, labels, mean, std = data.train_images, data.train_labels, data.mean, data.std
  batch_size, drop_last_batch = options.batch_size, options.drop_last_batch
  augment, batch_sharding, step_options = options.augment, options.batch_sharding, options.step
  key = jax.random.fold_in(data_key, epoch)
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size
  has_short_batch = bool(num_examples % batch_size) and not drop_last_batch
  order = jax.random.permutation(key, num_examples)
  augment_key = jax.random.fold_in(key, EPOCH_KEY_AUGMENT_STREAM)
  flips = _flips_of_the_epoch(augment, data_key, epoch, num_examples)

  def step(state, indices, step_index, options=step_options):
    # Sharding the indices makes each device gather only its own part of the batch.
    indices = data_parallel.split_batch(indices, batch_sharding)
    batch_images = training_batch(jax.random.fold_in(augment_key, step_index), images[indices],
                                  (mean, std), augment, None if flips is None else flips[indices])
    batch_images = data_parallel.split_batch(batch_images, batch_sharding)
    return train_step(state, batch_images,
                      data_parallel.split_batch(labels[indices], batch_sharding), options)

  # Once the late-frozen parameters stop training, the steps run without their gradient (and,
  # for airbench's whitening bias, without the first convolution's input gradient and the
  # whitening's activation gradient): PyTorch's `b.detach()`. Two loops, not a conditional
  # step, so that replicas under vmap (whose bounds are never batched) run one body a step.
  frozen_options = dataclasses.replace(step_options, frozen_parameters=(
      step_options.frozen_parameters + step_options.late_frozen_parameters))
  steps_in_epoch = num_full + has_short_batch

  def full_step(step_index, carry, options=step_options):
    state, per_step = carry
    indices = jax.lax.dynamic_slice_in_dim(order, step_index * batch_size, batch_size)
    state, metrics = step(state, indices, step_index, options)
    return state, _record(per_step, metrics, step_index)

  def short_step(carry):
    state, per_step = carry
    indices = order[num_full * batch_size:]
    if step_options.late_frozen_parameters:
      state, metrics = jax.lax.cond(
          epoch * steps_in_epoch + num_full < step_options.late_freeze_step,
          lambda state: step(state, indices, num_full),
          lambda state: step(state, indices, num_full, frozen_options), state)
    else:
      state, metrics = step(state, indices, num_full)
    return state, _record(per_step, metrics, num_full)

  # The metrics of `train_step` are float32 scalars: known without tracing a step for them
  # (a trace costs ~0.3 s of a warm start).
  per_step = {name: jnp.zeros((steps_in_epoch,), jnp.float32) for name in STEP_METRICS}
  carry = (state, per_step)
  full_end = jnp.minimum(end_step, num_full)
  if step_options.late_frozen_parameters:
    # This epoch's steps before the freeze, then the rest.
    boundary = jnp.clip(step_options.late_freeze_step - epoch * steps_in_epoch, first_step,
                        full_end)
    carry = jax.lax.fori_loop(first_step, boundary, full_step, carry)
    carry = jax.lax.fori_loop(boundary, full_end, functools.partial(
        full_step, options=frozen_options), carry)
  else:
    carry = jax.lax.fori_loop(first_step, full_end, full_step, carry)
  if has_short_batch:
    # A real conditional (the bounds are never batched, even under vmap): only the call that
    # ends the epoch runs the short batch.
    carry = jax.lax.cond(end_step > num_full, short_step, lambda c: c, carry)
  return carry


def batch_sizes(num_examples: int, batch_size: int, num_steps: int,
                keep_fraction: float = 1.0) -> np.ndarray:
  """The sizes of an epoch's first `num_steps` batches (all full but a short last one), or with
  data selection the examples trained on in each (`kept_count`)."""
  sizes = np.full(num_steps, batch_size, np.float32)
  if num_steps * batch_size > num_examples:
    sizes[-1] = num_examples - (num_steps - 1) * batch_size
  return np.array([kept_count(int(size), keep_fraction) for size in sizes], np.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation.

# `eval.batch_norm_statistics`: what BatchNorm normalises a test batch with. "batch": the batch's
# own statistics (the specification's BatchNorm, as in training). "population": precise BatchNorm
# over un-augmented training images; "augmented": over training batches augmented as training
# augments them (`population_statistics`).
BATCH_NORM_STATISTICS = ("batch", "population", "augmented")
# Precise BatchNorm's statistics come from at most this many training images (in full batches of
# the run's training batch size, at least one): ~10,000 values per channel of the smallest map
# estimate a mean to ~1% of a standard deviation.
POPULATION_EXAMPLES = 10_000
# "augmented" statistics draw their augmentation from this key: the same draws in every
# evaluation, so the statistics are a function of the parameters alone.
POPULATION_AUGMENT_SEED = 0


@dataclasses.dataclass(frozen=True)
class PopulationOptions:
  """Where precise BatchNorm's statistics come from (static; `population_statistics`): the
  first full batches of `batch_size` training images, augmented as `augment` says (None: as
  they are)."""
  batch_size: int
  augment: AugmentOptions | None = None


def population_options(batch_norm_statistics: str, batch_size: int,
                       augment: AugmentOptions | None) -> PopulationOptions | None:
  """The `PopulationOptions` of a `BATCH_NORM_STATISTICS` choice (None for "batch") for a run
  that trains in batches of `batch_size` with `augment`."""
  if batch_norm_statistics == "batch":
    return None
  if batch_norm_statistics == "population" or augment is None:
    return PopulationOptions(batch_size)
  if augment.flip == "alternate":
    # In any one epoch each image is flipped or not with probability 1/2, as "random" draws.
    augment = dataclasses.replace(augment, flip="random")
  return PopulationOptions(batch_size, augment)


def population_statistics(params, images: jax.Array, mean: jax.Array, std: jax.Array, *,
                          apply_fn: Callable, options: PopulationOptions, batch_sharding=None):
  """Precise BatchNorm (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the network
  runs over the first full batches of `options.batch_size` of the uint8 training `images` (up
  to `POPULATION_EXAMPLES` of them, at least one batch), each normalised (`mean`, `std`) and,
  with `options.augment`, augmented as a training step augments its batch (the draws keyed by
  `POPULATION_AUGMENT_SEED` and the batch), BatchNorm normalising each batch by its own
  statistics as in training; returns each BatchNorm input's mean and (biased) variance over all
  those values, a `models.POPULATION` collection ({"mean", "variance"} float32 per layer).

  Why "augmented": a BatchNorm trained on augmented batches learns its offsets for their
  statistics; airbench's scripts evaluate with running averages of exactly those. Where the
  augmentation moves the statistics (airbench96's cutout zeroes 14% of every image), a test
  batch's own statistics, or un-augmented ones, normalise with other values than training did."""
  batch_size = min(options.batch_size, images.shape[0])
  num_batches = max(1, min(images.shape[0], POPULATION_EXAMPLES) // batch_size)
  key = jax.random.key(POPULATION_AUGMENT_SEED)
  augment = options.augment
  # "random" flips are drawn per batch; "none" flips nothing.
  flips = jnp.zeros(batch_size, bool) if augment is not None and augment.flip == "none" else None

  def batch_statistics(_, index):
    batch = jax.lax.dynamic_slice_in_dim(images, index * batch_size, batch_size)
    batch = training_batch(jax.random.fold_in(key, index), batch, (mean, std), options.augment,
                           flips)
    _, variables = apply_fn({"params": params}, data_parallel.split_batch(batch, batch_sharding),
                            mutable=[layers.BATCH_STATISTICS])
    return None, variables[layers.BATCH_STATISTICS]

  _, per_batch = jax.lax.scan(batch_statistics, None, jnp.arange(num_batches))
  return _combined_statistics(per_batch)


def _combined_statistics(node: dict) -> dict:
  """Per-batch means and variances (stacked along axis 0; batches of one size) -> those of all
  the values: the mean of the means, and the mean variance plus the variance of the means."""
  if "mean" not in node:
    return {name: _combined_statistics(child) for name, child in node.items()}
  # `sow` keeps a tuple per layer, one entry per call; each BatchNorm is called once.
  (means,), (variances,) = node["mean"], node["variance"]
  mean = jnp.mean(means, axis=0)
  variance = jnp.mean(variances + jnp.square(means - mean), axis=0)
  return {"mean": mean, "variance": variance}


def with_population(apply_fn: Callable, population) -> Callable:
  """`apply_fn` with the BatchNorm statistics `population` (`models.POPULATION`) added to the
  variables it is given: every batch normalised with them."""
  def apply(variables, images, **kwargs):
    return apply_fn({**variables, layers.POPULATION: population}, images, **kwargs)
  return apply


def evaluate(params, data: DeviceData, *, apply_fn: Callable, batch_size: int,
             batch_sharding=None, test_time_augmentation: str = "none",
             population: PopulationOptions | None = None):
  """Evaluates on the whole test set of `data` in order, in batches of `batch_size` (the last
  one short), as BatchNorm uses each batch's statistics, or with `population` the precise
  BatchNorm statistics `population_statistics` computes from `data`'s training images first;
  with `batch_sharding` each batch is split over its devices. Returns the predictions and the
  summed metrics (`STEP_METRICS`) of the images as they are; with `test_time_augmentation`, in
  the same pass, also the sums of the weighted views of `tta.views` (`AUGMENTED_METRICS`)."""
  if population is not None:
    apply_fn = with_population(apply_fn, population_statistics(
        params, data.train_images, data.mean, data.std, apply_fn=apply_fn, options=population,
        batch_sharding=batch_sharding))
  images, labels, mean, std = data.test_images, data.test_labels, data.mean, data.std
  num_examples = labels.shape[0]
  num_full = num_examples // batch_size

  def batch_step(batch_images, batch_labels):
    batch_images = data_parallel.split_batch(input_pipeline.normalize(batch_images, mean, std),
                                        batch_sharding)
    batch_labels = data_parallel.split_batch(batch_labels, batch_sharding)
    if test_time_augmentation == "none":
      return eval_step(params, apply_fn, batch_images, batch_labels)
    plain, augmented = tta.plain_and_augmented_logits(params, apply_fn, batch_images,
                                                      test_time_augmentation)
    predictions, sums = _evaluate_logits(plain, batch_labels)
    _, augmented_sums = _evaluate_logits(augmented, batch_labels)
    return predictions, {**sums, **{AUGMENTED_PREFIX + name: value
                                    for name, value in augmented_sums.items()}}

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
