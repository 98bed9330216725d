"""Accelerator benchmark: `python -m convnet_jax.benchmark --config CONFIG [--workdir DIR]`.

Times the training program the trainer runs (`programs.Programs.train_steps`, built by the
same function) on synthetic data of the configured shape, on whatever backend JAX finds, and
prints and saves a JSON report: backend, devices, versions, compile seconds, step time (median,
min, max over `benchmark.num_steps` calls of one step each after warm-up, each ended with
`block_until_ready`: the step and a call's fixed cost), the time of a call of one whole epoch
and of a step within it, images per second, achieved GFLOP/s from XLA's cost analysis, and the
utilisation (that as a fraction of the device's `ceiling`: published for known GPUs and TPUs,
measured with a large matmul on a CPU, its source named) and, where the convolutions run in
oneDNN, how much of a step is spent outside them (the extension's clock). Optionally over lists of
batch sizes and dtypes (`config.benchmark.batch_sizes`, `config.benchmark.dtypes`), and the epoch
time and throughput of N models trained together (`config.benchmark.num_replicas`, e.g.
"(1, 2, 4, 8, 16)").

With `--config.benchmark.aot_topology=v5e:2x2` it times nothing: it compiles the run's programs
for that TPU topology without a TPU and lowers them for GPU (`aot`), reporting memory per chip
and the compiler's estimates.
"""

from __future__ import annotations

import itertools
import json
import math
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

from convnet_jax import models
from convnet_jax import programs as programs_lib
from convnet_jax.budget import StepBudget
from convnet_jax.data import input_pipeline
from convnet_jax.ops import conv
from convnet_jax.ops import onednn
from convnet_jax.runs import allocator
from convnet_jax.runs import cli
from convnet_jax.runs import compile_cache
from convnet_jax.runs import prepare
from convnet_jax.runs import validation
from convnet_jax.errors import check_writable_folder
from convnet_jax.errors import WriteFailed

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


def _synthetic_data(config, num_examples: int, num_classes: int) -> input_pipeline.Dataset:
  """Random uint8 images and labels of CIFAR shape: `num_examples` to train on and one
  evaluation batch to test on, with a fixed mean and std."""
  rng = np.random.default_rng(0)
  num_test = config.eval.batch_size
  images = rng.integers(0, 256, (num_examples + num_test,) + input_pipeline.IMAGE_SHAPE,
                        dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples + num_test, dtype=np.int32)
  mean, std = np.full((3,), 0.5, np.float32), np.full((3,), 0.25, np.float32)
  return input_pipeline.Dataset(images[:num_examples], labels[:num_examples],
                                images[num_examples:], labels[num_examples:], mean, std,
                                tuple(map(str, range(num_classes))))


def synthetic_run(config, num_examples: int, num_classes: int, conv_implementation: str):
  """The programs a run of `config` executes (`programs.Programs`, built as
  `train.train_and_evaluate` builds them, on one device and without the program store) on
  synthetic data of `num_examples` training images: (programs, state, steps per epoch)."""
  model = models.create_model(config.model, num_classes, conv_implementation)
  data = _synthetic_data(config, num_examples, num_classes)
  budget = prepare.step_budget(config, num_examples)
  state, data_key = prepare.create_run_state(config, model, budget, None, data)
  device_data = programs_lib.put_data(data, None)
  programs = programs_lib.Programs(prepare.program_options(config, budget), model, state,
                                   device_data, data_key, None)
  return programs, state, budget.steps_per_epoch


# Published dense peaks per chip, in TFLOP/s, by a piece of JAX's device_kind and dtype: for
# accelerators the ceiling is the vendor's figure (labelled so); a CPU's is measured. A GPU's
# float32 figure is its TF32 tensor-core peak: JAX's default precision computes float32
# convolutions and matrix products in TF32 there (`jax_default_matmul_precision`), not on the
# plain float32 units (67 TFLOP/s on an H100/H200, 19.5 on an A100).
PUBLISHED_PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 494.7,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 494.7,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5e", "bfloat16"): 197.0, ("TPU v5p", "bfloat16"): 459.0,
    ("TPU v6", "bfloat16"): 918.0,
}
# The matrix products that measure a ceiling where none is published, as 1x1 convolutions
# (maps of H x W x C to C channels: a (N H W x C) by (C x C) product) through the run's own
# convolution library, oneDNN's kernels on a CPU: 17.2 GFLOP a call each, large enough that the
# time is arithmetic, not dispatch. The fastest of the three is the ceiling: which shape a
# library runs best differs by CPU, and the machines here are noisy. (XLA's own CPU matmul,
# `jnp.dot`, was slower than oneDNN's convolutions on the Skylake-SP, which put airbench94's
# step at 124% of it.)
CEILING_SHAPES = ((16, 32, 32, 256), (1, 64, 64, 1024), (4, 16, 16, 2048))


