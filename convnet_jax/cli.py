"""What the commands that take `--config` share: flag parsing in which a mistyped config key is
one line naming the key and the closest valid ones, and errors in user input reported as one
line and an exit status, not a traceback."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from typing import NoReturn, Sequence

import ml_collections
from absl import app
from absl import flags

from convnet_jax.errors import TrainingDiverged
from convnet_jax.errors import UserError

CONFIG_PREFIX = "--config."


def _load_config_file(argv: Sequence[str]):
  """The ConfigDict of the `--config FILE[:ARG]` in argv (None if absent or unloadable)."""
  path = None
  for index, arg in enumerate(argv):
    if arg == "--config" and index + 1 < len(argv):
      path = argv[index + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
  if not path:
    return None
  path, _, config_arg = path.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_convnet_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception:  # the flag parser will report a bad config file itself
    return None


def unknown_config_key(config, argv: Sequence[str]) -> str | None:
  """A one-line message for the first `--config.KEY=VALUE` of argv whose KEY is not in
  `config`, naming the closest valid keys; None when every key exists."""
  for arg in argv:
    if not arg.startswith(CONFIG_PREFIX):
      continue
    dotted = arg[len(CONFIG_PREFIX):].split("=", 1)[0]
    node, walked = config, []
    for part in dotted.split("."):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in keys:
        prefix = ".".join(walked + [""])
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
        hint = ("did you mean " + " or ".join(prefix + key for key in close) + "?" if close
                else f"the keys{' of ' + prefix[:-1] if walked else ''} are listed in the config "
                     f"file")
        return f"--config.{dotted}: no such config key; {hint}"
      node, walked = node[part], walked + [part]
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a config-key mistake or a bad flag value reported as one line
  `error: ...` on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # absl and ml_collections raise several types for a bad flag
    config = _load_config_file(argv)
    message = unknown_config_key(config, argv) if config is not None else None
    if message is None:
      message = " ".join(str(error).split())  # the parser's own words, on one line
    fail(message)


def fail(message: str, status: int = 2) -> NoReturn:
  """Prints `error: MESSAGE` on stderr and exits with `status` (2: bad input)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def run(main) -> None:
  """`app.run(main)` with `parse_flags`; a `UserError` from `main` is one line and exit status
  2, a `TrainingDiverged` one line and status 1, with no traceback."""

  def main_reporting_errors(argv):
    try:
      return main(argv)
    except UserError as error:
      fail(str(error), 2)
    except TrainingDiverged as error:
      fail(str(error), 1)

  app.run(main_reporting_errors, flags_parser=parse_flags)
