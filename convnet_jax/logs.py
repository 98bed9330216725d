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
from pathlib import Path

from absl import flags
from absl import logging as absl_logging


def quiet_stderr() -> None:
  """Shows only warnings and errors on stderr, unless `--verbosity` was given. Call after the
  flags are parsed."""
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return
  absl_logging.get_absl_handler().setLevel(logging.WARNING)


@contextlib.contextmanager
def log_file(path: Path | None):
  """Appends every log record at INFO and above to `path` while entered (None: nothing)."""
  if path is None:
    yield
    return
  handler = logging.FileHandler(path, encoding="utf-8")
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
  try:
    yield
  finally:
    absl_logging.set_verbosity(absl_level)
    root.setLevel(level)
    root.removeHandler(handler)
    handler.close()
