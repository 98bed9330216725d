"""The sweep command on real CIFAR-10 with tiny trials (tests/sweep_tiny.py on configs/smoke.py):
trial workdirs, tables and plot, failed trials, resuming after SIGKILL (local SQLite and shared
storage with heartbeats), refused workdirs and sweep-config checks."""

import csv
import hashlib
import importlib.util
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import ml_collections
import optuna
import pytest

import built
import sweep_tiny
from conftest import REPO_ROOT
from convnet_jax.errors import UserError
from convnet_jax.sweep import command as sweep
from convnet_jax.sweep import config as sweep_config_lib
from convnet_jax.sweep import study as sweep_study

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("sweep")

GRID_LR = (0.05, 0.2, 1e38)  # 1e38 diverges to NaN in the first epoch


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """The environment of the sweep processes: one JAX compilation cache for all of them, so that
  the programs of trials with the same hyperparameters compile once per session."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


def common(cifar10_dir):
  # Every trial trains 3 epochs of 2 steps: long enough to be killed after its first epoch.
  return {"base.data.dir": str(cifar10_dir), "base.num_epochs": 3}


def sweep_command(workdir, changes):
  """The command line of tests/sweep_tiny.py with `changes` ({"grid.momentum": (0.5,), ...})."""
  return [sys.executable, "-m", "convnet_jax.sweep", "--config", "tests/sweep_tiny.py",
          f"--workdir={workdir}",
          *(f"--config.{key}={value if isinstance(value, str) else repr(value)}"
            for key, value in changes.items())]


def sweep_config(changes):
  """tests/sweep_tiny.py with `changes`, as the command line would set them."""
  return built.with_values(sweep_tiny.get_config(), changes)


def run_sweep(env, workdir, changes, timeout=600):
  return subprocess.run(sweep_command(workdir, changes), cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_csv(workdir):
  with open(workdir / "trials.csv", newline="") as f:
    return list(csv.DictReader(f))


def last_metrics(trial_dir):
  return json.loads((trial_dir / "metrics.jsonl").read_text().splitlines()[-1])


def trials_in_db(workdir):
  """(number, state) of every trial, read from the SQLite file with sqlite3, not optuna."""
  with sqlite3.connect(workdir / "sweep.db") as db:
    return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def snapshot(folder):
  return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def grid_sweep(env, cifar10_dir, tmp_path_factory):
  """A finished 3-trial grid sweep over the learning rate (one point diverges) at momentum 0.9."""
  workdir = tmp_path_factory.mktemp("grid") / "sweep"
  changes = {**common(cifar10_dir), "grid.learning_rate": GRID_LR, "num_trials": 3}
  return workdir, changes, run_sweep(env, workdir, changes)


@pytest.mark.slow
def test_grid_sweep_trials_tables_and_plot(grid_sweep):
  workdir, _, result = grid_sweep
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_csv(workdir)
  assert list(rows[0]) == ["trial", "state", "learning_rate", "momentum", "test_acc",
                           "train_loss", "time_s", "workdir", "error"]
  # Every grid point once, each trial's config.json holding its values.
  points = set()
  for row in rows:
    config = json.loads((workdir / row["workdir"] / "config.json").read_text())
    assert (config["optim"]["learning_rate"], config["optim"]["momentum"]) == (
        float(row["learning_rate"]), float(row["momentum"]))
    assert config["num_epochs"] == 3 and config["data"]["max_train_examples"] == 128
    points.add((config["optim"]["learning_rate"], config["optim"]["momentum"]))
  assert points == set(itertools.product(GRID_LR, [0.9]))
  assert len({row["workdir"] for row in rows}) == 3
  # The completed trials first, by the test accuracy of their last epoch, best first.
  complete, failed = rows[:2], rows[2:]
  assert [row["state"] for row in complete] == ["COMPLETE"] * 2
  accuracies = []
  for row in complete:
    metrics = last_metrics(workdir / row["workdir"])
    assert metrics["epoch"] == 2
    assert float(row["test_acc"]) == metrics["test_acc"]
    assert float(row["train_loss"]) == metrics["train_loss"]
    accuracies.append(metrics["test_acc"])
  assert accuracies == sorted(accuracies, reverse=True)
  # The diverged trial: last, failed, with its error; the sweep went on.
  [row] = failed
  assert row["state"] == "FAIL" and float(row["learning_rate"]) == 1e38
  assert row["error"].startswith("TrainingDiverged: non-finite loss at step")
  assert row["test_acc"] == ""
  assert "trial " + row["trial"] + " failed: TrainingDiverged" in result.stderr
  # The markdown table: the same trials in the same order, printed at the end with the best.
  table = (workdir / "trials.md").read_text().splitlines()
  assert table[0] == ("| trial | state | learning_rate | momentum | test_acc | train_loss | "
                      "time_s | workdir | error |")
  assert [line.split(" | ")[0].removeprefix("| ") for line in table[2:]] == [
      row["trial"] for row in rows]
  assert result.stdout.startswith("\n".join(table) + "\n")
  assert result.stdout.splitlines()[-1].startswith(
      f"best: trial {rows[0]['trial']}, test_acc={accuracies[0]:.4f}, workdir ")
  assert result.stdout.rstrip().endswith(str((workdir / rows[0]["workdir"]).resolve()))
  # The plot: a PNG with a panel per swept parameter side by side.
  png = (workdir / "objective.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert width > 1.5 * height


@pytest.mark.slow
def test_rerunning_a_finished_sweep_runs_no_trial(grid_sweep):
  workdir, changes, _ = grid_sweep
  before = snapshot(workdir / "trials")
  trials = trials_in_db(workdir)
  rows = sweep.run_sweep(sweep_config(changes), workdir, sweep_tiny.sweep)
  assert trials_in_db(workdir) == trials and len(trials) == 3
  assert snapshot(workdir / "trials") == before
  assert [str(row["trial"]) for row in rows] == [row["trial"] for row in read_csv(workdir)]


@pytest.mark.slow
def test_a_workdir_of_another_sweep_is_refused_and_left_unchanged(grid_sweep, tmp_path):
  workdir, changes, _ = grid_sweep
  before = snapshot(workdir)
  config = sweep_config({**changes, "base.num_epochs": 5, "sampler": "random"})
  with pytest.raises(UserError) as error:
    sweep.run_sweep(config, workdir, sweep_tiny.sweep)
  assert "holds a sweep of another sweep config" in str(error.value)
  assert "base.num_epochs: 5.0 here, 3.0 there" in str(error.value)
  assert "sampler: 'random' here, 'grid' there" in str(error.value)
  assert snapshot(workdir) == before
  # Nor is a folder that holds something else than a sweep.
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="holds files but no sweep.json"):
    sweep.run_sweep(sweep_config(changes), tmp_path, sweep_tiny.sweep)
  assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_sigkill_during_a_trial_then_rerun_resumes_it(env, cifar10_dir, tmp_path):
  workdir = tmp_path / "sweep"
  # Momentum 0.5 and 0.9 at lr 0.05; trial 0 is killed after its first epoch.
  command = sweep_command(workdir, {**common(cifar10_dir), "grid.learning_rate": (0.05,),
                                    "grid.momentum": (0.5, 0.9)})
  process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  metrics = workdir / "trials" / "0000" / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert len(metrics.read_text().splitlines()) == 1, "trial 0 ended before the kill"
  killed_point = json.loads(
      (workdir / "trials" / "0000" / "config.json").read_text())["optim"]["momentum"]

  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trial 0 was left running by a stopped sweep" in result.stderr
  assert "resuming after epoch 0" in result.stderr  # from the killed trial's checkpoint
  rows = read_csv(workdir)
  assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE"]
  assert sorted(float(row["momentum"]) for row in rows) == [0.5, 0.9]
  # The re-run of trial 0 used its workdir; no workdir for the interrupted trial's number.
  [rerun] = [row for row in rows if float(row["momentum"]) == killed_point]
  assert rerun["workdir"] == "trials/0000" and rerun["trial"] != "0"
  assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2]
  assert float(rerun["test_acc"]) == last_metrics(workdir / "trials" / "0000")["test_acc"]
  for row in rows:
    config = json.loads((workdir / row["workdir"] / "config.json").read_text())
    assert config["optim"]["momentum"] == float(row["momentum"])
    assert config["optim"]["learning_rate"] == 0.05
  assert sorted(path.name for path in (workdir / "trials").iterdir()) == sorted(
      row["workdir"].removeprefix("trials/") for row in rows)
  # Exactly num_trials trials counted: the interrupted one is in the database, failed.
  states = dict(trials_in_db(workdir))
  assert states[0] == "FAIL" and sorted(states.values()) == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_shared_storage_requeues_only_dead_workers_trials(tmp_path):
  """With a database URL, a RUNNING trial whose heartbeat stopped for longer than grace_period is
  queued again with its values and workdir, while a live worker's trial is left alone. (The
  command line doing this after a SIGKILL, resuming the trial's checkpoint, is the local case
  above plus optuna's heartbeat.)"""
  config = sweep_tiny.get_config()
  config.storage = f"sqlite:///{tmp_path}/shared.db"
  # A grace of 3 s: the live trial's heartbeat below must still count when the third worker
  # opens the study, however long a loaded machine takes to get there.
  config.heartbeat_interval, config.grace_period = 1, 3
  identity = sweep_config_lib.sweep_identity(
      config, sweep_config_lib.validate_sweep_config(config, sweep_tiny.sweep))
  storage = optuna.storages.RDBStorage(config.storage)

  def heartbeat(trial):
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(config.study_name), trial.number))

  def start_trial(study, workdir):
    """A worker starting a trial: values, workdir, a heartbeat."""
    trial = study.ask()
    sweep_tiny.sweep(trial)
    trial.set_user_attr("workdir", workdir)
    heartbeat(trial)
    return trial

  dead = start_trial(sweep_study.open_study(config, tmp_path / "a", identity), "trials/0000")
  live = start_trial(sweep_study.open_study(config, tmp_path / "b", identity), "trials/0001")
  time.sleep(4.1)  # SQLite's clock counts whole seconds: 4 s > grace_period
  heartbeat(live)  # what the live worker's heartbeat thread does every heartbeat_interval
  study = sweep_study.open_study(config, tmp_path / "c", identity)  # a worker starting now
  states = {t.number: t.state for t in study.trials}
  assert states == {dead.number: optuna.trial.TrialState.FAIL,
                    live.number: optuna.trial.TrialState.RUNNING,
                    2: optuna.trial.TrialState.WAITING}
  [queued] = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
  assert queued.params == dead.params and queued.user_attrs["workdir"] == "trials/0000"
  # The queued one; the live one counts.
  assert sweep_study.trials_left(study, config.num_trials) == 1