def device_ceiling(dtype: str, conv_implementation: str, num_calls: int = 5) -> dict:
  """The device's FLOP/s ceiling for `dtype`: {"gflop_per_second", "source"}. Published for
  known GPU and TPU kinds; elsewhere (every CPU) measured: the fastest of `CEILING_SHAPES`'
  matrix products in that dtype through the run's convolution library (a 1x1 convolution by
  `conv_implementation`), each the fastest of `num_calls` calls after a warm-up, timed as the
  steps are."""
  kind = jax.devices()[0].device_kind
  for (name, peak_dtype), tflops in PUBLISHED_PEAK_TFLOPS.items():
    if name in kind and peak_dtype == dtype:
      arithmetic = "TF32 tensor-core" if jax.default_backend() == "gpu" and dtype == "float32" \
          else dtype
      return {"gflop_per_second": tflops * 1e3,
              "source": f"published dense {arithmetic} peak of {kind} ({tflops:g} TFLOP/s)"}
  convolve = conv.CONV_IMPLEMENTATIONS[conv_implementation]
  best = None
  for shape in CEILING_SHAPES:
    channels = shape[-1]
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    kernel = jax.random.normal(jax.random.key(1), (1, 1, channels, channels),
                               jnp.float32).astype(dtype)
    product = jax.jit(lambda x, k: convolve(x, k, 1, 0)).lower(x, kernel).compile()
    # The fastest call, not the median: a ceiling is the most the library reaches, and a
    # shared host only ever slows a call down (medians moved by 10-30% within an hour there).
    seconds = min(_time_calls(lambda: product(x, kernel), num_calls + 1)[1:])
    rows = math.prod(shape[:-1])
    rate = 2 * rows * channels**2 / seconds / 1e9
    if best is None or rate > best[0]:
      best = (rate, f"({rows} x {channels}) by ({channels} x {channels})")
  return {"gflop_per_second": round(best[0], 1),
          "source": f"measured: the fastest of {len(CEILING_SHAPES)} {dtype} matrix products, "
                    f"{best[1]}, as 1x1 convolutions by {conv_implementation} on "
                    f"{jax.default_backend()}, fastest of {num_calls} calls each"}


def _runner(programs, state):
  """(run, holder): run(first, end) calls the trainer's training program on steps first to
  end - 1 of epoch 0, carrying the (donated) state from call to call in holder["state"]."""
  holder = {"state": state}

  def run(first: int, end: int):
    holder["state"], metrics = programs.run_steps(holder["state"], 0, first, end)
    return metrics

  return run, holder


