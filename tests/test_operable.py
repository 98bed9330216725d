"""Operable runs: damaged checkpoints, reproducibility, NaN guard, TensorBoard, the progress bar
(kills and signals: test_long_runs)."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO_ROOT
from test_cli import run_main

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("operable")

TIMING_KEYS = ("time", "compile_time")
# 1,000 training images in batches of 64: 16 steps, long enough to be killed mid-epoch.
RUN_ARGS = ("--config", "configs/smoke.py", "--config.data.max_train_examples=1000",
            "--config.num_epochs=4")


def read_run(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for record in records:
    for key in TIMING_KEYS:
      record.pop(key)
  return records, (workdir / "preds").read_text()


@pytest.fixture(scope="module")
def uninterrupted(cifar10_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  result = run_main(*RUN_ARGS, f"--config.data.dir={cifar10_dir}", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return read_run(workdir)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(uninterrupted, cifar10_dir, tmp_path):
  result = run_main(*RUN_ARGS, f"--config.data.dir={cifar10_dir}", f"--workdir={tmp_path}/b")
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_run(tmp_path / "b") == uninterrupted
  assert len(uninterrupted[0]) == 4


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(uninterrupted, cifar10_dir,
                                                              tmp_path):
  workdir = tmp_path / "damaged"
  args = [*RUN_ARGS, f"--config.data.dir={cifar10_dir}", f"--workdir={workdir}"]
  assert run_main(*args).returncode == 0
  # Damage every data file of the newest checkpoint (after epoch 3: 4 x 16 steps) and lose the
  # predictions.
  damaged = [path for path in (workdir / "checkpoints" / "64" / "state").rglob("*")
             if path.is_file() and path.stat().st_size > 64]
  assert damaged
  for path in damaged:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
  (workdir / "preds").unlink()
  result = run_main(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint" in result.stderr and "trying the previous one" in result.stderr
  assert [json.loads(line)["epoch"] for line in result.stdout.splitlines()] == [3]
  assert read_run(workdir) == uninterrupted


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_epoch(cifar10_dir, tmp_path):
  result = run_main("--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={tmp_path}/nan", "--config.optim.learning_rate=1e38",
                    "--config.num_epochs=3")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert "non-finite loss at step" in error and "(epoch" in error
  records = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
  bad_epoch = int(error.split("(epoch ")[1].split(",")[0])
  assert len(records) == bad_epoch  # no line for the diverged epoch
  saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir()
                 if p.name.isdigit())
  # Named by steps: smoke's epochs are 4 steps long.
  assert saved == [4 * epochs for epochs in range(1, bad_epoch + 1)][-3:]


@pytest.mark.slow
def test_tensorboard_scalars_and_quiet_stderr_off_a_terminal(cifar10_dir, tmp_path):
  result = run_main("--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={tmp_path}/tb")
  assert result.returncode == 0
  [events] = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
  content = events.read_bytes()
  for tag in (b"train_loss", b"test_acc", b"learning_rate", b"step_time_ms",
              b"images_per_second"):
    assert tag in content
  assert "epoch/s" not in result.stderr and "\r" not in result.stderr  # no progress bar


@pytest.mark.slow
def test_progress_bar_in_a_terminal(cifar10_dir, tmp_path):
  leader, follower = pty.openpty()
  # A real terminal has a size; a fresh pseudo-terminal is 0x0, where a bar has no room.
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
  process = subprocess.Popen(
      [sys.executable, "-m", "convnet_jax.main", "--config", "configs/smoke.py",
       f"--config.data.dir={cifar10_dir}", f"--workdir={tmp_path}/tty",
       "--config.num_epochs=2"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=follower,
      text=True)
  os.close(follower)
  output = b""
  while True:  # drain the terminal while the run writes to it, until it closes
    try:
      chunk = os.read(leader, 65536)
    except OSError:
      break
    if not chunk:
      break
    output += chunk
  os.close(leader)
  stdout = process.stdout.read()
  assert process.wait(timeout=600) == 0
  assert b"2/2" in output  # the bar reached both epochs
  assert [json.loads(line)["epoch"] for line in stdout.splitlines()] == [0, 1]
