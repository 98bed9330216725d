"""Long runs: epochs in several calls, mid-epoch checkpoints, SIGTERM and Ctrl-C, one run per
workdir, a quiet terminal and clear errors for bad config files."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from conftest import DATA
from conftest import REPO_ROOT
from convnet_jax import steps
from convnet_jax.budget import StepBudget
from convnet_jax.runs import cli
from convnet_jax.runs import epoch_calls
from convnet_jax.runs import stopping
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import UserError
from test_operable import read_run
from test_train import _linear_state, _numpy_losses, _tiny_data
import built

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("long_runs")

# 4,000 training images in batches of 64: 62 full steps and a short one of 32 per epoch, so a
# signal sent at step 5 lands well inside the epoch.
RUN_ARGS = ("--config", "configs/smoke.py", "--config.data.max_train_examples=4000",
            "--config.num_epochs=2")
STEPS_PER_EPOCH = 63


# ---------------------------------------------------------------------------------------------
# The program: any stretch of an epoch.

def _device_data(images, labels):
  """The training set `images`, `labels`, normalised as they are (mean 0, std 1)."""
  return steps.DeviceData(images, labels, images[:0], labels[:0], jnp.zeros(3), jnp.ones(3))


def test_a_call_trains_exactly_the_batches_of_its_steps():
  # 10 examples in batches of 4: full steps 0 and 1, and step 2 on the short batch of 2.
  images, labels = _tiny_data(10)
  state = _linear_state(12)  # learning rate 0: each step's loss depends only on its batch
  run = jax.jit(functools.partial(steps.train_steps, options=steps.EpochOptions(batch_size=4)))
  data = _device_data(images, labels)
  key, epoch = jax.random.key(3), 2
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), 10))
  losses, _ = _numpy_losses(state.params["w"], images, labels)
  expected = [losses[order[0:4]].sum(), losses[order[4:8]].sum(), losses[order[8:10]].sum()]
  for first, end in ((0, 3), (1, 2), (1, 3), (2, 3), (0, 2)):
    new_state, per_step = run(state, data, key, epoch, first, end)
    assert int(new_state.step) == end - first
    got = np.asarray(per_step["loss_sum"])
    np.testing.assert_allclose(got[first:end], expected[first:end], rtol=1e-5)
    assert not np.any(got[:first]) and not np.any(got[end:])  # zero outside the call


def test_an_epoch_cut_into_calls_is_bit_identical_to_one_call():
  images, labels = _tiny_data(10)
  state = _linear_state(12, learning_rate=0.5)
  run = jax.jit(functools.partial(steps.train_steps, options=steps.EpochOptions(batch_size=4)))
  args = (_device_data(images, labels), jax.random.key(1), 0)
  whole, whole_metrics = run(state, *args, 0, 3)
  part, first_metrics = run(state, *args, 0, 1)
  part, rest_metrics = run(part, *args, 1, 3)
  np.testing.assert_array_equal(part.params["w"], whole.params["w"])
  np.testing.assert_array_equal(
      np.asarray(first_metrics["loss_sum"]) + np.asarray(rest_metrics["loss_sum"]),
      whole_metrics["loss_sum"])
  assert not np.allclose(whole.params["w"], state.params["w"])  # it did train


# ---------------------------------------------------------------------------------------------
# How calls are sized, and an epoch in progress.

def _operations(**values):
  operations = ml_collections.ConfigDict(dict(default_config.get_config().operations))
  operations.update(values)
  return operations


def test_fixed_calls_stop_at_the_epoch_end():
  planner = epoch_calls.CallPlanner(_operations(steps_per_call=4), StepBudget(10, 1))
  ends, first = [], 0
  while first < 10:
    first = planner.call_end(epoch=0, first_step=first, epoch_steps=10)
    ends.append(first)
  assert ends == [4, 8, 10]


def test_automatic_calls_fit_the_target_time_at_the_measured_step_time():
  planner = epoch_calls.CallPlanner(_operations(seconds_per_call=10.0),
                                    StepBudget(1000, 1))
  assert planner.call_end(0, 0, 1000) == epoch_calls.FIRST_CALL_STEPS  # nothing measured yet
  planner.measured(num_steps=3, seconds=1.5)  # 0.5 s a step: 20 steps in 10 s
  assert planner.call_end(0, 3, 1000) == 23
  planner.measured(num_steps=20, seconds=0.2)  # a short epoch: the rest of it in one call
  assert planner.call_end(0, 23, 1000) == 1000
  planner.measured(num_steps=1, seconds=60.0)  # slower than the target: one step a call
  assert planner.call_end(1, 0, 1000) == 1


def test_calls_end_at_every_checkpoint_step_across_epochs():
  planner = epoch_calls.CallPlanner(_operations(steps_per_call=100, checkpoint_every_steps=7),
                                    StepBudget(10, 1))
  # Epoch 1 starts at global step 10: checkpoints at 14 and 21 are steps 4 of epoch 1 and 1 of
  # epoch 2.
  assert planner.call_end(epoch=1, first_step=0, epoch_steps=10) == 4
  assert planner.call_end(epoch=1, first_step=4, epoch_steps=10) == 10
  assert planner.call_end(epoch=2, first_step=0, epoch_steps=10) == 1
  assert [s for s in range(1, 30) if planner.checkpoint_due(s)] == [7, 14, 21, 28]


def test_an_epoch_in_progress_sums_its_steps_and_survives_json():
  progress = epoch_calls.EpochInProgress.start(epoch=3, learning_rate=np.float32(0.05),
                                               num_replicas=1)
  per_step = {"loss_sum": np.array([6.4, 3.2, 0.0, 0.0], np.float32),
              "correct": np.array([40.0, 50.0, 0.0, 0.0], np.float32)}
  progress.add(per_step, 0, 2, seconds=1.0)
  restored = epoch_calls.EpochInProgress.from_json(json.loads(json.dumps(progress.to_json())))
  per_step = {"loss_sum": np.array([0.0, 0.0, 1.6, 0.8], np.float32),
              "correct": np.array([0.0, 0.0, 60.0, 10.0], np.float32)}
  restored.add(per_step, 2, 4, seconds=2.0)
  # 4 steps of a 4-step epoch of 200 examples in batches of 64: the last batch holds 8.
  totals = restored.totals(num_examples=200, batch_size=64)
  assert restored.steps_done == 4 and restored.seconds == 3.0 and restored.epoch == 3
  assert totals["loss_sum"] == pytest.approx(
      float(np.float32(6.4)) + float(np.float32(3.2)) + float(np.float32(1.6)) + 0.8, rel=1e-7)
  assert totals["correct"] == 160.0
  np.testing.assert_allclose(totals["step_losses"], [6.4 / 64, 3.2 / 64, 1.6 / 64, 0.8 / 8],
                             rtol=1e-6)
  assert float(restored.learning_rate) == pytest.approx(0.05)


def test_positions_in_words():
  config = default_config.get_config()  # 5 epochs
  assert built.budget(config, 79).position(epoch=0, steps_done=0) == "before the first step"
  assert built.budget(config, 79).position(epoch=2, steps_done=0) == "after epoch 1"
  assert built.budget(config, 79).position(epoch=2, steps_done=30) == "at step 30 of epoch 2"
  assert built.budget(config, 79).position(epoch=2, steps_done=79) == "after epoch 2"


# ---------------------------------------------------------------------------------------------
# Signals and the folder lock, in this process.

def test_the_first_signal_is_recorded_and_the_second_gets_the_default_action():
  before = signal.getsignal(signal.SIGTERM)
  with stopping.StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler at the next bytecode
    assert signals.received == signal.SIGTERM
    assert signals.agree_on_stop_and_call_end(17) == (signal.SIGTERM, 17)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
  assert signal.getsignal(signal.SIGTERM) == before
  assert stopping.exit_status(signal.SIGTERM) == 143
  assert stopping.exit_status(signal.SIGINT) == 130


def test_a_held_folder_is_refused_naming_its_holder(tmp_path):
  folder = tmp_path / "run"
  with workdir_lib.FolderLock(folder, "run.lock") as lock:
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(UserError) as error:
      with workdir_lib.FolderLock(folder, "run.lock"):
        pass
    assert str(error.value).startswith(
        f"--workdir {folder}: in use by process {os.getpid()} on {holder['host']} since ")
  assert not folder.exists()  # created for the lock, and nothing else was written


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  (tmp_path / "run.lock").write_text(json.dumps({"host": "h", "pid": int(dead),
                                                 "since": "then"}))
  with workdir_lib.FolderLock(tmp_path, "run.lock") as lock:
    assert lock.taken_over == f"process {dead} on h since then"
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert not (tmp_path / "run.lock").exists() and tmp_path.is_dir()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="exists and is not a folder"):
    with workdir_lib.FolderLock(tmp_path / "file", "run.lock"):
      pass


# ---------------------------------------------------------------------------------------------
# Config files.

@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("def get_config(:\n", "not valid Python: invalid syntax (line 1)"),
    ("x = 1\n", "has no get_config() function"),
    ("import no_such_module_anywhere\n", "fails when loaded: ModuleNotFoundError"),
    ("def get_config():\n  return 1 / 0\n", "get_config() failed: ZeroDivisionError"),
])
def test_bad_config_files_are_named_with_their_problem(tmp_path, content, message):
  path = tmp_path / "config.py"
  if content is not None:
    path.write_text(content)
  with pytest.raises(UserError) as error:
    cli.load_config_file(str(path))
  assert str(error.value).startswith(f"--config {path}: {message}")


@pytest.mark.parametrize("module", [
    "convnet_jax.main",
    pytest.param("convnet_jax.benchmark", marks=pytest.mark.slow),
    pytest.param("convnet_jax.sweep", marks=pytest.mark.slow),
])
def test_every_command_reports_a_bad_config_file_in_one_line(module, tmp_path):
  syntax_error = tmp_path / "broken.py"
  syntax_error.write_text("def get_config(:\n")
  no_function = tmp_path / "empty.py"
  no_function.write_text("x = 1\n")
  for path, message in ((tmp_path / "missing.py", "no such file"),
                        (syntax_error, "not valid Python"),
                        (no_function, "has no get_config() function")):
    result = subprocess.run([sys.executable, "-m", module, "--config", str(path),
                             f"--workdir={tmp_path}/w"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"error: --config {path}: {message}"] or (
        result.stderr.splitlines()[0].startswith(f"error: --config {path}: {message}")
        and len(result.stderr.splitlines()) == 1)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Real runs in subprocesses, on real CIFAR-10.

def _command(cifar10_dir, workdir, *extra):
  return [sys.executable, "-m", "convnet_jax.main", *RUN_ARGS,
          f"--config.data.dir={cifar10_dir}", f"--workdir={workdir}", *extra]


def _wait_for(path, process, timeout=300):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert process.poll() is None, "the run ended before it got there"
    assert time.monotonic() < deadline
    time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(cifar10_dir, tmp_path_factory):
  """The run in its default calls, never stopped."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  result = subprocess.run(_command(cifar10_dir, workdir), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return read_run(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_stops_with_a_checkpoint_and_the_resumed_run_is_identical(
    uninterrupted, cifar10_dir, tmp_path, stop_signal):
  workdir = tmp_path / "stopped"
  # One step a call and a checkpoint every 5 steps: the signal goes out when checkpoint 5 is
  # on disk, 58 steps before the epoch ends.
  command = _command(cifar10_dir, workdir, "--config.operations.steps_per_call=1",
                     "--config.operations.checkpoint_every_steps=5")
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _wait_for(workdir / "checkpoints" / "5", process)
  process.send_signal(stop_signal)
  stdout, stderr = process.communicate(timeout=300)
  name = signal.Signals(stop_signal).name
  assert process.returncode == 128 + stop_signal, stderr[-3000:]
  [line] = [line for line in stderr.splitlines() if line.startswith("stopped by")]
  assert line.startswith(f"stopped by {name} at step ") and line.endswith(
      f" of epoch 0; checkpoint saved in {workdir.absolute() / 'checkpoints'}; run the same "
      f"command to resume")
  assert "Traceback" not in stderr and stdout == ""  # no epoch finished
  stopped_at = int(line.split(" at step ")[1].split(" ")[0])
  assert 5 <= stopped_at < STEPS_PER_EPOCH
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
  assert not (workdir / "preds").exists() and not (workdir / workdir_lib.RUN_LOCK).exists()
  if stop_signal == signal.SIGINT:
    return  # resuming is the same after either signal; the SIGTERM case runs it

  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming at step {stopped_at} of epoch 0 from" in result.stderr
  assert [json.loads(line)["epoch"] for line in result.stdout.splitlines()] == [0, 1]
  assert read_run(workdir) == uninterrupted  # each epoch once, every number the same


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_resumes_identically_and_takes_over_the_lock(
    uninterrupted, cifar10_dir, tmp_path):
  workdir = tmp_path / "killed"
  command = _command(cifar10_dir, workdir, "--config.operations.steps_per_call=2",
                     "--config.operations.checkpoint_every_steps=20")
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  _wait_for(workdir / "checkpoints" / "80", process)  # step 17 of epoch 1
  process.send_signal(signal.SIGKILL)
  process.wait()
  holder = json.loads((workdir / workdir_lib.RUN_LOCK).read_text())
  assert holder["pid"] == process.pid  # the lock file stays, naming the dead process
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"took over the lock of process {process.pid} on {holder['host']}" in result.stderr
  assert "resuming at step" in result.stderr and "of epoch 1 from" in result.stderr
  assert read_run(workdir) == uninterrupted


