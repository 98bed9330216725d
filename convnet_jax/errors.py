"""The error type for mistakes in user input (config values, files, workdirs)."""


class UserError(ValueError):
  """A config value, file or workdir the user supplied is wrong; the message says which and how.

  `main` prints the message as one line and exits with status 2, without a traceback.
  """


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the step and epoch.

  `main` prints the message as one line and exits with status 1.
  """