@pytest.fixture
def tiny():
  config = sweep_tiny.get_config()
  config.num_trials = 1
  return config


def set_grid(**grid):
  return lambda config: setattr(config, "grid", ml_collections.ConfigDict(grid))


BAD_SWEEPS = [
    (lambda c: setattr(c, "sampler", "bayes"), None,
     "sweep.sampler='bayes': expected one of ('grid', 'random', 'tpe')"),
    (lambda c: setattr(c, "num_trials", 0), None, "sweep.num_trials=0: expected a positive"),
    (lambda c: setattr(c, "num_trials", 3), None,
     "sweep.num_trials=3: expected at most the number of points of sweep.grid, 2"),
    (lambda c: setattr(c, "objective", "accuracy"), None,
     "sweep.objective='accuracy': expected one of the final metrics"),
    (set_grid(), None, "sweep.grid={}: expected a search space"),
    (set_grid(learning_rate=(0.1,), momentum=0.9), None,
     "sweep.grid.momentum=0.9: expected a non-empty list or tuple of values"),
    (set_grid(learning_rate=(0.1,)), None,
     "expected values for every parameter sweep(trial) suggests"),
    (set_grid(learning_rate=(0.1,), momentum=(0.9,), lr=(0.1,)), None,
     "sweep.grid.lr=[0.1]: expected a parameter that sweep(trial) suggests"),
    (set_grid(learning_rate=(0.1,), momentum=(0.99,)), None,
     "sweep.grid.momentum=[0.99]: expected values within sweep(trial)'s FloatDistribution("),
    (lambda c: setattr(c.base, "batch_size", 0), None,
     "sweep.base.batch_size=0: expected a positive integer"),
    (lambda c: setattr(c, "sampler", "random"), lambda trial: {},
     "sweep(trial) suggests no parameter"),
    (lambda c: setattr(c, "sampler", "random"),
     lambda trial: {"lr": trial.suggest_float("learning_rate", 0.01, 1)},
     "sweep(trial) returned 'lr', which is not a key of the training config"),
    (lambda c: setattr(c, "storage", "not a url"), None, "sweep.storage='not a url': expected"),
]


