"""A run's folder: its file names, atomic writes, its lock, and the check that a folder holds
this run.

A workdir is resumed only by the same run: the same config, leaving out the groups that say how
a run is operated, not what it computes (`validation.OPERATION_GROUPS`). Sweeps use the same
comparison for their folders and studies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

from absl import logging

from convnet_jax import optim
from convnet_jax.models import airbench
from convnet_jax.runs import validation
from convnet_jax.errors import create_folder
from convnet_jax.errors import FolderUnwritable
from convnet_jax.errors import UserError

# The key of config.json that records the convolution path a run resolved to and why. Not a
# config key: the same config may resolve differently on another machine, to the same math.
CONV_RECORD_KEY = "conv_implementation_used"
# The lock file of a workdir in use by a training run.
RUN_LOCK = "run.lock"


class RunFiles:
  """The paths of a workdir's outputs."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.config = self.workdir / "config.json"
    self.metrics = self.workdir / "metrics.jsonl"
    self.predictions = self.workdir / "preds"
    self.checkpoints = self.workdir / "checkpoints"
    self.tensorboard = self.workdir / "tensorboard"
    self.log = self.workdir / "log.txt"
    self.lock = self.workdir / RUN_LOCK


def write_atomically(path: Path, content: str | Callable[[Path], None]) -> None:
  """Writes `content` (text, or a function that writes to the path it is given) via a temporary
  file and a rename, so a kill never leaves a half-written file. The temporary name is the
  process's own, so processes sharing a folder (sweep workers) never rename each other's. A
  write that fails (a full disk) leaves no temporary file behind."""
  temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    if callable(content):
      content(temporary)
    else:
      temporary.write_text(content)
    temporary.replace(path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


# Config keys added after runs were first saved (in today's groups), with the value that
# reproduces what a run computed before each existed (as config.json holds it): a saved config
# without one ran with that value, so its workdir still resumes.
ADDED_KEYS = {
    "optim.lr_multipliers": [],
    "freeze.late_schedule": "main",
    "muon.parameters": [],
    "muon.learning_rate": 0.24,
    "muon.momentum": 0.6,
    "muon.nesterov": True,
    "muon.newton_schulz_steps": 3,
    "muon.normalize_filters": True,
    "muon.newton_schulz_coefficients": list(optim.NEWTON_SCHULZ_COEFFICIENTS),
    "muon.weight_decay": 0.0,
    "muon.normalize_period": 1,
    "muon.normalize_period_growth": 0,
    "model.airbench.output_scale": 1 / 9,
    "model.airbench.head_unit_std": False,
    "model.airbench.activation": "gelu",
    "model.airbench.whitening_examples": airbench.WHITENING_EXAMPLES,
    "model.airbench.widths": [64, 256, 256],
    "model.airbench.convs_per_group": 2,
    "augment.cutout": 0,
    "select.keep_fraction": 1.0,
    "select.proxy_widths": [32, 64, 64],
    "select.proxy_convs_per_group": 2,
    "select.proxy_update_every": 4,
    "augment.brightness": 0.0,
    "augment.contrast": 0.0,
    "eval.batch_norm_statistics": "batch",
    # Runs before it computed BatchNorm in XLA: loaded, they evaluate to their recorded digits.
    # (Not part of a run's identity, see `identity`: resumed, they go on as the command says.)
    "model.batch_norm_implementation": "jax",
}


def upgraded(values: dict) -> dict:
  """A saved config (as JSON data, of any version) in today's groups: the flat keys of before
  the groups moved to their places (`validation.MOVED_KEYS`), and each of `ADDED_KEYS` it lacks
  at its old value."""
  values = json.loads(json.dumps(values))  # a deep copy
  # All taken out first: an old key may have the name of a group ("model", "augment").
  moved = [(new, values.pop(old)) for old, new in validation.MOVED_KEYS.items()
           if old in values and not isinstance(values[old], dict)]
  for key, value in moved:
    _group_of(values, key)[key.rsplit(".", 1)[-1]] = value
  for key, value in ADDED_KEYS.items():
    _group_of(values, key).setdefault(key.rsplit(".", 1)[-1], value)
  return values


def _group_of(values: dict, dotted: str) -> dict:
  """The mapping in `values` that holds the dotted key's last part, made where missing."""
  for group in dotted.split(".")[:-1]:
    values = values.setdefault(group, {})
  return values


def identity(values: dict) -> dict:
  """Config values (of a config, or as config.json holds them) without the operation groups,
  the recorded facts about a run and how BatchNorm is computed (the same function either way,
  in other last digits): what the run computes."""
  kept = {key: value for key, value in values.items()
          if key not in validation.OPERATION_GROUPS and key != CONV_RECORD_KEY}
  if isinstance(kept.get("model"), Mapping):
    kept["model"] = {key: value for key, value in kept["model"].items()
                     if key != "batch_norm_implementation"}
  return kept


def flatten(values: Mapping, prefix: str = "", keep=()) -> dict:
  """Nested mappings as one level of dotted keys ("operations.tensorboard"); the keys in `keep`
  stay whole."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, Mapping) and key not in keep:
      flat.update(flatten(value, f"{prefix}{key}.", keep))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differences(here: Mapping, there: Mapping, limit: int = 3) -> str:
  """The first `limit` keys whose values differ, as "key: A here, B there, ..." (nested
  mappings compared key by key)."""
  here, there = flatten(here), flatten(there)
  differing = sorted(key for key in set(here) | set(there) if here.get(key) != there.get(key))
  return ", ".join(f"{key}: {here.get(key)!r} here, {there.get(key)!r} there"
                   for key in differing[:limit]) + (", ..." if len(differing) > limit else "")


def check_workdir(files: RunFiles, run_identity: dict) -> dict | None:
  """Checks the workdir before any work. Returns the identity its config.json holds (as
  written, of whichever version wrote it) when it holds a run of the same config to resume,
  None when it is new; raises `UserError` for a file in its place, a corrupt workdir or another
  config's run, so nothing already written is lost."""
  workdir = files.workdir
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir}: exists and is not a folder")
  run_outputs = [path for path in (files.metrics, files.predictions, files.checkpoints)
                 if path.exists()]
  if not files.config.exists():
    if run_outputs:
      raise UserError(f"--workdir {workdir}: holds {', '.join(p.name for p in run_outputs)} but "
                      f"no config.json; not a convnet_jax run or corrupt. Choose a new workdir "
                      f"so nothing is overwritten")
    return None
  try:
    saved = json.loads(files.config.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{files.config}: not valid JSON ({error}); corrupt workdir. Choose a new "
                    f"workdir so nothing is overwritten") from None
  if not isinstance(saved, dict):
    raise UserError(f"{files.config}: expected a JSON object; corrupt workdir")
  if identity(upgraded(saved)) != run_identity:
    raise UserError(f"--workdir {workdir}: holds a run of another config "
                    f"({differences(run_identity, identity(upgraded(saved)))}); use a new "
                    f"workdir or the same config to resume")
  return identity(saved)