def benchmark_one(config, batch_size: int, dtype: str, num_examples: int,
                  num_classes: int) -> dict:
  """Times the training program the trainer runs (`programs.Programs.train_steps`) for one
  batch size and dtype: calls of one step each (the step time) and calls of a whole epoch."""
  config = config.copy_and_resolve_references()
  dtype = conv.choose_dtype(dtype).dtype
  config.batch_size, config.model.dtype, config.replicas.count = batch_size, dtype, 1
  choice = conv.choose_conv_implementation(config.model.conv_implementation, dtype)
  print(choice.describe(), file=sys.stderr)
  programs, state, num_steps = synthetic_run(config, num_examples, num_classes,
                                             choice.implementation)
  full_batches = num_examples // batch_size  # one-step calls run full batches only
  run, holder = _runner(programs, state)
  calls = itertools.count()

  def run_step():
    step = next(calls) % full_batches
    return run(step, step + 1)

  bench = config.benchmark
  _time_calls(run_step, bench.warmup_steps)
  step_times = _time_calls(run_step, bench.num_steps)
  _time_calls(lambda: run(0, num_steps), 1)  # warm-up
  clock_before = onednn.call_clock()
  epoch_times = _time_calls(lambda: run(0, num_steps), bench.num_epochs)
  clock_after = onednn.call_clock()
  median = statistics.median(step_times)
  # A step inside a call of a whole epoch, as a run's calls mostly are: without the fixed cost
  # of a call, which a one-step call carries whole.
  epoch_step = statistics.median(epoch_times) / num_steps
  flops = _step_flops(config, holder["state"], programs.data, num_steps,
                      choice.implementation)
  achieved = None if flops is None else flops / epoch_step / 1e9
  ceiling = device_ceiling(dtype, choice.implementation)
  return {
      "batch_size": batch_size,
      "dtype": dtype,
      "conv_implementation": choice.implementation,
      "conv_reason": choice.reason,
      "program": "programs.Programs.train_steps (the trainer's)",
      # The run's training and evaluation programs, as its "compile time" line counts them.
      "compile_seconds": round(programs.compile_seconds, 3),
      # Calls of one step each: the step and the call's fixed cost.
      "step_ms": {"median": round(1e3 * median, 2), "min": round(1e3 * min(step_times), 2),
                  "max": round(1e3 * max(step_times), 2), "count": len(step_times)},
      # A step within a call of the whole epoch (its median / its steps), and its throughput.
      "epoch_step_ms": round(1e3 * epoch_step, 2),
      "images_per_second": round(batch_size / epoch_step, 1),
      # XLA's count of one step's math (on the im2col program when convolutions run in oneDNN);
      # achieved and utilisation per step within the epoch's call.
      "step_gflop": None if flops is None else round(flops / 1e9, 3),
      "achieved_gflop_per_second": None if achieved is None else round(achieved, 1),
      "ceiling": ceiling,
      "utilisation": None if achieved is None else round(
          achieved / ceiling["gflop_per_second"], 3),
      # Where a step within the epoch's calls goes: inside the oneDNN convolution calls, and
      # everything else (BatchNorm, activations, pools, augmentation, loss, optimiser, the
      # loop), of which oneDNN's BatchNorm calls. Means over the timed epochs; None where the
      # convolutions are not oneDNN's.
      **_convolution_split(clock_before, clock_after, sum(epoch_times),
                           len(epoch_times) * num_steps, choice.implementation),
      "epoch_examples": num_examples,
      "epoch_steps": num_steps,
      "epoch_seconds": {"median": round(statistics.median(epoch_times), 3),
                        "min": round(min(epoch_times), 3), "count": len(epoch_times)},
  }


def _convolution_split(before: onednn.CallClock | None, after: onednn.CallClock | None,
                       seconds: float, steps: int, conv_implementation: str) -> dict:
  """Where one of `steps` steps that took `seconds` goes, from the oneDNN extension's clocks
  read before and after them: {"convolution_ms", "non_convolution_ms" (the step less its
  convolutions), "non_convolution_share", "onednn_batch_norm_ms" (the part of the
  non-convolution time in oneDNN's batch normalisation)}; None where the convolutions are not
  oneDNN's."""
  if conv_implementation != "onednn" or before is None or after is None:
    return dict.fromkeys(("convolution_ms", "non_convolution_ms", "non_convolution_share",
                          "onednn_batch_norm_ms"))
  convolution = (after.convolution_seconds - before.convolution_seconds) / steps
  batch_norm = (after.batch_norm_seconds - before.batch_norm_seconds) / steps
  step = seconds / steps
  return {"convolution_ms": round(1e3 * convolution, 2),
          "non_convolution_ms": round(1e3 * (step - convolution), 2),
          "non_convolution_share": round(1 - convolution / step, 3),
          "onednn_batch_norm_ms": round(1e3 * batch_norm, 2)}


def _step_flops(config, state, data, num_steps: int, conv_implementation: str) -> float | None:
  """FLOPs of one training step, from XLA's cost analysis of the pure step. The training
  program's own count is of no use: XLA counts its loop's body once whatever the trip count,
  and nothing inside custom calls, so with oneDNN convolutions the step is counted on the
  im2col path (the same convolutions as matrix products). With data selection, XLA counts the
  proxy's conditional update as if it ran every step."""
  budget = StepBudget(num_steps, config.num_epochs, config.freeze.late_epochs)
  if conv_implementation == "onednn":
    counted = models.create_model(config.model, len(config.data.classes), "im2col")
    state = state.replace(apply_fn=counted.apply)
    if state.proxy is not None:  # the data selection's proxy: its convolutions counted too
      state = state.replace(proxy=state.proxy.replace(
          apply_fn=prepare.create_proxy(config, counted, budget).model.apply))
  batch_size = config.batch_size
  batch = input_pipeline.normalize(data.train_images[:batch_size], data.mean, data.std)
  step = programs_lib.jitted_train_step(prepare.program_options(config, budget), None)
  return _flops(programs_lib.compile_for(step, None, state, batch,
                                         data.train_labels[:batch_size]))


