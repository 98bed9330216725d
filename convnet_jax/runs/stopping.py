"""Stopping a run cleanly on SIGTERM or Ctrl-C (SIGINT).

Batch schedulers and preemptible machines send SIGTERM and kill the process some seconds later;
a user presses Ctrl-C. The first of either only asks the run to stop: the loop sees it at the
next boundary between its calls (`operations.seconds_per_call` apart at most, by default),
saves a checkpoint and raises `RunStopped`, which `main` turns into one line and the
conventional exit status (143 for SIGTERM, 130 for SIGINT). A second signal gets the system's
default action, so a second Ctrl-C ends the process at once, even inside a long compiled call.

This is the process's own handler rather than orbax's preemption policy or JAX's
`reached_preemption_sync_point`: those need `jax.distributed` (its coordination service is what
catches the signal), and most runs are one process. In a multi-process run every process
handles its own signal and `StopSignals.agree` makes all of them stop at the same step.
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import jax
from jax.experimental import multihost_utils

from convnet_jax.errors import RunStopped

__all__ = ["RunStopped", "StopSignals", "exit_status", "request_stop"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
  """The shell's status for a process ended by signal `signum`: 128 + its number."""
  return 128 + int(signum)


class StopSignals:
  """While entered, the first SIGTERM or SIGINT is recorded in `received` instead of ending
  the process; later ones end it at once. Outside the main thread (where Python cannot handle
  signals) it does nothing."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signum
    for signum_ in SIGNALS:  # the next one ends the process, even inside a compiled call
      signal.signal(signum_, signal.SIG_DFL)

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def agree_on_stop_and_call_end(self, proposal: int) -> tuple[int | None, int]:
    """(the signal to stop on now or None, `proposal`), the same in every process of the run:
    the signal received by the lowest process that has one, and process 0's proposal (the end
    of the next call, which each process sizes from its own clock). One collective in a
    multi-process run, so every process must call it at the same points of the loop."""
    if jax.process_count() == 1:
      return self.received, proposal
    gathered = np.asarray(multihost_utils.process_allgather(
        np.array([self.received or 0, proposal], np.int32))).reshape(-1, 2)
    received = [int(value) for value in gathered[:, 0] if value]
    return (received[0] if received else None), int(gathered[0, 1])

  @staticmethod
  def name(signum: int) -> str:
    """"SIGTERM", "SIGINT"."""
    return signal.Signals(signum).name


def request_stop(signum: int = signal.SIGTERM) -> bool:
  """Asks the run in progress to stop as a first `signum` would (a checkpoint at the next
  call, then `RunStopped`), from any thread; False when no run is in progress, that is, when no
  `StopSignals` is the process's handler."""
  signals = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
  if not isinstance(signals, StopSignals):
    return False
  signals.received = signals.received or signum
  return True
