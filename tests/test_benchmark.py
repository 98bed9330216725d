"""The benchmark command on the smoke config: report fields and FLOPs against a hand count."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import smoke as smoke_config
from conftest import REPO_ROOT
from convnet_jax import models
from convnet_jax import programs as programs_lib
from convnet_jax.ops import conv
from convnet_jax.runs import prepare
from convnet_jax.tools import benchmark
import built


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
       f"--workdir={tmp_path}", "--config.benchmark.num_replicas=(1, 3)"], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=600,
      env={key: value for key, value in os.environ.items()
           if key not in ("GLIBC_TUNABLES", "CONVNET_JAX_MALLOC")})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report == json.loads((tmp_path / "benchmark.json").read_text())
  assert report["backend"] == "cpu" and report["device_count"] >= 1
  assert report["jax_version"] and report["jaxlib_version"]
  # A command restarts itself with glibc keeping freed memory (`runs.allocator`).
  assert report["malloc"].startswith("malloc: keeps freed memory"), report["malloc"]
  [run] = report["results"]
  assert run["batch_size"] == 64 and run["dtype"] == "float32"
  assert run["conv_implementation"] == "onednn" and run["conv_reason"].startswith("auto: oneDNN")
  step = run["step_ms"]
  assert 0 < step["min"] <= step["median"] <= step["max"] and step["count"] == 3
  assert run["epoch_steps"] == 4 and run["epoch_examples"] == 200  # 3 x 64 + 8
  epoch_step = run["epoch_seconds"]["median"] / 4
  assert run["epoch_step_ms"] == pytest.approx(1e3 * epoch_step, rel=0.01)
  assert run["images_per_second"] == pytest.approx(64 / epoch_step, rel=0.01)
  # A training step is the forward pass plus about twice its FLOPs for the gradients.
  forward = 64 * seed_convnet_forward_flops_per_image() / 1e9
  assert 2.7 * forward < run["step_gflop"] < 3.5 * forward
  assert run["achieved_gflop_per_second"] == pytest.approx(
      run["step_gflop"] / epoch_step, rel=0.02)
  assert run["program"] == "programs.Programs.train_steps (the trainer's)"
  # A CPU's ceiling is measured, through oneDNN: 2 x 16,384 x 256 x 256, 2 x 4,096 x 1,024^2
  # and 2 x 1,024 x 2,048^2 FLOP are each 17.2 GFLOP a call.
  ceiling = run["ceiling"]
  assert re.fullmatch(r"measured: the fastest of 3 float32 matrix products, \((16384 x 256\) "
                      r"by \(256 x 256|4096 x 1024\) by \(1024 x 1024|1024 x 2048\) by \(2048 x "
                      r"2048)\), as 1x1 convolutions by onednn on cpu, fastest of 5 calls each",
                      ceiling["source"]), ceiling["source"]
  assert ceiling["gflop_per_second"] > 0
  assert run["utilisation"] == pytest.approx(
      run["achieved_gflop_per_second"] / ceiling["gflop_per_second"], rel=0.01, abs=1e-3)
  assert run["compile_seconds"] > 0 and run["epoch_seconds"]["median"] > 0
  # The step split by the extension's clocks: the convolutions and the rest add up to the step
  # (one timed epoch, so its mean is its median); BatchNorm ran in oneDNN ("auto" beside
  # oneDNN's convolutions), as part of the rest.
  assert run["epoch_seconds"]["count"] == 1
  assert run["convolution_ms"] + run["non_convolution_ms"] == pytest.approx(
      run["epoch_step_ms"], abs=0.02)
  assert 0 < run["convolution_ms"] < run["epoch_step_ms"]
  assert 0 < run["onednn_batch_norm_ms"] < run["non_convolution_ms"]
  assert run["non_convolution_share"] == pytest.approx(
      run["non_convolution_ms"] / (run["convolution_ms"] + run["non_convolution_ms"]), abs=2e-3)
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


def _without_debug_info(hlo: str) -> str:
  """A compiled HLO module without its source locations (the tables of file names, functions
  and stack frames, and each instruction's metadata), which differ with the caller."""
  lines, in_tables = [], False
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      in_tables = True
    elif line.startswith(("%", "ENTRY")):
      in_tables = False
    if not in_tables:
      lines.append(re.sub(r", metadata=\{[^}]*\}", "", line))
  # The numbers XLA appends to instruction and computation names come from counters that
  # earlier compilations in the process move on: each name is renamed by its first use.
  names: dict[str, str] = {}
  return re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"),
                "\n".join(lines))


def test_the_benchmark_times_the_program_a_run_executes(cifar10_dir):
  # The smoke run trains on 200 images, and so does its benchmark (benchmark.num_examples):
  # the same shapes, so the same program, whatever the pixels.
  config = smoke_config.get_config()
  config.data.dir = str(cifar10_dir)
  implementation = conv.choose_conv_implementation(config.model.conv_implementation,
                                                   config.model.dtype).implementation
  # What `train.train_and_evaluate` builds, step by step, on the real data.
  data = prepare.load_data(config)
  steps_per_epoch = len(data.train_labels) // config.batch_size + 1  # 3 full batches and 8
  model = models.create_model(config.model, data.num_classes, implementation)
  budget = built.budget(config, steps_per_epoch)
  state, data_key = prepare.create_run_state(config, model, budget, None, data)
  run_programs = programs_lib.Programs(prepare.program_options(config, budget), model, state,
                                       programs_lib.put_data(data, None), data_key, None)
  bench_programs, *_, bench_steps = benchmark.synthetic_run(
      config, config.benchmark.num_examples, data.num_classes, implementation)
  assert bench_steps == steps_per_epoch == 4
  assert _without_debug_info(bench_programs.train_steps.as_text()) == _without_debug_info(
      run_programs.train_steps.as_text())
  def shapes(programs):  # of the train state's leaves, which the program is compiled for
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(programs._arguments[0])]

  assert shapes(bench_programs) == shapes(run_programs)


def test_the_step_flops_count_the_selection_proxys_convolutions_on_the_onednn_path():
  """With oneDNN convolutions the step is counted on the im2col path: the proxy's too, so both
  paths count the same FLOPs."""
  from configs import cifar10_airbench96_faster

  config = cifar10_airbench96_faster.get_config()
  config.model.airbench.widths = config.select.proxy_widths = (16, 16, 16)
  config.model.dtype, config.batch_size = "float32", 16
  counts = {}
  for implementation in ("onednn", "im2col"):
    programs, state, num_steps = benchmark.synthetic_run(config, 32, 10, implementation)
    counts[implementation] = benchmark._step_flops(config, state, programs.data, num_steps,
                                                   implementation)
  assert counts["onednn"] == pytest.approx(counts["im2col"], rel=1e-6)