@pytest.mark.parametrize("change, sweep_fn, message", BAD_SWEEPS)
def test_bad_sweep_configs_are_refused_before_training(change, sweep_fn, message, tiny):
  change(tiny)
  with pytest.raises(UserError) as error:
    sweep_config_lib.validate_sweep_config(tiny, sweep_fn or sweep_tiny.sweep)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_sweep_config_gives_one_error_line_and_exit_2(env, cifar10_dir, tmp_path):
  result = run_sweep(env, tmp_path / "sweep", {**common(cifar10_dir), "grid.momentum": (1.0,)})
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.splitlines() == [
      "error: sweep.grid.momentum=[1.0]: expected values within sweep(trial)'s "
      "FloatDistribution(high=0.95, log=False, low=0.0, step=None)"]
  assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_search_does_not_repeat_values_when_resumed(sampler, tmp_path, tiny):
  """A restarted process must not replay the first trials' values, and a trial's values depend
  only on the seed and the trials before it."""
  tiny.sampler = sampler
  storage = f"sqlite:///{tmp_path}/study.db"

  def values(study, count):
    for _ in range(count):
      trial = study.ask()
      sweep_tiny.sweep(trial)
      study.tell(trial, 0.5)
    return [(t.params["learning_rate"], t.params["momentum"]) for t in study.trials]

  first = optuna.create_study(storage=storage, study_name="a",
                              sampler=sweep_study.create_sampler(tiny))
  values(first, 2)
  # A new process (a fresh sampler) on the same study.
  resumed = optuna.load_study(storage=storage, study_name="a",
                              sampler=sweep_study.create_sampler(tiny))
  resumed_values = values(resumed, 1)
  assert len(set(resumed_values)) == 3
  uninterrupted = optuna.create_study(sampler=sweep_study.create_sampler(tiny))
  assert values(uninterrupted, 3) == resumed_values
  for learning_rate, momentum in resumed_values:
    assert 1e-3 <= learning_rate <= 1e38 and 0 <= momentum <= 0.95


