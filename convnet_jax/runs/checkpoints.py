"""Checkpoints with orbax: the train state plus a JSON record, verified by checksum on restore.

A checkpoint holds the whole `TrainState` (parameters, optimiser state, step) and a JSON record
with the metrics history of the completed epochs, the per-step metrics of an epoch in progress
(a checkpoint taken mid-epoch), where the run stands in words, the PRNG key data that fixes the
data order, a fingerprint of the config and a SHA-256 of the state's bytes. Checkpoints are
named by the number of steps trained. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a run killed while saving leaves no half
checkpoint behind; the checksum catches one damaged later. Restoring reads arrays and JSON only:
nothing is unpickled and no code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from convnet_jax.runs import logs
from convnet_jax.errors import WriteFailed


def state_checksum(state) -> str:
  """SHA-256 over the shapes, dtypes and bytes of every leaf of a pytree, in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(state):
    array = np.asarray(leaf)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def config_fingerprint(identity: dict[str, Any]) -> str:
  """A short hash of the config values that define a run."""
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# Orbax writes a checkpoint into FOLDER + this suffix and renames it when complete.
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"


def remove_unfinished(directory: Path) -> None:
  """Removes the temporary folders of checkpoints whose writing never finished (a full disk, a
  kill while saving): expected leftovers, which orbax would warn about and never use."""
  if directory.is_dir():
    for unfinished in directory.glob(f"*{UNFINISHED_SUFFIX}*"):
      logging.info("removing the unfinished checkpoint %s", unfinished)
      shutil.rmtree(unfinished, ignore_errors=True)


class ForeignCheckpointError(ValueError):
  """The checkpoint was written by a run of another config."""


class CheckpointStore:
  """The workdir's checkpoints, one per saved step count, keeping the newest `max_to_keep`;
  `read_only`: only restores, touching nothing (a run may be writing there meanwhile)."""

  def __init__(self, directory: Path, max_to_keep: int | None = None, read_only: bool = False):
    self.directory = Path(directory).absolute()
    # Step count of the newest checkpoint known to read back intact: the one restored or the
    # last one saved (None: none yet). Not orbax's latest step, which may be a damaged one.
    self.newest_intact: int | None = None
    # Where the run stood at that checkpoint, in words (its record's "position").
    self.newest_intact_position: str | None = None
    if jax.process_index() == 0 and not read_only:
      remove_unfinished(self.directory)
    with logs.warnings_quiet() if read_only else contextlib.nullcontext():
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               read_only=read_only,
                                               enable_async_checkpointing=False))

  def save(self, step: int, state, record: dict[str, Any]) -> None:
    """Saves `state` and the JSON `record` (a checksum of `state` is added) synchronously as
    checkpoint `step`. Raises `WriteFailed` when it cannot be written; the checkpoints before
    it are untouched, and orbax's temporary folder of this one is removed on the next start."""
    record = dict(record, checksum=state_checksum(state))
    try:
      # A failed write's threads wind down with errors of their own, printed as they come.
      with logs.background_errors_quiet_on_failure():
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))
        self._manager.wait_until_finished()
    except Exception as error:  # tensorstore's ValueError, an OSError: any write that failed
      logging.info("checkpoint %d could not be written in %s: %s", step, self.directory, error)
      raise WriteFailed(f"checkpoint {step} in {self.directory}", error) from None
    self.newest_intact, self.newest_intact_position = step, record.get("position")

  def restore_latest(self, target_state, fingerprints: Sequence[str]):
    """Restores the newest checkpoint that reads back intact, as (state, record), or None if
    there is none. A damaged one is skipped with a warning; one whose config fingerprint is not
    among `fingerprints` (this config's first, then that of the config.json the workdir held
    before this start, as an earlier version of the package wrote it) raises
    `ForeignCheckpointError`."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), record=ocp.args.JsonRestore()))
        state, record = restored.state, restored.record
        intact = record.get("checksum") == state_checksum(state)
      except Exception as error:  # orbax and tensorstore raise many types on damaged files
        logging.warning("checkpoint %s/%d could not be read (%s: %s); trying the previous one",
                        self.directory, step, type(error).__name__, error)
        continue
      if record.get("config_fingerprint") not in fingerprints:
        raise ForeignCheckpointError(
            f"{self.directory}/{step}: checkpoint of another config (fingerprint "
            f"{record.get('config_fingerprint')}, this config {fingerprints[0]}); use a "
            f"new --workdir")
      if not intact:
        logging.warning("checkpoint %s/%d fails its checksum; trying the previous one",
                        self.directory, step)
        continue
      self.newest_intact, self.newest_intact_position = step, record.get("position")
      return state, record
    return None

  def close(self) -> None:
    self._manager.close()
