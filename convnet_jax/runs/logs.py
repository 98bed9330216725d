"""Where log records go: warnings and errors on stderr, everything in the run's log file.

orbax, JAX and this package log through absl at INFO level: about 44 lines per checkpoint from
orbax alone, which would bury the JSON lines and the progress bar. By default stderr shows
warnings and errors only; absl's own `--verbosity` flag, when given (`--verbosity=0` for INFO,
1 for debug), puts its level back on stderr. A run's log file (WORKDIR/log.txt) always gets
every record at INFO and above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from absl import flags
from absl import logging as absl_logging

from convnet_jax.errors import WriteFailed


def quiet_stderr() -> None:
  """Shows only warnings and errors on stderr, unless `--verbosity` was given. Call after the
  flags are parsed."""
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return
  handler = absl_logging.get_absl_handler()
  handler.setLevel(logging.WARNING)
  handler.addFilter(_not_orbax_thread_errors)


@contextlib.contextmanager
def warnings_quiet():
  """Keeps the warnings logged inside the block off stderr and out of the log file: for those
  that describe a choice made on purpose (orbax's on a read-only checkpoint manager: "setting
  save_interval_steps=0", "Given directory is read only")."""
  logger = absl_logging.get_absl_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


_ORBAX_FILES = f"{os.sep}orbax{os.sep}"


def _not_orbax_thread_errors(record: logging.LogRecord) -> bool:
  """False for the errors orbax's writer threads log with a traceback when a checkpoint write
  fails (one per thread): the same failure reaches the run as an exception, which it reports
  in one line (`errors.WriteFailed`). They stay in the log file."""
  return not (record.levelno >= logging.ERROR and _ORBAX_FILES in record.pathname)


def quiet_background_errors() -> None:
  """After a failed write that the run reports in one line: the errors that orbax's and
  tensorstore's threads and cancelled coroutines raise as they wind down (an event loop already
  closed, printed from tensorstore's threads through `sys.excepthook`; a task whose exception
  was never retrieved; a coroutine collected while Python shuts down) say nothing more, and
  would otherwise print a traceback each. They are logged at debug level instead (the log
  file, `--verbosity`)."""
  def log(kind, exc_type, exc_value):
    try:
      absl_logging.debug("after the failed write, %s: %s: %s", kind,
                         getattr(exc_type, "__name__", exc_type), exc_value)
    except Exception:  # Python may be shutting down: nothing is left to log to
      pass

  # asyncio logs "Task exception was never retrieved" for each write task cut short.
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  sys.excepthook = lambda exc_type, value, _: log("an error", exc_type, value)
  threading.excepthook = lambda args: log(f"thread {args.thread and args.thread.name}",
                                          args.exc_type, args.exc_value)
  sys.unraisablehook = lambda unraisable: log("an unraisable error", unraisable.exc_type,
                                              unraisable.exc_value)


@contextlib.contextmanager
def background_errors_quiet_on_failure():
  """Around a write through orbax: `quiet_background_errors` from the start (a failing write's
  threads print while it is still under way), undone when the write succeeds, kept when it
  raises."""
  hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
  asyncio_level = logging.getLogger("asyncio").level
  quiet_background_errors()
  yield
  sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
  logging.getLogger("asyncio").setLevel(asyncio_level)


class _LogFile(logging.FileHandler):
  """A run's log file that stops at the first record it cannot write (a full disk, say),
  instead of printing a traceback for that record and every one after; `failure` keeps why."""

  failure: BaseException | None = None

  def handleError(self, record: logging.LogRecord) -> None:
    if self.failure is None:
      self.failure = sys.exc_info()[1]

  def emit(self, record: logging.LogRecord) -> None:
    if self.failure is None:
      super().emit(record)


@contextlib.contextmanager
def log_file(path: Path | None):
  """Appends every log record at INFO and above to `path` while entered (None: nothing). A
  record that cannot be written ends the log there, with one warning at the end, unless the run
  ends for a write that failed (`errors.WriteFailed`), whose line says enough."""
  if path is None:
    yield
    return
  handler = _LogFile(path, encoding="utf-8")
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  root = logging.getLogger()
  level = root.level
  root.addHandler(handler)
  # Records below the root logger's level are never made, whatever a handler accepts.
  if level > logging.INFO:
    root.setLevel(logging.INFO)
  absl_level = absl_logging.get_verbosity()
  if absl_level < absl_logging.INFO:
    absl_logging.set_verbosity(absl_logging.INFO)
  in_flight = None
  try:
    yield
  except BaseException as error:
    in_flight = error
    raise
  finally:
    absl_logging.set_verbosity(absl_level)
    root.setLevel(level)
    root.removeHandler(handler)
    try:
      handler.close()
    except OSError as error:  # the last records could not be flushed
      handler.failure = handler.failure or error
    # A run that failed for a write says so itself; otherwise the log's gap gets one line.
    if handler.failure is not None and not isinstance(in_flight, WriteFailed):
      print(f"warning: the log {path} could not be written ({handler.failure}); it stops at "
            f"that record", file=sys.stderr, flush=True)
