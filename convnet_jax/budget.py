"""A run's steps: how many an epoch has, how many the run takes, and where a step falls.

The optimiser's schedules, the training loop, the call planner and the checkpoints all count
steps through one `StepBudget`.
"""

from __future__ import annotations

import dataclasses
import math


def steps_per_epoch(num_examples: int, batch_size: int, drop_last_batch: bool) -> int:
  """79 for 10,000 examples in batches of 128 (the last one 16 long) unless it is dropped."""
  if drop_last_batch:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def epochs_run(num_epochs: float) -> int:
  """Epochs a run of `num_epochs` starts, a fractional last one included (10 for 9.9)."""
  return math.ceil(num_epochs)


def evaluation_is_due(every_epochs: int, epoch: int, epochs_run: int) -> bool:
  """Every `every_epochs` epochs (`operations.eval_every_epochs`; 0: never), and after the
  last."""
  return epoch + 1 == epochs_run or (every_epochs > 0 and (epoch + 1) % every_epochs == 0)


def _whole_steps(steps: float) -> int:
  """ceil(steps), but a product such as 0.07 x 100 = 7.000000000000001 counts as 7 steps."""
  return math.ceil(round(steps, 9))


@dataclasses.dataclass(frozen=True)
class StepBudget:
  """A run's steps: `steps_per_epoch` steps in every epoch but a fractional last one, over
  `num_epochs` epochs (e.g. airbench's 9.9), and the steps of the parameters trained for only
  the first `late_freeze_epochs` (`freeze.late_epochs`)."""
  steps_per_epoch: int
  num_epochs: float
  late_freeze_epochs: float = 0

  @classmethod
  def for_examples(cls, num_examples: int, batch_size: int, drop_last_batch: bool,
                   num_epochs: float, late_freeze_epochs: float = 0) -> StepBudget:
    """The budget of `num_epochs` epochs over `num_examples` training examples in batches of
    `batch_size` (`drop_last_batch`: the short last one dropped)."""
    return cls(steps_per_epoch(num_examples, batch_size, drop_last_batch), num_epochs,
               late_freeze_epochs)

  @property
  def total_steps(self) -> int:
    """ceil(steps_per_epoch * num_epochs): 395 for 5 epochs of 79 steps, 476 for airbench's 9.9
    epochs of 48 (the last epoch then stops after 44 of its steps)."""
    return _whole_steps(self.steps_per_epoch * self.num_epochs)

  @property
  def epochs_run(self) -> int:
    """Epochs the loop starts, the fractional last one included (10 for 9.9)."""
    return epochs_run(self.num_epochs)

  @property
  def late_freeze_step(self) -> int:
    """The first step at which `late_frozen_parameters` no longer train:
    ceil(late_freeze_epochs * steps_per_epoch), 144 for 3 epochs of 48 steps, 7 for hiverge's
    0.19 epochs of 32."""
    return _whole_steps(self.late_freeze_epochs * self.steps_per_epoch)

  def epoch_steps(self, epoch: int) -> int:
    """How many steps epoch `epoch` runs: all of them, but fewer in a fractional last epoch."""
    return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

  def global_step(self, epoch: int, step: int) -> int:
    """The number of steps trained at step `step` of epoch `epoch` (every epoch before the
    last is whole)."""
    return epoch * self.steps_per_epoch + step

  def position(self, epoch: int, steps_done: int) -> str:
    """Where a run stands, in words: "after epoch 3", "at step 12 of epoch 4"."""
    if steps_done == 0:
      return f"after epoch {epoch - 1}" if epoch else "before the first step"
    if steps_done >= self.epoch_steps(epoch):
      return f"after epoch {epoch}"
    return f"at step {steps_done} of epoch {epoch}"