def _lock_holder(lock, processes, timeout=300) -> int:
  """The pid that the lock file names once one of `processes` holds it."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      pid = json.loads(lock.read_text())["pid"]
      if pid in [process.pid for process in processes]:
        return pid
    except (OSError, ValueError, KeyError):  # not there yet, or its holder not written yet
      pass
    assert all(process.poll() is None for process in processes), "a run ended before locking"
    assert time.monotonic() < deadline
    time.sleep(0.005)


@pytest.mark.slow
def test_two_runs_started_together_on_one_workdir_one_trains_the_other_stops(cifar10_dir,
                                                                            tmp_path):
  workdir = tmp_path / "shared"
  command = [sys.executable, "-m", "convnet_jax.main", "--config", "configs/smoke.py",
             f"--config.data.dir={cifar10_dir}", f"--workdir={workdir}",
             "--config.num_epochs=2"]
  processes = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  # Whichever locks the workdir first is paused while it holds the lock, so that the other
  # meets the lock however far behind a loaded machine started it (and not a finished run).
  holder = _lock_holder(workdir / workdir_lib.RUN_LOCK, processes)
  os.kill(holder, signal.SIGSTOP)
  try:
    other = next(process for process in processes if process.pid != holder)
    other.wait(timeout=300)
  finally:
    os.kill(holder, signal.SIGCONT)
  outputs = [process.communicate(timeout=600) for process in processes]
  codes = [process.returncode for process in processes]
  assert sorted(codes) == [0, 2], [stderr[-2000:] for _, stderr in outputs]
  winner, loser = (processes[0], processes[1]) if codes[0] == 0 else (processes[1], processes[0])
  loser_stdout, loser_stderr = outputs[processes.index(loser)]
  assert loser_stdout == ""
  assert loser_stderr.splitlines() == [
      f"error: --workdir {workdir}: in use by process {winner.pid} on {os.uname().nodename} "
      f"since {loser_stderr.split(' since ')[1].split(';')[0]}; wait for it to end or choose "
      f"another folder"]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [record["epoch"] for record in records] == [0, 1]
  assert len((workdir / "preds").read_text().splitlines()) == 100


@pytest.mark.slow
def test_stderr_is_a_few_lines_and_the_full_log_is_in_the_workdir(cifar10_dir, tmp_path):
  # Three epochs, so three checkpoints: orbax alone logged ~44 INFO lines for each.
  args = ["--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
          "--config.num_epochs=3"]
  result = subprocess.run([sys.executable, "-m", "convnet_jax.main", *args,
                           f"--workdir={tmp_path}/quiet"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert len(lines) <= 4, lines
  assert [line.split(" ")[0] for line in lines] == ["convolutions:", "model", "compile"]
  log = (tmp_path / "quiet" / "log.txt").read_text()
  assert "checkpoint" in log.lower() and log.count("\n") > 50
  # absl's --verbosity brings the INFO lines back to stderr.
  verbose = subprocess.run([sys.executable, "-m", "convnet_jax.main", *args,
                            f"--workdir={tmp_path}/verbose", "--verbosity=0"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
  assert verbose.returncode == 0
  assert len(verbose.stderr.splitlines()) > 50


@pytest.mark.slow
def test_a_second_ctrl_c_ends_the_run_inside_a_call(cifar10_dir, tmp_path):
  # The seed run on 10,000 images in one call per epoch: seconds long, so both signals land
  # inside the first call.
  process = subprocess.Popen(
      [sys.executable, "-m", "convnet_jax.main", "--config", "configs/default.py",
       f"--config.data.dir={cifar10_dir}", f"--workdir={tmp_path}/ctrl_c",
       "--config.operations.steps_per_call=1000"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  while not process.stderr.readline().startswith("compile time:"):
    assert process.poll() is None
  time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  stdout, _ = process.communicate(timeout=300)
  # Killed by the signal itself (the default action), not a clean exit 130 after the call.
  assert process.returncode == -signal.SIGINT
  assert stdout == ""


# ---------------------------------------------------------------------------------------------
# A workdir written by the package before the config groups.

@pytest.mark.slow
def test_a_workdir_saved_before_the_config_groups_resumes_and_ends_as_it_would_have(
    cifar10_dir, tmp_path):
  """tests/data/flat_workdir: the smoke run of 2 epochs as the package at ebaaff8 left it,
  stopped after epoch 0 (a flat config.json, its checkpoint under that config's fingerprint).
  Today's command resumes it from that checkpoint and ends with the records and predictions the
  old package's own uninterrupted run wrote (accuracies and predictions exactly; losses to float32
  rounding, as another CPU may round the convolutions otherwise)."""
  # Its config.json names the data folder as that command gave it, "../shared/data/cifar10":
  # the same relative path is made to lead to the data here.
  (tmp_path / "shared" / "data").mkdir(parents=True)
  (tmp_path / "shared" / "data" / "cifar10").symlink_to(cifar10_dir)
  workdir = tmp_path / "here" / "run"
  shutil.copytree(DATA / "flat_workdir", workdir)
  result = subprocess.run(
      [sys.executable, "-m", "convnet_jax.main", "--config", str(REPO_ROOT / "configs/smoke.py"),
       "--config.data.dir=../shared/data/cifar10", "--config.num_epochs=2",
       "--config.operations.tensorboard=False", "--workdir=run"],
      cwd=tmp_path / "here", env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming after epoch 0 from {workdir}/checkpoints" in result.stderr
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  expected = [json.loads(line)
              for line in (DATA / "flat_workdir_uninterrupted.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [0, 1]
  for record, want in zip(records, expected):
    assert record["test_acc"] == want["test_acc"] and record["train_acc"] == want["train_acc"]
    for key in ("train_loss", "test_loss", "learning_rate"):
      assert record[key] == pytest.approx(want[key], rel=1e-5), key
  assert (workdir / "preds").read_text() == (
      DATA / "flat_workdir_uninterrupted_preds").read_text()
  # Its config.json is today's now, the same run in its groups.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["name"] == "seed_convnet" and saved["data"]["max_train_examples"] == 200