def finished_run(files: RunFiles, num_epochs: int) -> list[str] | None:
  """The JSON lines of metrics.jsonl when the workdir holds a finished run of `num_epochs`
  epochs (every epoch's line and the final `preds`, which a run writes last), else None."""
  if not files.predictions.is_file() or not files.metrics.is_file():
    return None
  lines = files.metrics.read_text().splitlines()
  try:
    epochs = [json.loads(line)["epoch"] for line in lines]
  except (ValueError, KeyError, TypeError):
    return None  # not this package's lines: the run's own checks report the workdir
  return lines if epochs == list(range(num_epochs)) else None


class FolderLock:
  """An exclusive lock on one folder for one process, as a context manager: a run's workdir,
  or a sweep's folder.

  The lock is `flock` on the file FOLDER/NAME, which names its holder (host, pid, start time):
  the kernel drops it when the holder dies, even by SIGKILL, so a lock left by a dead process
  is simply taken over (`taken_over` then names the process that left it), and two processes
  starting at the same instant cannot both get it. Entering raises `UserError` naming the
  folder and the holder when another process holds it, before anything is written. The folder
  is created if missing, and removed again on exit if the holder wrote nothing else into it.
  """

  def __init__(self, folder: str | Path, name: str, flag: str = "--workdir",
               advice: str = "wait for it to end or choose another folder"):
    self.folder = Path(folder)
    self.path = self.folder / name
    self._flag, self._advice = flag, advice
    self._fd: int | None = None
    self._created = False
    self.taken_over: str | None = None

  def __enter__(self) -> FolderLock:
    if self.folder.exists() and not self.folder.is_dir():
      raise UserError(f"{self._flag} {self.folder}: exists and is not a folder")
    self._created = not self.folder.exists()
    create_folder(self.folder, self._flag)
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as error:  # a folder that exists on a read-only file system, say
        self._remove_created_folder()
        raise FolderUnwritable(self.folder, self._flag, error,
                               "choose a folder that can be written") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        self._remove_created_folder()
        raise UserError(f"{self._flag} {self.folder}: in use by {holder}; "
                        f"{self._advice}") from None
      try:  # the holder before us may have removed the file between our open and our lock
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    previous = _read_holder(fd, wait_seconds=0.0)
    if previous != "another process":
      self.taken_over = previous
    holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + "\n").encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc_info) -> None:
    if self._fd is None:
      return
    # Unlinked while still held, so the next holder always locks a file that exists.
    self.path.unlink(missing_ok=True)
    os.close(self._fd)
    self._fd = None
    self._remove_created_folder()

  def _remove_created_folder(self) -> None:
    if self._created:
      try:
        self.folder.rmdir()  # only if empty: a run that wrote anything keeps its folder
      except OSError:
        pass


def _read_holder(fd: int, wait_seconds: float = 1.0) -> str:
  """The lock file's holder as "process PID on HOST since TIME", or "another process" when it
  names none (yet: the holder writes its name just after locking)."""
  deadline = time.monotonic() + wait_seconds
  while True:
    try:
      holder = json.loads(os.pread(fd, 4096, 0).decode())
      return f"process {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
      if time.monotonic() >= deadline:
        return "another process"
      time.sleep(0.05)


@contextlib.contextmanager
def holding(files: RunFiles):
  """The workdir locked for this run (`workdir.FolderLock`), saying so in the log when the lock
  was taken over from a run that ended without releasing it."""
  with FolderLock(files.workdir, RUN_LOCK) as lock:
    if lock.taken_over:
      logging.warning("took over the lock of %s in %s, which ended without releasing it",
                      lock.taken_over, files.workdir)
    yield lock
