"""Sweeps across machines, on a real PostgreSQL: a throwaway cluster of the test's own, several
`python -m convnet_jax.sweep` workers on one study, one of them killed with SIGKILL mid-trial, a
worker started after the study is complete, and two started at the same instant.

The database is read back with psycopg and SQL, not through optuna. Skipped only where no
PostgreSQL server binaries exist (Debian/Ubuntu: `apt-get install postgresql`; `.ci/run`
installs them).
"""

import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

# One worker runs this file (one throwaway cluster; pytest-xdist).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgres")]

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every trial is 6 epochs of 2 steps (a checkpoint after each), so that a worker can be caught
# and killed between its trial's first checkpoint and its end; workers beat every second and
# are taken for dead after 8 s without a beat: a live worker on a machine loaded by the rest of
# the suite must never miss that many beats in a row (3 s was close under a CPU hog).
EPOCHS = 6
BASE = {"base.num_epochs": EPOCHS, "heartbeat_interval": 1, "grace_period": 8}
GRID = {"grid.learning_rate": (0.05, 0.2), "grid.momentum": (0.5, 0.9), "num_trials": 4}
POINTS = sorted((lr, m) for lr in (0.05, 0.2) for m in (0.5, 0.9))


def postgres_bindir() -> Path | None:
  """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
  found = shutil.which("initdb")
  if found:
    return Path(found).resolve().parent
  candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda path: int(Path(path).parts[-3]))
  return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class Cluster:
  """A PostgreSQL cluster in a temporary folder on a free local port, trust authentication for
  the user "sweeper"; `stop()` and `start()` take it down and bring it back on the same port."""

  def __init__(self, bindir: Path):
    self.bindir = bindir
    self.folder = Path(tempfile.mkdtemp(prefix="convnet_jax_postgres_"))
    self.run_as = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as an unprivileged user
      try:
        account = pwd.getpwnam("postgres")  # made by Debian's postgresql package
      except KeyError:
        account = pwd.getpwnam("nobody")
      os.chown(self.folder, account.pw_uid, account.pw_gid)
      self.run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    self.data, self.log, self.port = self.folder / "data", self.folder / "server.log", free_port()
    subprocess.run([bindir / "initdb", "-D", self.data, "-U", "sweeper", "--auth=trust", "-E",
                    "UTF8", "--no-sync"], check=True, capture_output=True, **self.run_as)
    self.url = f"postgresql://sweeper@127.0.0.1:{self.port}"

  def start(self) -> None:
    # The server's output goes to its log, not to pipes this process would wait on.
    started = subprocess.run(
        [self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o",
         f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off",
         "start"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **self.run_as)
    assert started.returncode == 0, (self.log.read_text() if self.log.exists()
                                     else "no server log")

  def stop(self, mode: str = "immediate") -> None:
    subprocess.run([self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **self.run_as)


@pytest.fixture(scope="module")
def postgres_cluster():
  """The module's throwaway `Cluster`, started; stopped and removed at the end."""
  bindir = postgres_bindir()
  if bindir is None:
    pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                "/usr/lib/postgresql/*/bin: apt-get install postgresql")
  cluster = Cluster(bindir)
  try:
    cluster.start()
    yield cluster
  finally:
    cluster.stop()
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture
def postgres_server(postgres_cluster):
  """The cluster's base URL, with the server running (a test may have stopped it)."""
  if subprocess.run([postgres_cluster.bindir / "pg_ctl", "-D", postgres_cluster.data, "status"],
                    capture_output=True, **postgres_cluster.run_as).returncode != 0:
    postgres_cluster.start()
  return postgres_cluster.url


@pytest.fixture
def database(postgres_server, request):
  """A fresh database on the server for one test; its URL."""
  name = "sweep_" + request.node.name.replace("[", "_").replace("]", "").lower()[:50]
  with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
    connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
    connection.execute(f'CREATE DATABASE "{name}"')
  return f"{postgres_server}/{name}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The workers' environment: one JAX compilation cache for all, so trials compile once."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


def worker_command(workdir, url, cifar10_dir, changes=None):
  changes = {**BASE, **GRID, "base.data.dir": str(cifar10_dir), "storage": url, **(changes or {})}
  return [sys.executable, "-m", "convnet_jax.sweep", "--config", "tests/sweep_tiny.py",
          f"--workdir={workdir}",
          *(f"--config.{key}={value if isinstance(value, str) else repr(value)}"
            for key, value in changes.items())]


