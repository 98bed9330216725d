"""The exceptions a run ends with that are not bugs: mistakes in user input (config values,
files, workdirs), a diverged loss, a stop asked for by a signal, a file that could not be
written."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

import jax


class UserError(ValueError):
  """A config value, file or workdir the user supplied is wrong; the message says which and how.

  `main` prints the message as one line and exits with status 2, without a traceback.
  """


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the step and epoch.

  `main` prints the message as one line and exits with status 1.
  """


class RunStopped(Exception):
  """A SIGTERM or SIGINT stopped the run at a step boundary, after saving a checkpoint; the
  message says where and how to resume.

  `main` prints the message as one line and exits with `exit_status` (143 for SIGTERM, 130 for
  SIGINT), as the shell reports a process ended by that signal.
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


class StorageUnavailable(Exception):
  """A sweep's database stayed out of reach for `sweep.storage_retry_seconds`; the message
  says so and how the sweep goes on. The sweep command exits with `EXIT_STATUS` (75, sysexits'
  EX_TEMPFAIL: start it again once the database is back)."""

  EXIT_STATUS = 75


class OutOfMemory(UserError):
  """A batch (or the model) does not fit in the device's memory; the message names the batch
  size, the model and the dtype. `main` exits with status 2, like any other input to change."""


# How XLA words an allocation that failed, with its size.
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: Out of memory (?:while trying to allocate|"
                            r"allocating) (\d+) bytes")


def out_of_memory_bytes(error: BaseException) -> int | None:
  """The size XLA could not allocate, when `error` is its out-of-memory error; else None."""
  match = _OUT_OF_MEMORY.search(str(error))
  return int(match.group(1)) if match else None


class WriteFailed(Exception):
  """A file of the run could not be written (a full disk, a quota, a read-only folder); the
  message names the file, the reason and, once the run adds it (`naming_the_checkpoint`), the
  checkpoint it can resume from.

  `main` prints the message as one line and exits with `EXIT_STATUS` (74, sysexits' EX_IOERR).
  """

  EXIT_STATUS = 74

  def __init__(self, what: str, cause: BaseException, resume_note: str = ""):
    self.what, self.cause, self.reason = what, cause, write_failure_reason(cause)
    self.resume_note = resume_note
    super().__init__(f"{self.reason} writing {what}{resume_note}")

  @property
  def out_of_space(self) -> bool:
    return self.reason in (os.strerror(errno.ENOSPC).lower(), os.strerror(errno.EDQUOT).lower())

  def naming_the_checkpoint(self, step: int | None, directory) -> WriteFailed:
    """The same failure, its message saying which checkpoint is intact and what to do."""
    fix = "free space" if self.out_of_space else "fix that"
    note = (f"; the checkpoint of step {step} is intact; {fix} and run the same command to "
            f"resume" if step is not None else
            f"; no checkpoint was written yet in {directory}; {fix} and run the same command to "
            f"start again")
    return WriteFailed(self.what, self.cause, note)


class FolderUnwritable(WriteFailed):
  """A folder a command must write into cannot be created or written in (a read-only file
  system, no permission): met before any work, so nothing is lost. The message names the folder,
  what chose it (`who`: "--workdir", "the data cache", ...), the OS's reason and the way out.

  Exits with `WriteFailed.EXIT_STATUS` (74), as every write that fails.
  """

  def __init__(self, folder, who: str, cause: BaseException, advice: str):
    super().__init__(str(folder), cause)
    self.args = (f"{who} {folder}: cannot write there ({self.reason}); {advice}",)

  def naming_the_checkpoint(self, step, directory) -> FolderUnwritable:
    return self  # no checkpoint is involved: the message says all


def check_writable_folder(folder, who: str, advice: str = "choose a folder that can be written"
                          ) -> None:
  """Checks, creating nothing, that `folder` can be written in or created: it, or the nearest of
  its parents that exists, must be a folder this process may write in. Raises `UserError` when
  that is a file, and `FolderUnwritable` (exit 74) when it is on a read-only file system or
  not writable (the folder named as `who` names it)."""
  folder = Path(folder)
  existing = folder
  while not os.path.lexists(existing) and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "exists and is not a folder" if existing == folder else f"{existing} is not a folder"
    raise UserError(f"{who} {folder}: {where}")
  if not os.access(existing, os.W_OK | os.X_OK):
    code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    raise FolderUnwritable(folder, who, OSError(code, os.strerror(code), str(existing)), advice)


def create_folder(folder, who: str, advice: str = "choose a folder that can be written") -> None:
  """`folder` and its missing parents created (`check_writable_folder`'s errors for a folder that
  cannot be, whatever the check could not foresee: a file system that turned read-only, a
  quota)."""
  check_writable_folder(folder, who, advice)
  try:
    Path(folder).mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise UserError(f"{who} {folder}: a part of the path is not a folder") from None
  except OSError as error:
    raise FolderUnwritable(folder, who, error, advice) from None


# The OS error code in the words of tensorstore (orbax's writer) and of Python's OSError.
_ERROR_CODE = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")


def write_failure_reason(error: BaseException) -> str:
  """Why a write failed, in the OS's words ("no space left on device"), or the error's own on
  one line where it names no OS error code."""
  code = getattr(error, "errno", None)
  if not code:
    match = _ERROR_CODE.search(str(error))
    code = match and int(match.group(1) or match.group(2))
  return os.strerror(code).lower() if code else one_line(error)


def one_line(error: BaseException, limit: int = 300) -> str:
  """An error's message on one line, at most `limit` characters."""
  return " ".join(str(error).split())[:limit]


# What each batch-size key sizes, in the out-of-memory line.
BATCH_SIZE_PHASES = {"batch_size": "a training step", "eval.batch_size": "the evaluation"}


@contextlib.contextmanager
def naming_the_batch_size(key: str, value: int, subject: str):
  """XLA's out-of-memory error in what the batch-size config key `key` sizes ("batch_size",
  "eval.batch_size") becomes one `OutOfMemory` line naming the key and its `value` to lower,
  and the `subject` ("model resnet18 in float32", with its replicas)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as error:
    size = out_of_memory_bytes(error)
    if size is None:
      raise
    raise OutOfMemory(
        f"config.{key}={value}: out of memory in {BATCH_SIZE_PHASES[key]} of {subject}: XLA "
        f"could not allocate {size / 2**30:.1f} GiB on {jax.devices()[0].platform}; lower "
        f"{key}") from None


@contextlib.contextmanager
def naming_the_intact_checkpoint(store):
  """A `WriteFailed` leaving the run says which checkpoint it can resume from."""
  try:
    yield
  except WriteFailed as error:
    if error.resume_note:
      raise
    raise error.naming_the_checkpoint(store.newest_intact, store.directory) from None
