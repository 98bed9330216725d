"""Accelerator benchmark: `python -m convnet_jax.benchmark --config configs/default.py [--workdir DIR]`.

Times the configured model's compiled train step and epoch on synthetic data of the configured
shape (the same programs `train` runs), on whatever backend JAX finds, and prints and saves a JSON
report: backend, devices, versions, compile seconds, step time (median, min, max over
`benchmark.num_steps` steps after warm-up, each ended with `block_until_ready`), images per second,
achieved GFLOP/s from XLA's cost analysis, and the time of one whole epoch. Optionally over lists of
batch sizes and dtypes (`config.benchmark.batch_sizes`, `config.benchmark.dtypes`), and the epoch
time and throughput of N models trained together (`config.benchmark.num_replicas`, e.g.
"(1, 2, 4, 8, 16)").

With `--config.benchmark.aot_topology=v5e:2x2` it times nothing: it compiles the run's programs
for that TPU topology without a TPU and lowers them for GPU (`aot`), reporting memory per chip
and the compiler's estimates.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from convnet_jax import cli
from convnet_jax import compile_cache
from convnet_jax import conv
from convnet_jax import input_pipeline
from convnet_jax import models
from convnet_jax import run_setup
from convnet_jax import steps
from convnet_jax import validation

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so the module imports beside the other
  commands (which define flags of the same names)."""
  flags.DEFINE_string("workdir", None, "Folder for benchmark.json (default: print only).")
  config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])


def _flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (None if unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _time_calls(fn, num_calls: int) -> list[float]:
  times = []
  for _ in range(num_calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _synthetic_run(config, num_examples: int, num_classes: int):
  """The configured train state (one model or replicas, on one device) and its data key, random
  uint8 images and labels of CIFAR shape on the device, a fixed mean and std, and the steps per
  epoch."""
  model = models.create_model(config, num_classes)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples,) + input_pipeline.IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples, dtype=np.int32)
  mean, std = np.full((3,), 0.5, np.float32), np.full((3,), 0.25, np.float32)
  data = input_pipeline.Dataset(images, labels, images[:0], labels[:0], mean, std,
                                tuple(map(str, range(num_classes))))
  num_steps = steps.steps_per_epoch(num_examples, config.batch_size, config.drop_last_batch)
  state, data_key = run_setup.create_run_state(config, model, num_steps, None, data)
  return (state, data_key, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mean),
          jnp.asarray(std), num_steps)


def benchmark_one(config, batch_size: int, dtype: str, num_examples: int,
                  num_classes: int) -> dict:
  """Compiles and times the train step and one epoch for one batch size and dtype."""
  config = config.copy_and_resolve_references()
  config.batch_size, config.dtype, config.num_replicas = batch_size, dtype, 1
  choice = conv.choose_conv_implementation(config.conv_implementation, dtype)
  print(choice.describe(), file=sys.stderr)
  state, _, images, labels, mean, std, num_steps = _synthetic_run(config, num_examples,
                                                                  num_classes)

  batch = input_pipeline.normalize(images[:batch_size], mean, std)
  options = steps.step_options(config, num_steps)
  train_step = functools.partial(steps.train_step, options=options)
  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=0).lower(
      state, batch, labels[:batch_size]).compile(compiler_options=steps.compiler_options())
  step_compile = time.perf_counter() - start
  start = time.perf_counter()
  epoch = steps.compile_train_epoch(state, images, labels, jax.random.key(1), mean, std,
                                    batch_size=batch_size,
                                    drop_last_batch=config.drop_last_batch,
                                    augment=steps.augment_options(config), options=options)
  epoch_compile = time.perf_counter() - start

  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], batch, labels[:batch_size])
    return metrics

  def run_epoch():
    holder["state"], metrics = epoch(holder["state"], images, labels, jax.random.key(1),
                                     np.int32(0), mean, std)
    return metrics

  bench = config.benchmark
  _time_calls(run_step, bench.warmup_steps)
  step_times = _time_calls(run_step, bench.num_steps)
  _time_calls(run_epoch, 1)  # warm-up
  epoch_times = _time_calls(run_epoch, bench.num_epochs)
  median = statistics.median(step_times)
  flops = _flops(step)
  if choice.implementation == "onednn":
    # XLA's cost analysis counts no FLOPs inside custom calls: count the same step's math on
    # the im2col program instead (same convolutions as matrix products).
    im2col_model = models.create_model(config, num_classes, "im2col")
    flops = _flops(jax.jit(train_step).lower(
        holder["state"].replace(apply_fn=im2col_model.apply), batch, labels[:batch_size]).compile(
            compiler_options=steps.compiler_options()))
  return {
      "batch_size": batch_size,
      "dtype": dtype,
      "conv_implementation": choice.implementation,
      "conv_reason": choice.reason,
      "step_compile_seconds": round(step_compile, 3),
      "epoch_compile_seconds": round(epoch_compile, 3),
      "step_ms": {"median": round(1e3 * median, 2), "min": round(1e3 * min(step_times), 2),
                  "max": round(1e3 * max(step_times), 2), "count": len(step_times)},
      "images_per_second": round(batch_size / median, 1),
      # With onednn, counted on the im2col program of the same step (see above).
      "step_gflop": None if flops is None else round(flops / 1e9, 3),
      "achieved_gflop_per_second": None if flops is None else round(flops / median / 1e9, 1),
      "epoch_examples": num_examples,
      "epoch_steps": num_steps,
      "epoch_seconds": {"median": round(statistics.median(epoch_times), 3),
                        "min": round(min(epoch_times), 3), "count": len(epoch_times)},
  }


