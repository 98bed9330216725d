"""Hyperparameter sweeps: `python -m convnet_jax.sweep --config configs/sweep_lr.py --workdir DIR`.

A sweep config file (see `configs/sweep_lr.py` and `sweep_config`) holds, in its `get_config()`,
the training config every trial starts from (`base`), the sampler and its settings, and a
function `sweep(trial)` that returns one trial's training-config values. optuna runs the trials,
each one call of `train.train_and_evaluate` in its own workdir `DIR/trials/NNNN`, and keeps the
study in a database: by default the SQLite file `DIR/sweep.db` (run the same command again to
resume), or any SQLAlchemy URL in `storage`, which lets several machines work on one sweep.
After every trial the reports are rewritten (`sweep_report`). The study, its storage and the
re-running of trials whose worker died are in `sweep_study`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import jax
import optuna
from absl import app
from absl import flags
from ml_collections import config_flags

from convnet_jax import train
from convnet_jax.runs import cli
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import check_writable_folder
from convnet_jax.errors import RunStopped
from convnet_jax.errors import TrainingDiverged
from convnet_jax.errors import UserError
from convnet_jax.sweep import config as sweep_config
from convnet_jax.sweep import report as sweep_report
from convnet_jax.sweep import study as sweep_study
from convnet_jax.sweep.config import SweepFunction


# How often a worker with nothing left to start looks at the other workers' trials (at most).
MAX_POLL_SECONDS = 10


def _trial_workdir(trial) -> str:
  """DIR-relative workdir: a re-run trial keeps its original's (inherited in its user attrs)."""
  return trial.user_attrs.get("workdir") or f"trials/{trial.number:04d}"


def make_objective(config, workdir: Path, sweep_fn: SweepFunction):
  """The optuna objective: trains one trial in its workdir and returns its final
  `config.objective`. Records in the trial's user attrs its workdir (relative to DIR), host and
  absolute path, its final metrics and, if it fails, its error ("Type: message")."""

  def objective(trial: optuna.Trial) -> float:
    trials = trial.study.get_trials(deepcopy=False)
    this = next(t for t in trials if t.number == trial.number)
    if sweep_study.place_in_budget(trials, this) >= config.num_trials:
      # Another worker took the last place at the same moment: end without training.
      trial.set_user_attr(sweep_study.SURPLUS_ATTR, True)
      raise optuna.TrialPruned(f"trial {trial.number} is beyond num_trials={config.num_trials}")
    relative = _trial_workdir(trial)
    trial.set_user_attr("workdir", relative)
    # Where and by which worker it ran, for the workers of a shared study (whose DIRs may
    # differ).
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("path", str((workdir / relative).resolve()))
    try:
      overrides = sweep_fn(trial)
      training_config = sweep_config.trial_config(config.base, overrides)
      values = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else
                         f"{name}={value}" for name, value in trial.params.items())
      print(f"trial {trial.number}: {values} in {workdir / relative}", file=sys.stderr,
            flush=True)
      # stdout is kept for the final table; the epochs' JSON lines are in each metrics.jsonl.
      with contextlib.redirect_stdout(sys.stderr):
        metrics = train.train_and_evaluate(training_config, workdir / relative)
    except (KeyboardInterrupt, RunStopped):
      # Ctrl-C or SIGTERM: queue this trial again before optuna marks it failed, so it is
      # resumed from the checkpoint it saved.
      sweep_study.retry(trial.study, next(t for t in trial.study.get_trials(deepcopy=False)
                                          if t.number == trial.number))
      raise
    except Exception as error:
      trial.set_user_attr("error", f"{type(error).__name__}: {error}")
      print(f"trial {trial.number} failed: {type(error).__name__}: {error}", file=sys.stderr,
            flush=True)
      if not isinstance(error, (UserError, TrainingDiverged)):
        traceback.print_exc(file=sys.stderr)  # unexpected: the traceback helps
      raise
    trial.set_user_attr("metrics", metrics)
    print(f"trial {trial.number}: {config.objective}={metrics[config.objective]:.4f}",
          file=sys.stderr, flush=True)
    return metrics[config.objective]

  return objective


