"""The command line end to end on real CIFAR-10: output format, files, and clean errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, write_records


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "convnet_jax.main", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)


def read_cifar2_test_labels(cifar10_dir, limit=None):
  """Test labels of classes 0 and 1, read straight from the file (label = first byte)."""
  labels = np.fromfile(cifar10_dir / "test_batch.bin", np.uint8).reshape(-1, 3073)[:, 0]
  labels = labels[labels <= 1]
  return labels[:limit]


@pytest.mark.slow
def test_smoke_run_prints_json_lines_and_writes_outputs(cifar10_dir, tmp_path):
  workdir = tmp_path / "run"
  result = run_main("--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={workdir}", "--config.num_epochs=2",
                    "--config.operations.trace_shapes=True")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  records = [json.loads(line) for line in lines]  # stdout holds JSON lines only
  assert [r["epoch"] for r in records] == [0, 1]
  for record in records:
    assert {"epoch", "test_acc", "time", "train_loss"} <= record.keys()
    assert 0.0 <= record["test_acc"] <= 1.0 and record["time"] > 0
  assert records[1]["time"] > records[0]["time"]
  saved = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert saved == records
  config = json.loads((workdir / "config.json").read_text())
  assert config["batch_size"] == 64 and config["num_epochs"] == 2
  # Which convolution path ran and why: one stderr line at start, recorded in config.json.
  used = config["conv_implementation_used"]
  assert used["implementation"] == "onednn" and used["reason"].startswith("auto: oneDNN 3.")
  assert f"convolutions: onednn ({used['reason']})" in result.stderr.splitlines()
  predictions = np.loadtxt(workdir / "preds", dtype=int)
  labels = read_cifar2_test_labels(cifar10_dir, limit=100)
  assert predictions.shape == (100,) and set(predictions.tolist()) <= {0, 1}
  assert np.mean(predictions == labels) == pytest.approx(records[-1]["test_acc"])
  # The reference-style trace of the first step, on stderr.
  for expected in ["input: (64, 32, 32, 3)", "target: (64,)",
                   "block1 (ResidualBlock): (64, 32, 32, 16) -> (64, 32, 32, 32)",
                   "block2 (ResidualBlock): (64, 16, 16, 32) -> (64, 16, 16, 64)",
                   "block3 (ResidualBlock): (64, 8, 8, 64) -> (64, 8, 8, 128)",
                   "global max-pool: (64, 128)", "output: (64, 2)"]:
    assert expected in result.stderr


@pytest.fixture
def broken_data_dirs(tmp_path, cifar10_dir):
  """Copies of a tiny CIFAR folder with one file truncated or holding a bad label."""
  dirs = {}
  for kind in ("truncated", "bad_label"):
    folder = tmp_path / kind
    folder.mkdir()
    for index in range(1, 6):
      write_records(folder / f"data_batch_{index}.bin", [0, 1, 0, 1])
    write_records(folder / "test_batch.bin", [0, 1] if kind == "truncated" else [0, 11])
    dirs[kind] = folder
  truncated = dirs["truncated"] / "test_batch.bin"
  truncated.write_bytes(truncated.read_bytes()[:-7])
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  for name in [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]:
    (pickled / name).write_bytes(b"\x80\x04not read")
  dirs["pickled"] = pickled
  return dirs


BAD_INPUTS = [
    (["--config.batch_size=0"], "config.batch_size=0: expected a positive integer"),
    (["--config.num_epochs=-1"], "config.num_epochs=-1.0: expected a positive number"),
    (["--config.optim.learning_rate=-0.1"],
     "config.optim.learning_rate=-0.1: expected a non-negative"),
    (["--config.data.classes=(0,10)"],
     "config.data.classes=(0, 10): expected class ids between 0 and 9"),
    (["--config.model.name=resnet9000"], "config.model.name='resnet9000': expected one of"),
    (["--config.schedule.name=step", "--config.schedule.boundaries_epochs=(3,9)"],
     "config.schedule.boundaries_epochs=(3, 9): expected epochs between 1 and num_epochs - 1 = 4"),
    (["--config.data.dir=/nonexistent/cifar"],
     "config.data.dir: /nonexistent/cifar is not a folder"),
    (["--config.data.dir={truncated}"], "test_batch.bin: 6139 bytes is not a whole number"),
    (["--config.data.dir={bad_label}"], "test_batch.bin: record 1 has label 11"),
    (["--config.data.dir={pickled}"], "pickled CIFAR-10 'python version', which is not read"),
    (["--config.model.dtype=float16"], "config.model.dtype='float16': expected one of"),
    (["--config.model.conv_implementation=fft"],
     "config.model.conv_implementation='fft': expected one of"),
    (["--config.optim.momentum=1.5"], "config.optim.momentum=1.5: expected a number in [0, 1)"),
    (["--config.eval.batch_size=0"], "config.eval.batch_size=0: expected a positive integer"),
    (["--config.data.classes=(1,1)"], "config.data.classes=(1, 1): expected no repeated class id"),
    (["--config.operations.checkpoint_every_epochs=0"],
     "config.operations.checkpoint_every_epochs=0: expected a positive integer"),
    (["--config.data.max_train_examples=10"],
     "config.batch_size=128: expected at most the 10 training examples"),
    (["--config.data.max_test_examples=100"],
     "config.eval.batch_size=128: expected at most the 100 test examples"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_input_fails_cleanly_before_compiling(overrides, message, cifar10_dir,
                                                  broken_data_dirs, tmp_path):
  args = [arg.format(**broken_data_dirs) for arg in overrides]
  if not any(arg.startswith("--config.data.dir") for arg in args):
    args.append(f"--config.data.dir={cifar10_dir}")
  result = run_main("--config", "configs/default.py", f"--workdir={tmp_path / 'w'}", *args)
  assert result.returncode == 2
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert "compile time" not in result.stderr
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_foreign_workdir_is_never_overwritten(cifar10_dir, tmp_path):
  workdir = tmp_path / "done"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"epoch": 0}\n')
  result = run_main("--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={workdir}")
  assert result.returncode == 2 and "no config.json; not a convnet_jax run" in result.stderr
  assert (workdir / "metrics.jsonl").read_text() == '{"epoch": 0}\n'


def test_a_corrupt_config_json_is_detected(cifar10_dir, tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  result = run_main("--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
                    f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "config.json: not valid JSON" in result.stderr and "corrupt workdir" in result.stderr
  assert (tmp_path / "config.json").read_text() == "{not json"


@pytest.mark.slow
def test_a_run_of_another_config_is_not_resumed(cifar10_dir, tmp_path):
  args = ["--config", "configs/smoke.py", f"--config.data.dir={cifar10_dir}",
          f"--workdir={tmp_path}"]
  assert run_main(*args).returncode == 0
  before = (tmp_path / "metrics.jsonl").read_text()
  result = run_main(*args, "--config.seed=7")
  assert result.returncode == 2
  assert "holds a run of another config (seed: 7 here, 0 there)" in result.stderr
  assert (tmp_path / "metrics.jsonl").read_text() == before
