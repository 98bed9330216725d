"""What the commands that take `--config` share: flag parsing in which a mistyped config key is
one line naming the key and the closest valid ones, and errors in user input reported as one
line and an exit status, not a traceback."""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from typing import NoReturn, Sequence

from absl import app
from absl import flags

from convnet_jax.runs import allocator
from convnet_jax.runs import logs
from convnet_jax.runs import validation
from convnet_jax.errors import one_line
from convnet_jax.errors import RunStopped
from convnet_jax.errors import StorageUnavailable
from convnet_jax.errors import TrainingDiverged
from convnet_jax.errors import UserError
from convnet_jax.errors import WriteFailed

CONFIG_PREFIX = "--config."
# How ml_collections refuses a value of another type for a field: the field's name.
_OVERRIDDEN_FIELD = re.compile(r"Could not override field '(\w+)'")


def _config_path(argv: Sequence[str]) -> str | None:
  """The FILE[:ARG] of the last `--config` in argv, or None."""
  path = None
  for index, arg in enumerate(argv):
    if arg == "--config" and index + 1 < len(argv):
      path = argv[index + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
  return path or None


def load_config_file(path_and_arg: str):
  """The config of a config file `FILE[:ARG]` (its `get_config()`, or `get_config(ARG)`).
  Raises `UserError` naming the file and the problem: missing, not Python, failing on import,
  no `get_config`, or `get_config` failing."""
  path, _, config_arg = path_and_arg.partition(":")
  flag = f"--config {path}"
  if not os.path.isfile(path):
    raise UserError(f"{flag}: no such file" if not os.path.exists(path) else
                    f"{flag}: not a file")
  try:
    source = open(path, encoding="utf-8").read()
    code = compile(source, path, "exec")
  except SyntaxError as error:
    raise UserError(f"{flag}: not valid Python: {error.msg} (line {error.lineno})") from None
  except (OSError, UnicodeDecodeError, ValueError) as error:
    raise UserError(f"{flag}: cannot be read ({type(error).__name__}: {error})") from None
  module = types.ModuleType("_convnet_jax_config")
  module.__file__ = path
  try:
    exec(code, module.__dict__)  # what ml_collections does with a config file, checked first
  except Exception as error:
    raise UserError(f"{flag}: fails when loaded: {type(error).__name__}: "
                    f"{one_line(error)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"{flag}: has no get_config() function, which a config file must define")
  try:
    return module.get_config(config_arg) if config_arg else module.get_config()
  except TypeError as error:
    # A config file of before the groups, setting a group to a value ("config.model = ..."):
    # ml_collections refuses to override the group with another type.
    field = _OVERRIDDEN_FIELD.search(str(error))
    moved = field and validation.moved_key(field.group(1))
    if not moved:
      call = f"get_config({config_arg!r})" if config_arg else "get_config()"
      raise UserError(f"{flag}: {call} failed: TypeError: {one_line(error)}") from None
    raise UserError(f"{flag}: {moved}") from None
  except Exception as error:
    call = f"get_config({config_arg!r})" if config_arg else "get_config()"
    raise UserError(f"{flag}: {call} failed: {type(error).__name__}: "
                    f"{one_line(error)}") from None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad config file, a config-key mistake or a bad flag value
  reported as one line `error: ...` on stderr and exit status 2."""
  path = _config_path(argv)
  config = None
  if path is not None:
    try:
      config = load_config_file(path)
    except UserError as error:
      fail(str(error))
    moved = validation.moved_config_flag(config, argv)
    if moved:
      fail(moved)
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # absl and ml_collections raise several types for a bad flag
    message = validation.unknown_config_key(config, argv) if config is not None else None
    if message is None:
      message = one_line(error)  # the parser's own words, on one line
    fail(message)


def fail(message: str, status: int = 2) -> NoReturn:
  """Prints `error: MESSAGE` on stderr and exits with `status` (2: bad input)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def skip_absent_tpu() -> None:
  """With libtpu installed (the `[tpu]` extra, for TPU VMs and for compiling for a TPU
  topology) on a machine without TPU chips, keeps JAX from starting its TPU runtime, which
  only fails there, printing five lines of libtpu warnings into every command's stderr. Leaves
  JAX alone where JAX_PLATFORMS is set, a GPU plugin is installed or TPU chips are present.
  Call before JAX's backends start."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if importlib.metadata.entry_points(group="jax_plugins"):
    return  # a GPU plugin: JAX must keep choosing among its platforms
  import jax

  from convnet_jax.parallel import data_parallel

  if not data_parallel.tpu_chips_here():
    jax.config.update("jax_platforms", "cpu")


def _native_output_to_stderr() -> None:
  """Keeps stdout for what Python prints (the epoch lines) by pointing the process's file
  descriptor 1 at stderr, with `sys.stdout` on a copy of the original: native libraries print
  there directly (gloo's "[Gloo] Rank 0 is connected to 1 peer ranks" in a multi-process run,
  oneDNN's verbose mode), which would put other text between the JSON lines."""
  sys.stdout.flush()
  original = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(original, "w", buffering=1 if sys.stdout.line_buffering else -1,
                         encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def run(main, native_output_to_stderr: bool = False) -> None:
  """`app.run(main)` with `parse_flags` and a quiet stderr (`logs.quiet_stderr`); a `UserError`
  from `main` is one line and exit status 2, a `TrainingDiverged` one line and status 1, a
  `RunStopped` its line and the signal's status (143, 130), a `WriteFailed` (or a full disk met
  anywhere) one line and status 74, all without a traceback. First of all, the process
  restarts itself with glibc's malloc set to keep the memory it frees
  (`allocator.restart_with_tunables`), then, with `native_output_to_stderr`, points what native
  libraries print at stderr (`_native_output_to_stderr`): in that order, as the restart keeps
  the file descriptors as they are."""
  allocator.restart_with_tunables()
  if native_output_to_stderr:
    _native_output_to_stderr()

  def main_reporting_errors(argv):
    logs.quiet_stderr()
    skip_absent_tpu()
    try:
      return main(argv)
    except UserError as error:
      fail(str(error), 2)
    except TrainingDiverged as error:
      fail(str(error), 1)
    except RunStopped as error:
      print(error, file=sys.stderr, flush=True)
      sys.exit(error.exit_status)
    except StorageUnavailable as error:
      fail(str(error), StorageUnavailable.EXIT_STATUS)
    except WriteFailed as error:
      logs.quiet_background_errors()
      fail(str(error), WriteFailed.EXIT_STATUS)
    except OSError as error:
      if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      # A full disk met outside the writes the run names itself (a library's own file, say).
      logs.quiet_background_errors()
      fail(str(WriteFailed(error.filename or "a file", error)), WriteFailed.EXIT_STATUS)

  app.run(main_reporting_errors, flags_parser=parse_flags)