def benchmark_replicas(config, num_replicas: int, num_examples: int, num_classes: int) -> dict:
  """Times one epoch of `num_replicas` models trained together (the vmapped epoch program of
  `train`; one model: the plain program) on synthetic data. Throughput counts every replica's
  images."""
  config = config.copy_and_resolve_references()
  config.num_replicas = num_replicas
  config.replica_seeds = config.replica_learning_rates = config.replica_momenta = ()
  state, data_key, images, labels, mean, std, num_steps = _synthetic_run(config, num_examples,
                                                                         num_classes)
  start = time.perf_counter()
  epoch = steps.compile_train_epoch(state, images, labels, data_key, mean, std,
                                    batch_size=config.batch_size,
                                    drop_last_batch=config.drop_last_batch,
                                    augment=steps.augment_options(config),
                                    vmap_replicas=num_replicas > 1,
                                    options=steps.step_options(config, num_steps))
  compile_seconds = time.perf_counter() - start
  holder = {"state": state}

  def run_epoch():
    holder["state"], metrics = epoch(holder["state"], images, labels, data_key, np.int32(0),
                                     mean, std)
    return metrics

  _time_calls(run_epoch, 1)  # warm-up
  epoch_times = _time_calls(run_epoch, config.benchmark.num_epochs)
  median = statistics.median(epoch_times)
  return {
      "num_replicas": num_replicas,
      "batch_size": config.batch_size,
      "epoch_compile_seconds": round(compile_seconds, 3),
      "epoch_examples": num_examples,
      "epoch_seconds": {"median": round(median, 3), "min": round(min(epoch_times), 3),
                        "max": round(max(epoch_times), 3), "count": len(epoch_times)},
      "images_per_second": round(num_replicas * num_examples / median, 1),
  }


def run_aot(config) -> dict:
  """`benchmark.aot_topology`: the run's programs compiled for that TPU topology and lowered
  for each of `benchmark.aot_gpu_platforms`, for every dtype of `benchmark.dtypes` (default:
  the config's); returns the report (see `aot`)."""
  from convnet_jax import aot  # imported here: only this mode needs the TPU topology code

  bench = config.benchmark
  aot.tpu_mesh(bench.aot_topology)  # no libtpu, or an unknown name: one line, before any work
  report = {"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
            "model": config.model, "tpu": [], "gpu_lowering": []}
  for dtype in bench.dtypes or (config.dtype,):
    dtype_config = config.copy_and_resolve_references()
    dtype_config.dtype = dtype
    report["tpu"].append(aot.compile_for_tpu(dtype_config, bench.aot_topology))
    print(json.dumps(report["tpu"][-1]), file=sys.stderr)
  for platform in bench.aot_gpu_platforms:
    report["gpu_lowering"].append(aot.lower_for_gpu(config, platform))
  return report


def run_benchmark(config) -> dict:
  """Benchmarks every (batch size, dtype) pair the config lists, and every replica count of
  `benchmark.num_replicas`; returns the report. With `benchmark.aot_topology`, compiles for it
  instead (`run_aot`)."""
  validation.validate_config(config)
  bench = config.benchmark
  if bench.aot_topology:
    return run_aot(config)
  # Compile times are then those of a warm start where the cache holds the programs.
  cache = compile_cache.enable(config.operations.compilation_cache)
  devices = jax.devices()
  report = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "model": config.model,
      "data": "synthetic uint8 images of CIFAR shape",
      "compilation_cache": str(cache.folder) if cache.folder else None,
      "results": [],
  }
  num_classes = len(config.classes)
  for batch_size in bench.batch_sizes or (config.batch_size,):
    for dtype in bench.dtypes or (config.dtype,):
      result = benchmark_one(config, batch_size, dtype, bench.num_examples, num_classes)
      print(json.dumps(result), file=sys.stderr)
      report["results"].append(result)
  if bench.num_replicas:
    report["replica_results"] = []
  for num_replicas in bench.num_replicas:
    result = benchmark_replicas(config, num_replicas, bench.num_examples, num_classes)
    print(json.dumps(result), file=sys.stderr)
    report["replica_results"].append(result)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  report = run_benchmark(FLAGS.config)
  text = json.dumps(report, indent=2)
  print(text)
  if FLAGS.workdir:
    Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    (Path(FLAGS.workdir) / "benchmark.json").write_text(text + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
