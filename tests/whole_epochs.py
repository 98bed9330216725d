"""A whole epoch of `steps.train_steps` in one call, with its summed metrics: the tests' way to
train an epoch without the loop (the trainer calls `train_steps` through `programs`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convnet_jax import steps
from convnet_jax import budget as budget_lib


def train_epoch(state: steps.TrainState, images: jax.Array, labels: jax.Array,
                data_key: jax.Array, epoch: jax.Array, mean: jax.Array, std: jax.Array, *,
                batch_size: int, drop_last_batch: bool, augment: steps.AugmentOptions | None = None,
                batch_sharding=None, num_steps: int | None = None,
                options: steps.StepOptions = steps.StepOptions()):
  """One epoch of `train_steps` in one call: every example once (the last batch short unless
  `drop_last_batch`), or only the first `num_steps` full batches (a fractional last epoch, which
  never runs the short batch). Returns the new state and the epoch's summed metrics, with each
  step's mean loss under "step_losses"."""
  num_examples = labels.shape[0]
  end_step = budget_lib.steps_per_epoch(num_examples, batch_size, drop_last_batch)
  if num_steps is not None:
    end_step = min(num_steps, num_examples // batch_size)
  data = steps.DeviceData(images, labels, images[:0], labels[:0], mean, std)
  state, per_step = steps.train_steps(
      state, data, data_key, epoch, 0, end_step, options=steps.EpochOptions(
          batch_size, drop_last_batch, augment, options, batch_sharding))
  per_step = jax.tree_util.tree_map(lambda x: x[:end_step], per_step)
  totals = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_step)
  totals["step_losses"] = per_step["loss_sum"] / steps.batch_sizes(num_examples, batch_size,
                                                                    end_step)
  return state, totals
