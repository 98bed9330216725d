"""The curves command: a PNG from a workdir's metrics.jsonl, lr drops found, clean errors."""

import json
import math
import struct
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from convnet_jax.errors import UserError
from convnet_jax.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(rates):
  """Per-epoch records as train_and_evaluate writes them, with the given learning rates."""
  records = []
  for epoch, rate in enumerate(rates):
    records.append({"epoch": epoch, "test_acc": 0.5 + 0.04 * epoch, "time": 10.0 * (epoch + 1),
                    "train_loss": 2.0 / (epoch + 1), "train_acc": 0.45 + 0.05 * epoch,
                    "test_loss": 2.2 / (epoch + 1), "learning_rate": rate,
                    "compile_time": 3.0})
  return records


def write_metrics(workdir, records):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_plot(*args):
  return subprocess.run([sys.executable, "-m", "convnet_jax.plot", *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def png_size(path):
  """Width and height from the PNG's IHDR chunk, which follows the 8-byte signature."""
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_step_drops_are_found_and_smooth_decays_are_not():
  step = [0.1] * 4 + [0.01] * 3 + [0.001] * 3
  assert plot.learning_rate_drops(history(step)) == [4, 7]
  assert plot.learning_rate_drops(history([0.1, 0.01, 0.01])) == [1]
  linear = [0.1 * (1 - epoch / 5) for epoch in range(5)]  # ..., 0.04, 0.02: halved, not a step
  assert plot.learning_rate_drops(history(linear)) == []
  cosine = [0.05 * (1 + math.cos(math.pi * epoch / 20)) for epoch in range(20)]
  assert plot.learning_rate_drops(history(cosine)) == []


def test_command_writes_a_png_into_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  write_metrics(workdir, history([0.1] * 4 + [0.01] * 3 + [0.001] * 3))
  result = run_plot(workdir)
  assert result.returncode == 0, result.stderr
  output = workdir / "curves.png"
  assert result.stdout.strip() == str(output)
  assert png_size(output) == (1000, 400)  # 10 x 4 inches at 100 dpi
  assert 20_000 < output.stat().st_size < 500_000


def test_output_option_and_a_single_epoch(tmp_path):
  workdir = tmp_path / "run"
  write_metrics(workdir, history([0.1]))
  output = tmp_path / "elsewhere.png"
  result = run_plot(workdir, "--output", output)
  assert result.returncode == 0, result.stderr
  assert png_size(output) == (1000, 400)
  assert not (workdir / "curves.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: file not found"),
    ("", "metrics.jsonl: empty"),
    ("\n\n", "metrics.jsonl: empty"),
    ('{"epoch": 0}\n', "metrics.jsonl: line 1 lacks train_loss"),
    ("not json\n", "metrics.jsonl: line 1 is not JSON"),
])
def test_missing_or_empty_metrics_fail_with_one_line(tmp_path, content, message, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  if content is not None:
    (workdir / "metrics.jsonl").write_text(content)
  assert plot.main([str(workdir)]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not (workdir / "curves.png").exists()


def test_the_command_exits_with_status_2_on_an_empty_workdir(tmp_path):
  result = run_plot(tmp_path)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip() == f"error: {tmp_path / 'metrics.jsonl'}: file not found " \
      "(expected the metrics.jsonl of a training run)"


def test_read_history_raises_user_error(tmp_path):
  with pytest.raises(UserError, match="file not found"):
    plot.read_history(tmp_path)


def test_replicated_run_plots_the_mean_and_the_min_max_band():
  records = [{"epoch": 0, "train_loss": [0.6, 0.8, None], "train_acc": [0.7, 0.5, None],
              "test_loss": [0.5, 0.7, None], "test_acc": [0.8, 0.6, None],
              "learning_rate": [0.1, 0.05, 9.0]},
             {"epoch": 1, "train_loss": [0.2, 0.4, None], "train_acc": [0.9, 0.7, None],
              "test_loss": [0.3, 0.5, None], "test_acc": [0.9, 0.7, None],
              "learning_rate": [0.01, 0.005, 0.9]}]
  figure = plot.plot_curves(records)
  loss_axes, error_axes = figure.axes
  train_loss = loss_axes.get_lines()[0]
  assert list(train_loss.get_xdata()) == [1, 2]
  assert list(train_loss.get_ydata()) == pytest.approx([0.7, 0.3])  # the diverged one left out
  test_error = error_axes.get_lines()[1]
  assert list(test_error.get_ydata()) == pytest.approx([0.3, 0.2])
  band = error_axes.collections[1].get_paths()[0].vertices[:, 1]  # test error's min-max range
  assert min(band) == pytest.approx(0.1) and max(band) == pytest.approx(0.4)
  # The first replica's rates drop tenfold after a flat start: one lr drop line.
  assert len([line for line in loss_axes.get_lines() if line.get_linestyle() == ":"]) == 1