def _fresh(number_state, **attrs):
  return optuna.trial.create_trial(state=number_state, value=0.5 if number_state == COMPLETE
                                   else None, user_attrs=attrs)


COMPLETE, FAIL, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.WAITING)


def test_places_in_the_budget_count_fresh_trials_only():
  study = optuna.create_study()
  study.add_trial(_fresh(COMPLETE))                       # 0: place 0
  study.add_trial(_fresh(FAIL))                           # 1: place 1, its worker died
  study.add_trial(optuna.trial.create_trial(              # 2: the re-run of 1, queued
      state=WAITING, system_attrs={"retry_history": [1]}))
  study.add_trial(optuna.trial.create_trial(              # 3: surplus: it takes no place
      state=optuna.trial.TrialState.PRUNED, user_attrs={sweep_study.SURPLUS_ATTR: True}))
  study.add_trial(_fresh(COMPLETE))                       # 4: so this is place 2
  trials = study.get_trials(deepcopy=False)
  assert [sweep_study.place_in_budget(trials, t) for t in trials] == [0, 1, 1, 2, 2]
  # Left: the queued re-run, plus fresh trials up to num_trials places (3 taken).
  assert sweep_study.trials_left(study, 4) == 1 + 1
  assert sweep_study.trials_left(study, 3) == 1 + 0
  assert sweep_study.trials_left(study, 2) == 1 + 0


