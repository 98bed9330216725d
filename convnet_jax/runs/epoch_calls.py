"""An epoch as several calls of the compiled training program: how many steps each call runs,
and the per-step metrics of an epoch in progress, which a mid-epoch checkpoint keeps.

One program (`steps.train_steps`) runs any stretch of an epoch, so how an epoch is cut changes
nothing in the numbers: the metrics are kept per step and summed on the host in float64 at the
epoch's end, the same whether the epoch ran in one call, in ten, or across a resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from convnet_jax import steps as steps_lib

# With `operations.steps_per_call=0`, the first call of a run runs this many steps, to measure
# the step time that sizes the later calls: short, as nothing is known yet.
FIRST_CALL_STEPS = 3


class CallPlanner:
  """Where each call of the training program ends: after `operations.steps_per_call` steps,
  or (0) after about `operations.seconds_per_call` at the step time the last call measured; a
  call never runs past the epoch's end or past a step of `operations.checkpoint_every_steps`.
  A short epoch thus runs in one call, the fastest."""

  def __init__(self, operations, budget):
    self._fixed = operations.steps_per_call
    self._target_seconds = float(operations.seconds_per_call)
    self._checkpoint_every = operations.checkpoint_every_steps
    self._budget = budget
    self.step_seconds: float | None = None

  def call_end(self, epoch: int, first_step: int, epoch_steps: int) -> int:
    """The step (of the epoch, exclusive) where the call that starts at `first_step` of epoch
    `epoch` (of `epoch_steps` steps) ends."""
    if self._fixed:
      size = self._fixed
    elif self.step_seconds is None:
      size = FIRST_CALL_STEPS
    else:
      size = max(1, math.floor(self._target_seconds / self.step_seconds))
    end = min(epoch_steps, first_step + size)
    if self._checkpoint_every:
      global_first = self._budget.global_step(epoch, first_step)
      next_checkpoint = (global_first // self._checkpoint_every + 1) * self._checkpoint_every
      end = min(end, next_checkpoint - self._budget.global_step(epoch, 0))
    return end

  def measured(self, num_steps: int, seconds: float) -> None:
    """Records a call's time."""
    self.step_seconds = seconds / num_steps

  def checkpoint_due(self, global_step: int) -> bool:
    """Whether `operations.checkpoint_every_steps` asks for a checkpoint after this many
    steps."""
    return bool(self._checkpoint_every) and global_step % self._checkpoint_every == 0


@dataclasses.dataclass
class EpochInProgress:
  """An epoch's steps done so far: each step's summed loss and correct count (a row per replica
  when stacked), the learning rate it started with and its training seconds."""
  epoch: int
  learning_rate: Any
  loss_sum: np.ndarray
  correct: np.ndarray
  seconds: float = 0.0

  @classmethod
  def start(cls, epoch: int, learning_rate, num_replicas: int) -> EpochInProgress:
    """An epoch with no step done yet."""
    empty = np.zeros((num_replicas, 0) if num_replicas > 1 else (0,), np.float64)
    return cls(epoch, learning_rate, empty, empty.copy())

  @property
  def steps_done(self) -> int:
    return self.loss_sum.shape[-1]

  def add(self, per_step: dict[str, np.ndarray], first_step: int, end_step: int,
          seconds: float) -> None:
    """Appends steps first_step..end_step - 1 of a call's per-step metrics (arrays over every
    step of the epoch, the last axis)."""
    assert first_step == self.steps_done, (first_step, self.steps_done)
    for name in ("loss_sum", "correct"):
      part = np.asarray(per_step[name], np.float64)[..., first_step:end_step]
      setattr(self, name, np.concatenate([getattr(self, name), part], axis=-1))
    self.seconds += seconds

  def step_losses(self, num_examples: int, batch_size: int,
                  keep_fraction: float = 1.0) -> np.ndarray:
    """Each step's mean loss so far (over the examples it trained on, `steps.batch_sizes`)."""
    return self.loss_sum / steps_lib.batch_sizes(num_examples, batch_size, self.steps_done,
                                                 keep_fraction)

  def totals(self, num_examples: int, batch_size: int,
             keep_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """The summed metrics of the steps done (float64), with each step's mean loss under
    "step_losses"."""
    return {"loss_sum": self.loss_sum.sum(axis=-1), "correct": self.correct.sum(axis=-1),
            "step_losses": self.step_losses(num_examples, batch_size, keep_fraction)}

  def to_json(self) -> dict[str, Any]:
    """The record a mid-epoch checkpoint keeps (float32 metrics are exact as JSON numbers)."""
    return {"epoch": self.epoch, "steps_done": self.steps_done,
            "learning_rate": np.asarray(self.learning_rate).tolist(),
            "loss_sum": self.loss_sum.tolist(), "correct": self.correct.tolist(),
            "seconds": self.seconds}

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> EpochInProgress:
    return cls(record["epoch"], np.asarray(record["learning_rate"]),
               np.asarray(record["loss_sum"], np.float64),
               np.asarray(record["correct"], np.float64), record["seconds"])