def start_worker(command, env, log: Path):
  with open(log, "w") as stderr:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def trials_in_database(url):
  """Every trial of the study as a dict: number, state, params, user attrs and the numbers of
  the trials it re-runs, read with SQL."""
  with psycopg.connect(url) as connection:
    trials = {number: {"number": number, "state": state, "params": {}, "attrs": {},
                       "retry_history": []}
              for number, state in connection.execute("SELECT number, state FROM trials")}
    by_id = dict(connection.execute("SELECT trial_id, number FROM trials"))
    for trial_id, name, value in connection.execute(
        "SELECT trial_id, param_name, param_value FROM trial_params"):
      trials[by_id[trial_id]]["params"][name] = value
    for trial_id, key, value in connection.execute(
        "SELECT trial_id, key, value_json FROM trial_user_attributes"):
      trials[by_id[trial_id]]["attrs"][key] = json.loads(value)
    for trial_id, value in connection.execute(
        "SELECT trial_id, value_json FROM trial_system_attributes WHERE key = 'retry_history'"):
      trials[by_id[trial_id]]["retry_history"] = json.loads(value)
  return [trials[number] for number in sorted(trials)]


def database_rows(url):
  """Every row of optuna's trial tables, to tell whether a worker changed anything."""
  with psycopg.connect(url) as connection:
    return {table: sorted(map(repr, connection.execute(f"SELECT * FROM {table}")))
            for table in ("trials", "trial_params", "trial_values", "trial_user_attributes",
                          "trial_system_attributes", "trial_heartbeats")}


def point(trial):
  return (trial["params"]["learning_rate"], trial["params"]["momentum"])


def assert_each_point_complete_once(trials):
  complete = [trial for trial in trials if trial["state"] == "COMPLETE"]
  assert sorted(map(point, complete)) == POINTS
  assert not [trial for trial in trials if trial["state"] in ("RUNNING", "WAITING")]
  # Nothing trained that did not count: the only other trials are killed or surplus ones.
  for trial in trials:
    if trial["state"] != "COMPLETE":
      assert trial["state"] == "FAIL" or trial["attrs"].get("surplus"), trial