def test_grid_points_follow_places_so_no_point_is_run_twice(tiny):
  """Two trials killed and re-run before the last fresh ones: optuna's GridSampler would give
  both fresh trials (numbers 4 and 5, past the grid's size) the one unvisited point; by place,
  the first gets it and the second is surplus."""
  tiny.grid = ml_collections.ConfigDict({"learning_rate": (0.01, 0.1, 0.3), "momentum": (0.9,)})
  tiny.num_trials = 3
  study = optuna.create_study(sampler=sweep_study.create_sampler(tiny))
  killed = []
  for _ in range(2):
    trial = study.ask()
    sweep_tiny.sweep(trial)
    killed.append(trial.number)
  for number in killed:
    study.tell(number, state=FAIL)
    sweep_study.retry(study, study.trials[number])
  reruns = [study.ask() for _ in range(2)]  # the queued copies, taken by two workers
  fresh = [study.ask() for _ in range(2)]   # then two fresh trials, at the same moment
  for trial in reruns + fresh:
    sweep_tiny.sweep(trial)
  trials = study.get_trials(deepcopy=False)
  assert [t.number for t in fresh] == [4, 5]
  assert [sweep_study.place_in_budget(trials, trials[n]) for n in (0, 1, 2, 3, 4, 5)] == [
      0, 1, 0, 1, 2, 3]
  in_budget = [trials[n].params["learning_rate"] for n in (2, 3, 4)]
  assert sorted(in_budget) == [0.01, 0.1, 0.3]  # every grid point once


def test_a_trial_beyond_num_trials_ends_pruned_without_training(tiny, tmp_path):
  tiny.num_trials = 1
  study = optuna.create_study()
  study.add_trial(_fresh(COMPLETE))
  trial = study.ask()  # a second worker's, started as the first took the last place
  objective = sweep.make_objective(tiny, tmp_path, sweep_tiny.sweep)
  with pytest.raises(optuna.TrialPruned, match="trial 1 is beyond num_trials=1"):
    objective(trial)
  assert trial.user_attrs == {sweep_study.SURPLUS_ATTR: True}
  assert list(tmp_path.iterdir()) == []


def test_a_plain_postgresql_url_uses_the_installed_driver():
  assert importlib.util.find_spec("psycopg2") is None  # this environment has psycopg 3 only
  assert sweep_config_lib.database_url("postgresql://me:secret@db.example:5432/sweeps") == (
      "postgresql+psycopg://me:secret@db.example:5432/sweeps")
  for url in ("postgresql+psycopg2://me@db/sweeps", "sqlite:////tmp/sweep.db"):
    assert sweep_config_lib.database_url(url) == url


def test_a_database_without_its_driver_is_refused_naming_the_extra(tiny):
  tiny.storage = "mysql+pymysql://me:secret@db.example/sweeps"
  with pytest.raises(UserError) as error:
    sweep_config_lib.validate_sweep_config(tiny, sweep_tiny.sweep)
  message = str(error.value)
  assert message.startswith("sweep.storage='mysql+pymysql://me:***@db.example/sweeps': expected "
                            "a database whose Python driver is installed (")
  assert "pip install 'convnet_jax[postgres]'" in message and "secret" not in message


def test_a_database_that_cannot_be_reached_is_one_error_naming_the_key(tiny, tmp_path):
  tiny.storage = f"postgresql://sweeper:secret@127.0.0.1:{_closed_port()}/sweeps"
  started = time.monotonic()
  with pytest.raises(UserError) as error:
    sweep.run_sweep(tiny, tmp_path / "sweep", sweep_tiny.sweep)
  message = str(error.value)
  assert message.startswith("sweep.storage='postgresql://sweeper:***@127.0.0.1:")
  assert "could not open the study (OperationalError: " in message and "secret" not in message
  assert time.monotonic() - started < 30
  assert not (tmp_path / "sweep").exists()  # nothing written: the same command works once fixed


def _closed_port():
  import socket

  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]  # closed again when the probe is
