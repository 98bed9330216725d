"""The optimiser: SGD with PyTorch's momentum and weight decay, under a learning-rate schedule."""

from __future__ import annotations

import jax
import numpy as np
import optax


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