def wait_for(condition, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    found = condition()
    if found:
      return found
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_mid_trial_is_taken_over_and_a_late_worker_changes_nothing(
    database, env, cifar10_dir, tmp_path):
  # Both workers share the sweep folder, as machines sharing a file system would, so the
  # killed trial's re-run finds its checkpoint.
  workdir = tmp_path / "sweep"
  command = worker_command(workdir, database, cifar10_dir)
  start = time.monotonic()
  first = start_worker(command, env, tmp_path / "first.log")
  second = start_worker(command, env, tmp_path / "second.log")
  first_worker = f"{socket.gethostname()}:{first.pid}"

  def first_workers_last_trial_after_an_epoch():
    """The first worker's trial once it has a checkpoint and every place of the study is
    taken: the killed trial is then the last one, so only a worker that waits for the others
    and re-runs dead ones can finish the study."""
    for worker, log in ((first, "first.log"), (second, "second.log")):
      assert worker.poll() is None, (tmp_path / log).read_text()[-3000:]
    try:
      trials = trials_in_database(database)
    except psycopg.errors.UndefinedTable:  # optuna has not made its tables yet
      return None
    if len(trials) < GRID["num_trials"]:
      return None
    for trial in trials:
      if trial["state"] == "RUNNING" and trial["attrs"].get("worker") == first_worker:
        metrics = workdir / trial["attrs"]["workdir"] / "metrics.jsonl"
        if metrics.exists() and 1 <= len(metrics.read_text().splitlines()) < EPOCHS - 1:
          return trial
    return None

  killed = wait_for(first_workers_last_trial_after_an_epoch, 300,
                    "the first worker's last trial with a checkpoint, not yet done")
  first.send_signal(signal.SIGKILL)
  first.wait()
  killed_at = time.monotonic()
  trial_dir = workdir / killed["attrs"]["workdir"]
  epochs_before_kill = len((trial_dir / "metrics.jsonl").read_text().splitlines())
  table, _ = second.communicate(timeout=600)
  finished = time.monotonic()
  second_log = (tmp_path / "second.log").read_text()
  assert second.returncode == 0, second_log[-3000:]

  trials = trials_in_database(database)
  assert_each_point_complete_once(trials)
  assert next(t for t in trials if t["number"] == killed["number"])["state"] == "FAIL"
  [rerun] = [t for t in trials if killed["number"] in t["retry_history"]]
  assert rerun["state"] == "COMPLETE" and point(rerun) == point(killed)
  assert rerun["attrs"]["workdir"] == killed["attrs"]["workdir"]
  assert rerun["attrs"]["worker"] == f"{socket.gethostname()}:{second.pid}"
  # The re-run resumed the killed trial's newest checkpoint (written just before each epoch's
  # metrics line, so it may hold one epoch more than the line count at the kill), and its
  # epochs are in one metrics file, each once.
  resumed = re.search(rf"resuming after epoch (\d+) from {re.escape(str(trial_dir))}/checkpoints",
                      second_log)
  assert resumed and int(resumed[1]) + 1 in (epochs_before_kill, epochs_before_kill + 1)
  assert [json.loads(line)["epoch"]
          for line in (trial_dir / "metrics.jsonl").read_text().splitlines()] == list(
              range(EPOCHS))
  # Reports: the four points, best first, in the table printed and in the files.
  for name in ("trials.md", "trials.csv", "objective.png"):
    assert (workdir / name).stat().st_size > 0
  assert table.count("| COMPLETE |") == 4 and "RUNNING" not in table
  print(f"\nworkers 2, trials in the database {len(trials)}, kills 1 (after epoch "
        f"{epochs_before_kill - 1}), re-runs 1, wall {finished - start:.1f} s "
        f"({finished - killed_at:.1f} s after the kill)")

  # A worker started after the study is complete: exit 0, the database unchanged.
  before = database_rows(database)
  late = subprocess.run(worker_command(tmp_path / "late", database, cifar10_dir),
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert late.returncode == 0, late.stderr[-3000:]
  assert "trial " not in late.stderr  # it started none
  assert late.stdout.count("| COMPLETE |") == 4
  assert database_rows(database) == before


@pytest.mark.parametrize("sampler, num_trials", [("grid", 4), ("random", 3)])
def test_two_workers_started_at_the_same_instant_run_each_trial_once(
    sampler, num_trials, database, env, cifar10_dir, tmp_path):
  changes = {"sampler": sampler, "num_trials": num_trials, "base.num_epochs": 1}
  commands = [worker_command(tmp_path / f"worker{index}", database, cifar10_dir, changes)
              for index in range(2)]
  workers = [start_worker(command, env, tmp_path / f"worker{index}.log")
             for index, command in enumerate(commands)]
  tables = []
  for index, worker in enumerate(workers):
    tables.append(worker.communicate(timeout=600)[0])
    assert worker.returncode == 0, (tmp_path / f"worker{index}.log").read_text()[-3000:]
  trials = trials_in_database(database)
  # Trained: finished, or (random learning rates reach 1e38) diverged.
  trained = [trial for trial in trials if trial["state"] == "COMPLETE" or (
      trial["state"] == "FAIL" and trial["attrs"]["error"].startswith("TrainingDiverged"))]
  assert len(trained) == num_trials
  assert len(set(map(point, trained))) == num_trials  # no point run twice
  if sampler == "grid":
    assert_each_point_complete_once(trials)
  others = [trial for trial in trials if trial not in trained]
  # Any trial beyond num_trials (both workers taking the last place) ended untrained.
  assert all(trial["state"] == "PRUNED" and trial["attrs"]["surplus"] for trial in others)
  assert all("workdir" not in trial["attrs"] for trial in others)
  # The study was shared, not run twice: both workers report the same finished study, and
  # every trained trial is one of theirs. (How the trials split between them depends on which
  # one started faster, so a loaded machine may give one worker all of them.)
  complete = sum(trial["state"] == "COMPLETE" for trial in trials)
  assert all(table.count("| COMPLETE |") == complete for table in tables), tables
  workers_seen = {trial["attrs"]["worker"] for trial in trained}
  assert workers_seen <= {f"{socket.gethostname()}:{worker.pid}" for worker in workers}


# ---------------------------------------------------------------------------------------------
# The database going away while a worker runs a trial.

def _wait_for_a_trial_past_its_first_checkpoint(database, workdir, worker, log):
  def trial():
    assert worker.poll() is None, log.read_text()[-3000:]
    try:
      trials = trials_in_database(database)
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
      return None
    for trial in trials:
      if trial["state"] == "RUNNING" and "workdir" in trial["attrs"]:
        metrics = workdir / trial["attrs"]["workdir"] / "metrics.jsonl"
        if metrics.exists() and 1 <= len(metrics.read_text().splitlines()) < EPOCHS - 1:
          return trial
    return None

  return wait_for(trial, 300, "a running trial with a checkpoint, not yet done")


def test_a_database_restarted_mid_trial_is_waited_for_and_every_trial_ends_once(
    postgres_cluster, database, env, cifar10_dir, tmp_path):
  workdir, log = tmp_path / "sweep", tmp_path / "worker.log"
  worker = start_worker(worker_command(workdir, database, cifar10_dir,
                                       {"storage_retry_seconds": 120}), env, log)
  _wait_for_a_trial_past_its_first_checkpoint(database, workdir, worker, log)
  postgres_cluster.stop()
  # The trial's heartbeat (every second) meets the outage first: one line says so.
  wait_for(lambda: "the database cannot be reached" in log.read_text(), 60,
           "the worker's line about the outage")
  time.sleep(3)
  postgres_cluster.start()
  table, _ = worker.communicate(timeout=600)
  stderr = log.read_text()
  assert worker.returncode == 0, stderr[-3000:]
  outage_lines = [line for line in stderr.splitlines() if "sweep.storage=" in line]
  assert len(outage_lines) == 2, outage_lines  # one when it went, one when it was back
  assert outage_lines[0].startswith(f"sweep.storage='{database}': the database cannot be "
                                    f"reached (") and outage_lines[0].endswith(
                                        "; retrying for up to 120 s")
  assert re.fullmatch(rf"sweep\.storage='{re.escape(database)}': reachable again after \d+ s; "
                      rf"the sweep goes on", outage_lines[1]), outage_lines[1]
  assert "Traceback" not in stderr
  trials = trials_in_database(database)
  assert_each_point_complete_once(trials)
  assert len(trials) == len(POINTS)  # none failed, none re-run: each trial ran once
  assert table.count("| COMPLETE |") == 4


def test_a_database_gone_past_the_retry_limit_stops_the_worker_and_a_restart_finishes(
    postgres_cluster, database, env, cifar10_dir, tmp_path):
  workdir, log = tmp_path / "sweep", tmp_path / "worker.log"
  # Two trials of 120 epochs (~25 s on a 2-core Zen 5, more elsewhere), so the worker gives up
  # well inside the trial in flight: at 40 epochs a fast host under the parallel test load
  # once finished it first.
  command = worker_command(workdir, database, cifar10_dir, {
      "storage_retry_seconds": 3, "base.num_epochs": 120, "num_trials": 2})
  worker = start_worker(command, env, log)
  in_flight = _wait_for_a_trial_past_its_first_checkpoint(database, workdir, worker, log)
  postgres_cluster.stop()
  stopped_at = time.monotonic()
  stdout, _ = worker.communicate(timeout=120)
  stderr = log.read_text()
  assert worker.returncode == 75, stderr[-3000:]
  assert time.monotonic() - stopped_at < 60
  assert "Traceback" not in stderr, stderr[-3000:]
  assert stderr.splitlines()[-1] == (
      f"error: sweep.storage='{database}': the database could not be reached for 3 s "
      f"(sweep.storage_retry_seconds); this worker stops. Its trial in flight stays RUNNING in "
      f"the study and is resumed from its checkpoint when the sweep is started again once the "
      f"database is back")
  trial_dir = workdir / in_flight["attrs"]["workdir"]
  assert (trial_dir / "checkpoints").is_dir() and not (trial_dir / "preds").exists()

  postgres_cluster.start()
  time.sleep(BASE["grace_period"] + 1)  # the worker's heartbeat is stale by now
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"from {trial_dir}/checkpoints" in result.stderr  # "resuming after epoch E from"
  trials = trials_in_database(database)
  complete = [trial for trial in trials if trial["state"] == "COMPLETE"]
  assert len(complete) == 2 and len(set(map(point, complete))) == 2  # two points, each once
  assert not [trial for trial in trials if trial["state"] in ("RUNNING", "WAITING")]
  # The trial in flight failed once (taken as dead) and its copy completed in its workdir.
  assert next(t for t in trials if t["number"] == in_flight["number"])["state"] == "FAIL"
  [rerun] = [t for t in trials if in_flight["number"] in t["retry_history"]]
  assert rerun["state"] == "COMPLETE" and rerun["attrs"]["workdir"] == in_flight["attrs"][
      "workdir"]