def benchmark_replicas(config, num_replicas: int, num_examples: int, num_classes: int) -> dict:
  """Times one epoch of `num_replicas` models trained together (the trainer's vmapped
  training program; one model: the plain program) on synthetic data. Throughput counts every
  replica's images."""
  config = config.copy_and_resolve_references()
  config.replicas.count = num_replicas
  config.replicas.seeds = config.replicas.learning_rates = config.replicas.momenta = ()
  choice = conv.choose_conv_implementation(config.model.conv_implementation, config.model.dtype)
  programs, state, num_steps = synthetic_run(config, num_examples, num_classes,
                                             choice.implementation)
  run, _ = _runner(programs, state)
  _time_calls(lambda: run(0, num_steps), 1)  # warm-up
  epoch_times = _time_calls(lambda: run(0, num_steps), config.benchmark.num_epochs)
  median = statistics.median(epoch_times)
  return {
      "num_replicas": num_replicas,
      "batch_size": config.batch_size,
      "compile_seconds": round(programs.compile_seconds, 3),
      "epoch_examples": num_examples,
      "epoch_seconds": {"median": round(median, 3), "min": round(min(epoch_times), 3),
                        "max": round(max(epoch_times), 3), "count": len(epoch_times)},
      "images_per_second": round(num_replicas * num_examples / median, 1),
  }


def run_aot(config) -> dict:
  """`benchmark.aot_topology`: the run's programs compiled for that TPU topology and lowered
  for each of `benchmark.aot_gpu_platforms`, for every dtype of `benchmark.dtypes` (default:
  the config's); returns the report (see `aot`)."""
  from convnet_jax.tools import aot  # imported here: only this mode needs the TPU topology code

  bench = config.benchmark
  aot.tpu_mesh(bench.aot_topology)  # no libtpu, or an unknown name: one line, before any work
  report = {"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
            "model": config.model.name, "tpu": [], "gpu_lowering": []}
  for dtype in bench.dtypes or (config.model.dtype,):
    dtype_config = config.copy_and_resolve_references()
    dtype_config.model.dtype = dtype
    report["tpu"].append(aot.compile_for_tpu(dtype_config, bench.aot_topology))
    print(json.dumps(report["tpu"][-1]), file=sys.stderr)
  for platform in bench.aot_gpu_platforms:
    report["gpu_lowering"].append(aot.lower_for_gpu(config, platform))
  return report


def run_benchmark(config) -> dict:
  """Benchmarks every (batch size, dtype) pair the config lists, and every replica count of
  `benchmark.num_replicas`. With `benchmark.aot_topology`, compiles for it instead (`run_aot`).

  Args:
    config: a training config; its `benchmark` group says what to time.

  Returns:
    The report: backend, devices, versions, the allocator, and a result per (batch size, dtype)
    with the step and epoch times, GFLOP/s and utilisation (see the module docstring).
  """
  validation.validate_config(config)
  bench = config.benchmark
  if bench.aot_topology:
    return run_aot(config)
  config, _ = prepare.resolve_dtype(config)
  # Compile times are then those of a warm start where the cache holds the programs.
  cache = compile_cache.enable(config.operations.compilation_cache)
  devices = jax.devices()
  report = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "model": config.model.name,
      "data": "synthetic uint8 images of CIFAR shape",
      "compilation_cache": str(cache.folder) if cache.folder else None,
      # What the C allocator does with each call's freed temporaries (`runs.allocator`).
      "malloc": allocator.describe(),
      "results": [],
  }
  num_classes = len(config.data.classes)
  for batch_size in bench.batch_sizes or (config.batch_size,):
    for dtype in bench.dtypes or (config.model.dtype,):
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
  if FLAGS.workdir:  # before minutes of timing whose report could not be kept
    check_writable_folder(FLAGS.workdir, "--workdir")
  report = run_benchmark(FLAGS.config)
  text = json.dumps(report, indent=2)
  print(text)
  if FLAGS.workdir:
    path = Path(FLAGS.workdir) / "benchmark.json"
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text + "\n")
    except OSError as error:  # a disk that filled meanwhile: the report is on stdout above
      raise WriteFailed(f"{path} (the report is printed above)", error) from None


if __name__ == "__main__":
  define_flags()
  cli.run(main)
