"""The exceptions a run ends with that are not bugs: mistakes in user input (config values,
files, workdirs), a diverged loss, a stop asked for by a signal."""


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
