"""The benchmark command on the smoke config: report fields and FLOPs against a hand count."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def seed_convnet_forward_flops_per_image() -> int:
  """2 x multiply-adds of every convolution and the head, counted from the specification."""
  convs = [(32, 3, 3, 16), (32, 3, 16, 32), (32, 1, 16, 32), (16, 3, 32, 64), (16, 1, 32, 64),
           (8, 3, 64, 128), (8, 1, 64, 128)]  # (spatial size, kernel size, in, out)
  macs = sum(size * size * k * k * cin * cout for size, k, cin, cout in convs) + 128 * 2
  return 2 * macs


@pytest.mark.slow
def test_benchmark_report_on_smoke_config(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "convnet_jax.benchmark", "--config", "configs/smoke.py",
       f"--workdir={tmp_path}", "--config.benchmark.num_replicas=(1, 3)"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report == json.loads((tmp_path / "benchmark.json").read_text())
  assert report["backend"] == "cpu" and report["device_count"] >= 1
  assert report["jax_version"] and report["jaxlib_version"]
  [run] = report["results"]
  assert run["batch_size"] == 64 and run["dtype"] == "float32"
  assert run["conv_implementation"] == "onednn" and run["conv_reason"].startswith("auto: oneDNN")
  step = run["step_ms"]
  assert 0 < step["min"] <= step["median"] <= step["max"] and step["count"] == 3
  assert run["images_per_second"] == pytest.approx(64 / (step["median"] / 1e3), rel=0.01)
  assert run["epoch_steps"] == 4 and run["epoch_examples"] == 200  # 3 x 64 + 8
  # A training step is the forward pass plus about twice its FLOPs for the gradients.
  forward = 64 * seed_convnet_forward_flops_per_image() / 1e9
  assert 2.7 * forward < run["step_gflop"] < 3.5 * forward
  assert run["achieved_gflop_per_second"] == pytest.approx(
      run["step_gflop"] / (step["median"] / 1e3), rel=0.02)
  assert run["step_compile_seconds"] > 0 and run["epoch_seconds"]["median"] > 0
  # Replicas: every replica's images count towards the throughput of one epoch.
  assert [r["num_replicas"] for r in report["replica_results"]] == [1, 3]
  for replicas in report["replica_results"]:
    epoch_seconds = replicas["epoch_seconds"]
    assert epoch_seconds["count"] == 1 and epoch_seconds["min"] <= epoch_seconds["median"]
    assert replicas["images_per_second"] == pytest.approx(
        replicas["num_replicas"] * 200 / epoch_seconds["median"], rel=0.01)


def test_benchmark_rejects_bad_lists():
  result = subprocess.run(
      [sys.executable, "-m", "convnet_jax.benchmark", "--config", "configs/smoke.py",
       "--config.benchmark.dtypes=('float16',)"], cwd=REPO_ROOT, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 2
  assert "config.benchmark.dtypes=('float16',): expected names from" in result.stderr
