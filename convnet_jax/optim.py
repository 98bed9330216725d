"""The optimiser: SGD with PyTorch's momentum and weight decay, under a learning-rate schedule,
with per-group learning rates and frozen parameters; and Muon in airbench94_muon's form."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from convnet_jax.budget import StepBudget

# airbench's decoupled hyperparameters are given per this many examples.
DECOUPLED_EXAMPLES = 1024


def create_learning_rate_fn(schedule: ml_collections.ConfigDict, budget: StepBudget,
                            peak: float) -> optax.Schedule:
  """The learning rate at each step of the config's `schedule` group (`schedule.name`), with
  `peak` as the largest value and T = `budget.total_steps`:

  * "linear": from the peak to 0 over all of training (the seed run);
  * "step": the peak, multiplied by `decay_factor` at each epoch of `boundaries_epochs`, from
    the first step of that epoch on (PyTorch's MultiStepLR stepped once per epoch);
  * "cosine": peak * (1 + cos(pi * step / T)) / 2, reaching 0 at the end;
  * "warmup_linear": airbench's triangle: with W = int(T * warmup_fraction) steps of warm-up,
    peak * (s + (1 - s) * step / W) before W (s = warmup_start_factor), then
    peak * (1 + (f - 1) * (step - W) / (T - W)) (f = final_lr_factor), f * peak at step T.

  Args:
    schedule: the config's `schedule` group.
    budget: the run's steps.
    peak: the largest learning rate (1.0 for the schedule's shape).

  Returns:
    An optax schedule: step count -> learning rate.
  """
  steps = budget.total_steps
  name = schedule.name
  if name == "linear":
    return optax.linear_schedule(peak, 0.0, transition_steps=steps)
  if name == "step":
    return optax.piecewise_constant_schedule(
        peak, {budget.global_step(epoch, 0): schedule.decay_factor
               for epoch in schedule.boundaries_epochs})
  if name == "cosine":
    return optax.cosine_decay_schedule(peak, decay_steps=steps)
  if name == "warmup_linear":
    warmup = int(steps * schedule.warmup_fraction)
    start, final = schedule.warmup_start_factor, schedule.final_lr_factor

    def warmup_linear(count):
      count = jnp.asarray(count, jnp.float32)
      rising = start + (1.0 - start) * count / max(warmup, 1)
      falling = 1.0 + (final - 1.0) * (count - warmup) / max(steps - warmup, 1)
      return peak * jnp.where(count < warmup, rising, falling)

    return warmup_linear
  raise ValueError(f"unknown schedule {name!r}")


def parameter_name(path) -> str:
  """The "/"-joined keys of a parameter's pytree path: "group1/norm1/offset"."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def matches(name: str, patterns) -> bool:
  """Whether parameter `name` is one of `patterns` or lies under one ("whiten" matches
  "whiten/bias")."""
  return any(name == pattern or name.startswith(pattern + "/") for pattern in patterns)


def is_batch_norm_offset(name: str) -> bool:
  """BatchNorm's learnable offsets, the parameters `offset_lr_multiplier` speeds up."""
  return name.rsplit("/", 1)[-1] == "offset"


def _map_named(fn, *trees):
  return jax.tree_util.tree_map_with_path(lambda path, *leaves: fn(parameter_name(path), *leaves),
                                          *trees)


def learning_rate_multipliers(optim: ml_collections.ConfigDict):
  """name -> how many times faster parameter `name` learns than the rest, from the config's
  `optim` group: the BatchNorm offsets `offset_lr_multiplier` times, the parameters under a
  pattern of `lr_multipliers` that pair's multiplier (the first pair that matches), every other
  parameter 1."""
  offsets, groups = optim.offset_lr_multiplier, tuple(optim.lr_multipliers)

  def multiplier(name: str) -> float:
    for pattern, factor in groups:
      if matches(name, (pattern,)):
        return factor
    return offsets if is_batch_norm_offset(name) else 1.0

  return multiplier


def add_group_decayed_weights(coefficient, multiplier) -> optax.GradientTransformation:
  """g + coefficient * w, with the coefficient divided by `multiplier(name)` for the parameters
  that learn faster or slower, so that their decay per step stays coefficient * lr * w while
  their learning rate is multiplied (airbench's "learning rate, not weight decay")."""

  def update(updates, state, params):
    def decayed(name, g, w):
      factor = multiplier(name)
      return g + (coefficient / factor if factor != 1 else coefficient) * w

    return _map_named(decayed, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_learning_rates(multiplier) -> optax.GradientTransformation:
  """Multiplies the updates of each parameter by `multiplier(name)`."""

  def update(updates, state, params=None):
    del params

    def scaled(name, u):
      factor = multiplier(name)
      return u * factor if factor != 1 else u

    return _map_named(scaled, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class FreezeState(NamedTuple):
  count: Any


def freeze(frozen: tuple[str, ...], late_frozen: tuple[str, ...],
           boundary_step: int) -> optax.GradientTransformation:
  """Zero updates for the `frozen` parameters always, and for the `late_frozen` ones from step
  `boundary_step` on: PyTorch skips a parameter without a gradient entirely (no momentum step,
  no weight decay), and so does this."""

  def update(updates, state, params=None):
    del params
    training = state.count < boundary_step

    def mask(name, u):
      if matches(name, frozen):
        return jnp.zeros_like(u)
      if matches(name, late_frozen):
        return jnp.where(training, u, jnp.zeros_like(u))
      return u

    return _map_named(mask, updates), FreezeState(optax.safe_increment(state.count))

  return optax.GradientTransformation(
      lambda params: FreezeState(jnp.zeros([], jnp.int32)), update)


def sgd_hyperparameters(optim: ml_collections.ConfigDict, batch_size: int, learning_rate,
                        momentum):
  """(PyTorch SGD's learning rate, weight-decay coefficient) for multiplier-1 parameters, from
  the config's `optim` group.

  `optim.decoupled_hyperparameters` (airbench): `learning_rate` and `weight_decay` are given
  per 1,024 examples of a summed loss, decoupled from momentum and from each other: PyTorch's
  learning rate is learning_rate / (1024 (1 + 1 / (1 - momentum))) and its weight decay
  weight_decay * batch_size / learning_rate, so that a step decays the weights by
  weight_decay * batch_size / (1024 (1 + 1 / (1 - momentum))) whatever the learning rate.
  """
  if not optim.decoupled_hyperparameters:
    return learning_rate, optim.weight_decay
  kilostep_scale = DECOUPLED_EXAMPLES * (1.0 + 1.0 / (1.0 - momentum))
  return (learning_rate / kilostep_scale, optim.weight_decay * batch_size / learning_rate)


class OptimizerOptions(NamedTuple):
  """What `create_optimizer` builds from: the config's `optim`, `schedule`, `muon` and `freeze`
  groups, and the batch size (airbench's decoupled weight decay scales with it)."""
  optim: ml_collections.ConfigDict
  schedule: ml_collections.ConfigDict
  muon: ml_collections.ConfigDict
  freeze: ml_collections.ConfigDict
  batch_size: int


def create_optimizer(options: OptimizerOptions, budget: StepBudget, learning_rate=None,
                     momentum=None, steps_per_update: int = 1) -> optax.GradientTransformation:
  """SGD with PyTorch's momentum formulation: v = m v + g; w = w - lr(t) v (Nesterov:
  w = w - lr(t) (g + m v)), lr(t) = learning_rate * the schedule's shape (`schedule.name` with
  peak 1).

  Weight decay is PyTorch SGD's: g = g + weight_decay * w before the momentum, on every parameter
  (convolution and linear weights, the linear bias and BatchNorm's scale and offset alike), as the
  PyTorch CIFAR tutorial applies it to `model.parameters()`. `optim.offset_lr_multiplier` and
  `optim.lr_multipliers` multiply some parameters' learning rate (not their decay, see
  `add_group_decayed_weights`), as PyTorch parameter groups with lr and weight_decay / lr;
  `freeze.parameters` and `freeze.late_parameters` are not updated (see `freeze`), the latter
  on the main schedule or, with `freeze.late_schedule="linear_to_zero"`, on their own, from the
  peak to 0 at the step they freeze; `optim.decoupled_hyperparameters`: see
  `sgd_hyperparameters`. With `muon.parameters`, the 4-D kernels under those paths train with
  `airbench_muon` instead (its own learning rate on the same schedule's shape, its own
  momentum and weight decay), as airbench94_muon splits its parameters between two optimisers.

  Args:
    options: the config's optimiser groups and batch size (`OptimizerOptions`).
    budget: the run's steps, which the schedules span.
    learning_rate: the peak learning rate (default `optim.learning_rate`).
    momentum: the momentum (default `optim.momentum`). Both live in the optimiser state
      (`optax.inject_hyperparams`), not in the compiled program, so replicas trained together
      under `vmap` can each have their own, and a checkpoint records them.
    steps_per_update: for an optimiser that updates on every k-th step of the run only (the
      data selection's proxy): its n-th update takes the schedule's value at step k n.

  Returns:
    The optax transformation; its updates are the whole change of each parameter.
  """
  optim, freezing = options.optim, options.freeze
  run_shape = create_learning_rate_fn(options.schedule, budget, peak=1.0)
  shape = run_shape if steps_per_update == 1 else (
      lambda count: run_shape(count * steps_per_update))
  multiplier = learning_rate_multipliers(optim)
  multiplied = optim.offset_lr_multiplier != 1 or bool(optim.lr_multipliers)
  frozen = tuple(freezing.parameters)
  late_frozen = tuple(freezing.late_parameters)
  freeze_step = budget.late_freeze_step
  own_late_schedule = bool(late_frozen) and freezing.late_schedule == "linear_to_zero"

  def sgd(learning_rate, momentum):
    step_size, decay_coefficient = sgd_hyperparameters(optim, options.batch_size, learning_rate,
                                                       momentum)
    if not optim.weight_decay:
      decay = optax.identity()
    elif not multiplied:
      decay = optax.add_decayed_weights(decay_coefficient)
    else:
      decay = add_group_decayed_weights(decay_coefficient, multiplier)
    parts = [decay, optax.trace(decay=momentum, nesterov=optim.nesterov)]
    if multiplied:
      parts.append(scale_learning_rates(multiplier))
    if frozen or late_frozen:
      parts.append(freeze(frozen, late_frozen, freeze_step))
    if own_late_schedule:
      parts.append(_scale_by_two_schedules(
          lambda name: matches(name, late_frozen),
          lambda count: -step_size * (1.0 - count / freeze_step),
          lambda count: -step_size * shape(count)))
    else:
      parts.append(optax.scale_by_schedule(lambda count: -step_size * shape(count)))
    return with_muon(options.muon, optax.chain(*parts), shape, budget.total_steps)

  return optax.inject_hyperparams(sgd)(
      learning_rate=optim.learning_rate if learning_rate is None else learning_rate,
      momentum=optim.momentum if momentum is None else momentum)


def with_muon(muon, sgd: optax.GradientTransformation, shape: optax.Schedule,
              total_steps: int) -> optax.GradientTransformation:
  """`sgd` for every parameter but the 4-D kernels under `muon.parameters` (the config's `muon`
  group), which `airbench_muon` trains at muon.learning_rate times the schedule's `shape`
  (over a run of `total_steps`); `sgd` alone without any."""
  if not muon.parameters:
    return sgd
  muon_transform = airbench_muon(
      lambda count: muon.learning_rate * shape(count), muon.momentum, nesterov=muon.nesterov,
      normalize_filters=muon.normalize_filters,
      orthogonalisation=NewtonSchulz(muon.newton_schulz_steps,
                                     tuple(muon.newton_schulz_coefficients), MUON_DTYPE),
      weight_decay=muon.weight_decay,
      normalize_steps=normalization_steps(total_steps, muon.normalize_period,
                                          muon.normalize_period_growth))
  return optax.multi_transform({"sgd": sgd, "muon": muon_transform},
                               functools.partial(muon_labels, tuple(muon.parameters)))


def muon_labels(patterns: tuple[str, ...], params):
  """"muon" for the 4-D kernels under `patterns`, "sgd" for every other parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: "muon" if p.ndim == 4 and matches(parameter_name(path), patterns)
      else "sgd", params)


def _scale_by_two_schedules(chosen, chosen_schedule, other_schedule
                            ) -> optax.GradientTransformation:
  """Updates times `chosen_schedule(count)` for the parameters `chosen(name)` picks, times
  `other_schedule(count)` for the rest."""

  def update(updates, state, params=None):
    del params
    chosen_scale, other_scale = chosen_schedule(state.count), other_schedule(state.count)
    scaled = _map_named(lambda name, u: u * (chosen_scale if chosen(name) else other_scale),
                        updates)
    return scaled, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(
      lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update)


def current_learning_rate(schedule: ml_collections.ConfigDict, budget: StepBudget,
                          state) -> np.ndarray:
  """The learning rate of the state's next step (one per replica for replicated states), in the
  config's units (airbench's decoupled ones with `optim.decoupled_hyperparameters`), on the
  config's `schedule`."""
  shape = create_learning_rate_fn(schedule, budget, peak=1.0)
  hyperparams = jax.device_get(state.opt_state.hyperparams)
  return np.asarray(hyperparams["learning_rate"]) * np.asarray(
      shape(jax.device_get(state.step)))


# ---------------------------------------------------------------------------------------------
# Muon, in airbench94_muon's form (KellerJordan/cifar10-airbench, `Muon.step`): the building
# block of that recipe's convolution filters. optax.contrib.muon cannot express it exactly: its
# momentum is a bias-corrected moving average (and its Nesterov term mixes two corrections),
# and it has no per-step re-normalisation of each filter.

# The quintic Newton-Schulz iteration's coefficients, chosen for the largest slope at zero.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The dtype of a run's Newton-Schulz iteration: airbench's bfloat16 (tests of the recipe's
# arithmetic set float32, to compare with a float64 transcription).
MUON_DTYPE = jnp.bfloat16


class NewtonSchulz(NamedTuple):
  """How `airbench_muon` orthogonalises (`newton_schulz`): `steps` iterations of the quintic
  with `coefficients`, computed in `dtype`."""
  steps: int = 3
  coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS
  dtype: Any = MUON_DTYPE


def newton_schulz(matrix: jax.Array, steps: int = 3,
                  coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS,
                  dtype=jnp.bfloat16, eps: float = 1e-7) -> jax.Array:
  """airbench's `zeropower_via_newtonschulz5`: an approximate orthogonalisation U S' V^T of
  `matrix` = U S V^T, each singular value s going through x -> a x + b x^3 + c x^5 `steps`
  times after the matrix is divided by its Frobenius norm (so S' lies near 0.5-1.5, not 1).
  Computed in `dtype` (bfloat16 as airbench: each product summed in float32, then rounded),
  returned in `dtype`."""
  a, b, c = coefficients

  def matmul(x, y):
    return jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)

  x = matrix.astype(dtype)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))) + eps).astype(dtype)
  tall = x.shape[0] > x.shape[1]
  if tall:  # the iteration's products are the smaller Gram matrix
    x = x.T
  for _ in range(steps):
    gram = matmul(x, x.T)
    x = a * x + matmul(b * gram + c * matmul(gram, gram), x)
  return x.T if tall else x