def run_sweep(config, workdir: str | os.PathLike, sweep_fn: SweepFunction) -> list[dict]:
  """Runs (or resumes) the sweep in `workdir` until `config.num_trials` trials have finished,
  counting every worker and every earlier run. With shared storage it returns only once no trial
  of the study is running: it waits for the other workers' trials and re-runs those whose
  worker died.

  Args:
    config: the sweep config (see configs/sweep_lr.py): the training config `base`, the
      sampler and its settings, the objective, the storage.
    workdir: the sweep's folder (DIR/trials/NNNN hold the trials' workdirs).
    sweep_fn: `sweep(trial)`, returning one trial's training-config values by dotted key.

  Returns:
    The trials' rows (trials.csv's), best first.

  Raises:
    UserError: a bad sweep config or a workdir of another sweep, before any training.
    FolderUnwritable: a workdir that cannot be written, before any training (exit 74).
    StorageUnavailable: the database stayed out of reach (exit 75).
  """
  workdir = Path(workdir)
  space = sweep_config.validate_sweep_config(config, sweep_fn)
  identity = sweep_config.sweep_identity(config, space)
  new = not sweep_config.check_sweep_dir(workdir, identity)
  check_writable_folder(workdir, "--workdir")  # before the study is opened or created

  def record_sweep():
    workdir.mkdir(parents=True, exist_ok=True)
    # Atomically: workers sharing DIR may start together and read it.
    workdir_lib.write_atomically(workdir / "sweep.json", json.dumps(identity, indent=2) + "\n")

  with contextlib.ExitStack() as stack:
    if not config.storage:  # the SQLite file and its lock live in DIR
      if new:
        record_sweep()
      stack.enter_context(sweep_study.lock_sweep_dir(workdir))
    study = sweep_study.open_study(config, workdir, identity)
    if new and config.storage:  # only once the database has been reached
      record_sweep()
    objective = make_objective(config, workdir, sweep_fn)

    def write_reports(study, _):
      sweep_report.write_reports(study, config, workdir, space)

    def stop_when_done(study, _):
      if sweep_study.trials_left(study, config.num_trials) == 0:  # other workers' trials count too
        study.stop()

    try:
      while True:
        left = sweep_study.trials_left(study, config.num_trials)
        if left:
          study.optimize(objective, n_trials=left, catch=(Exception,), gc_after_trial=True,
                         callbacks=[write_reports, stop_when_done])
          continue
        if not config.storage or not sweep_study.running_trials(study):
          break  # every trial of the study has ended
        # Shared storage: other workers' trials are running. Wait for them, and take over any
        # whose worker stops sending heartbeats, so the study never ends with one left RUNNING.
        time.sleep(min(config.heartbeat_interval, MAX_POLL_SECONDS))
        sweep_study.requeue_stale_trials(study)
    finally:  # also when interrupted: the tables show the trials so far
      rows = sweep_report.write_reports(study, config, workdir, space)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so the module imports beside the other
  commands (which define flags of the same names)."""
  flags.DEFINE_string("workdir", None, "Sweep folder: sweep.json, sweep.db, trials/NNNN, "
                      "trials.md, trials.csv, objective.png. Run again to resume.")
  config_flags.DEFINE_config_file("config", None, "Sweep configuration file (a get_config() and "
                                  "a sweep(trial) function).", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = FLAGS.config, Path(FLAGS.workdir)
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # the objective reports each trial
  if not jax.config.jax_compilation_cache_dir:  # unless set, e.g. by $JAX_COMPILATION_CACHE_DIR
    # Trials differ only in hyperparameters: initialisation and evaluation compile to the same
    # programs in every trial, and a resumed trial to the same programs as before the kill.
    jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").resolve()))
  try:
    rows = run_sweep(config, workdir,
                     sweep_config.load_sweep_function(FLAGS["config"].config_filename))
  except KeyboardInterrupt:
    print(f"interrupted: run the same command again to resume the sweep in {workdir}",
          file=sys.stderr)
    sys.exit(130)
  print((workdir / "trials.md").read_text(), end="")
  complete = [row for row in rows if row["state"] == "COMPLETE"]
  if not complete:
    print(f"error: no trial completed; see {workdir / 'trials.md'}", file=sys.stderr)
    sys.exit(1)
  best = complete[0]
  print(f"best: trial {best['trial']}, {config.objective}={best[config.objective]:.4f}, "
        f"workdir {best['host']}:{best['path']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