class MuonState(NamedTuple):
  count: jax.Array
  momentum: Any  # one buffer per parameter


def normalization_steps(total_steps: int, period: int = 1, growth: int = 0) -> np.ndarray | None:
  """Whether `airbench_muon` re-normalises the kernels at each of `total_steps` steps (index:
  the optimiser's count, from 0); None for every step. hiverge/cifar10-speedrun's rule: at step
  t (from 1) when at least period + floor(growth t / total_steps) steps have passed since the
  last one (0 before the first), so (2, 15) starts every other step and ends about every
  17th."""
  if period == 1 and growth == 0:
    return None
  table = np.zeros(total_steps, bool)
  last = 0
  for step in range(1, total_steps + 1):
    if step - last >= period + growth * step // total_steps:
      table[step - 1], last = True, step
  return table


def airbench_muon(learning_rate: optax.ScalarOrSchedule, momentum: float, *,
                  nesterov: bool = True, normalize_filters: bool = True,
                  orthogonalisation: NewtonSchulz = NewtonSchulz(),
                  weight_decay: float = 0.0, normalize_steps: np.ndarray | None = None
                  ) -> optax.GradientTransformation:
  """Muon on convolution kernels (HWIO, 4-D), as airbench94_muon's `Muon.step`: the momentum
  buffer v = m v + g; the direction g + m v (Nesterov) or v; each kernel first re-normalised
  to Frobenius norm sqrt(output channels) (`normalize_filters`; with `normalize_steps`, a
  `normalization_steps` table, only at the steps it marks), then moved by -lr(t) times the
  Newton-Schulz orthogonalisation (`orthogonalisation`) of the direction as an (output channels) x
  (the rest) matrix, then multiplied by 1 - lr(t) weight_decay (hiverge's). The updates it
  returns are the whole change of each parameter, normalisation included."""
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  table = None if normalize_steps is None else jnp.asarray(normalize_steps)

  def init(params):
    return MuonState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("airbench_muon needs the parameters (it re-normalises them)")
    buffers = jax.tree_util.tree_map(lambda v, g: momentum * v + g, state.momentum, grads)
    directions = (jax.tree_util.tree_map(lambda g, v: g + momentum * v, grads, buffers)
                  if nesterov else buffers)
    step_size = schedule(state.count)
    normalize_now = (None if table is None
                     else table[jnp.minimum(state.count, table.shape[0] - 1)])

    def change(kernel, direction):
      if kernel.ndim != 4:
        raise ValueError(f"airbench_muon takes 4-D convolution kernels, not shape "
                         f"{kernel.shape}")
      outputs = kernel.shape[-1]
      matrix = direction.reshape(-1, outputs).T  # (out, kh kw in): a column order of PyTorch's
      orthogonal = newton_schulz(matrix, orthogonalisation.steps,
                                 orthogonalisation.coefficients, dtype=orthogonalisation.dtype)
      orthogonal = orthogonal.T.reshape(kernel.shape).astype(kernel.dtype)
      start = kernel
      if normalize_filters:
        normalized = kernel * (math.sqrt(outputs) / jnp.linalg.norm(kernel))
        start = normalized if normalize_now is None else jnp.where(normalize_now, normalized,
                                                                   kernel)
      moved = start - step_size * orthogonal
      if weight_decay:
        moved = moved * (1 - step_size * weight_decay)
      return moved - kernel

    updates = jax.tree_util.tree_map(change, params, directions)
    return updates, MuonState(optax.safe_increment(state.count), buffers)

  return optax.GradientTransformation(init, update)
