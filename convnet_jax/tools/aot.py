"""The run's programs compiled for accelerators that are not here: a TPU topology, through
libtpu's compile-only devices, and GPUs, by lowering for `cuda` or `rocm`.

What is compiled is what `train.train_and_evaluate` compiles: the training program
(`steps.train_steps`, any stretch of an epoch) and the evaluation over the test set, with the
convolution path `auto` resolves to on that platform (XLA's native convolution), for the data
shapes the config loads, and, on a TPU topology, with each batch split over all of its chips as
`parallel` splits it. No data is read and nothing runs: the shapes come from the config.
A single training step on one global batch is compiled beside them, for the per-step figures:
XLA's cost analysis of a program with a loop counts the loop body once, whatever the trip count.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from convnet_jax import models
from convnet_jax import optim
from convnet_jax import programs as programs_lib
from convnet_jax import steps as steps_lib
from convnet_jax.data import input_pipeline
from convnet_jax.ops import conv
from convnet_jax.parallel import data_parallel
from convnet_jax.runs import prepare
from convnet_jax.errors import one_line
from convnet_jax.errors import UserError

# CIFAR-10 holds this many training and test images of each class.
TRAIN_PER_CLASS, TEST_PER_CLASS = 5_000, 1_000
# Custom-call targets that only a CPU runs: the oneDNN extension's, and XLA's CPU libraries.
CPU_ONLY_TARGET = re.compile(r"onednn|lapack|ducc|xla_cpu|cpu_", re.IGNORECASE)
INSTALL_TPU = 'pip install -e ".[tpu]"'


def tpu_mesh(topology: str) -> Mesh:
  """A one-axis data mesh over the compile-only devices of a TPU topology named as libtpu
  names them ("v5e:2x2", "v4:2x2x1", ...). `UserError` without libtpu or for a name it does not
  know."""
  key = f"benchmark.aot_topology={topology!r}"
  if not data_parallel.tpu_chips_here():
    # libtpu asks these of the host it runs on and warns when they are unset; compiling for a
    # topology uses neither, so plain values keep stderr quiet off a TPU VM.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu's lock file keeps two processes off the same chips; with none here, it would only
    # keep two compiles (a test run and its subprocess) from running side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    description = topologies.get_topology_desc(topology, platform="tpu")
  except Exception as error:  # jaxlib raises its runtime errors for both
    reason = " ".join(str(error).split())
    # Without libtpu, jaxlib says "JAX TPU support not installed".
    if "support not installed" in reason or isinstance(error, ImportError):
      raise UserError(f"{key}: compiling for a TPU needs libtpu, which is not installed; "
                      f"{INSTALL_TPU}") from None
    raise UserError(f"{key}: libtpu could not make this topology ({reason[:300]})") from None
  return Mesh(np.asarray(description.devices), (data_parallel.DATA_AXIS,))


def data_counts(config) -> tuple[int, int]:
  """The training and test set sizes the config loads (CIFAR-10's classes, the caps)."""
  num_train = TRAIN_PER_CLASS * len(config.data.classes)
  num_test = TEST_PER_CLASS * len(config.data.classes)
  if config.data.max_train_examples:
    num_train = min(num_train, config.data.max_train_examples)
  if config.data.max_test_examples:
    num_test = min(num_test, config.data.max_test_examples)
  return num_train, num_test


def _abstract(tree, sharding):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def traced_programs(config, mesh: Mesh | None, backend: str) -> dict[str, Any]:
  """{"train_steps", "evaluate", "train_step"}: the run's programs traced (`jax.stages.Traced`)
  on abstract arguments for `backend`'s convolution path, split over `mesh` (None: one
  device). Raises `UserError` when the configured convolution path cannot run there."""
  num_devices = data_parallel.mesh_size(mesh)
  config, _ = prepare.resolve_dtype(config, backend)
  try:
    choice = conv.choose_conv_implementation(config.model.conv_implementation, config.model.dtype,
                                             num_devices, backend=backend)
  except conv.ConvUnavailable as error:
    raise error.naming_the_key(config.model.conv_implementation) from None
  num_classes = len(config.data.classes)
  model = models.create_model(config.model, num_classes, choice.implementation)
  num_train, num_test = data_counts(config)
  budget = prepare.step_budget(config, num_train)
  options = prepare.program_options(config, budget)
  tx = optim.create_optimizer(prepare.optimizer_options(config), budget)
  state = jax.eval_shape(lambda key: steps_lib.create_train_state(
      model, key, tx, with_lookahead=config.lookahead.every_steps > 0,
      proxy=prepare.create_proxy(config, model, budget)), jax.random.key(0))
  mirrored, split = data_parallel.mirrored_sharding(mesh), data_parallel.split_sharding(mesh)
  state = _abstract(state, mirrored)
  images = lambda count: jax.ShapeDtypeStruct((count,) + input_pipeline.IMAGE_SHAPE, jnp.uint8,
                                              sharding=mirrored)
  labels = lambda count: jax.ShapeDtypeStruct((count,), jnp.int32, sharding=mirrored)
  channel = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=mirrored)
  data = steps_lib.DeviceData(images(num_train), labels(num_train), images(num_test),
                              labels(num_test), channel, channel)
  data_key = _abstract(jax.eval_shape(lambda: jax.random.key(0)), mirrored)
  step_number = jax.ShapeDtypeStruct((), jnp.int32, sharding=mirrored)

  batch = jax.ShapeDtypeStruct((config.batch_size,) + input_pipeline.IMAGE_SHAPE, jnp.float32,
                               sharding=split)
  batch_labels = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=split)
  return {
      "train_steps": programs_lib.jitted_train_steps(options, mesh).trace(
          state, data, data_key, step_number, step_number, step_number),
      "evaluate": programs_lib.jitted_evaluate(options, model.apply, mesh).trace(
          state.params, data),
      "train_step": programs_lib.jitted_train_step(options, mesh).trace(
          state, batch, batch_labels),
      "conv_implementation": choice.implementation,
      "steps_per_epoch": budget.steps_per_epoch,
  }


def _memory(compiled) -> dict[str, int] | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return {name: int(getattr(analysis, f"{name}_size_in_bytes"))
          for name in ("argument", "output", "temp", "generated_code", "alias")}


def _cost(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


PROGRAMS = ("train_steps", "evaluate", "train_step")


def compile_for_tpu(config, topology: str, programs=PROGRAMS) -> dict[str, Any]:
  """Compiles the run's `programs` (all three by default) for the TPU `topology`, data
  parallel over all its chips. The report: the target, the convolution path, per program
  whether it compiled (or the compiler's error in one line), its memory per chip in bytes and
  whether it sums across chips (all-reduce), and, with "train_step", the compiler's estimates
  for one training step: FLOPs per chip and, where XLA gives them, seconds and images/s."""
  mesh = tpu_mesh(topology)
  config, _ = prepare.resolve_dtype(config, "tpu")
  traced = traced_programs(config, mesh, backend="tpu")
  devices = mesh.devices.ravel()
  report: dict[str, Any] = {
      "target": {"platform": "tpu", "topology": topology, "chips": int(mesh.size),
                 "device_kind": devices[0].device_kind},
      "model": config.model.name, "dtype": config.model.dtype, "batch_size": config.batch_size,
      "conv_implementation": traced["conv_implementation"],
      "steps_per_epoch": traced["steps_per_epoch"], "programs": {},
  }
  compiled_step = None
  for name in programs:
    try:
      compiled = traced[name].lower().compile()
    except Exception as error:  # the compiler's own error, reported, not raised
      report["programs"][name] = {"compiled": False,
                                  "error": f"{type(error).__name__}: {one_line(error, 500)}"}
      continue
    report["programs"][name] = {"compiled": True, "memory_per_chip_bytes": _memory(compiled),
                                "all_reduce": "all-reduce" in compiled.as_text()}
    if name == "train_step":
      compiled_step = compiled
  if compiled_step is not None:
    cost = _cost(compiled_step)
    seconds = cost.get("optimal_seconds")
    valid = seconds is not None and seconds > 0
    report["estimates"] = {
        "note": "the compiler's estimates for one training step of the global batch, not "
                "measurements",
        "flops_per_chip_per_step": cost.get("flops"),
        "bytes_accessed_per_chip_per_step": cost.get("bytes accessed"),
        # libtpu gives a negative optimal_seconds for some programs (ResNet-18's step): no
        # estimate, and the raw value beside it.
        "seconds_per_step": seconds if valid else None,
        "images_per_second": config.batch_size / seconds if valid else None,
    }
    if not valid:
      report["estimates"]["compiler_optimal_seconds_invalid"] = seconds
  return report


def custom_call_targets(module_text: str) -> set[str]:
  """The custom-call targets a StableHLO module calls."""
  return set(re.findall(r'custom_call @([\w.$-]+)', module_text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', module_text))


def lower_for_gpu(config, platform: str = "cuda") -> dict[str, Any]:
  """Lowers the run's programs for `platform` ("cuda" or "rocm") with no GPU present, on one
  device; per program the custom-call targets of the module and whether any is CPU-only."""
  traced = traced_programs(config, None, backend="gpu")
  report: dict[str, Any] = {"target": {"platform": platform},
                            "conv_implementation": traced["conv_implementation"],
                            "programs": {}}
  for name in ("train_steps", "evaluate"):
    try:
      text = traced[name].lower(lowering_platforms=(platform,)).as_text()
    except Exception as error:
      report["programs"][name] = {"lowered": False,
                                  "error": f"{type(error).__name__}: {one_line(error, 500)}"}
      continue
    targets = sorted(custom_call_targets(text))
    report["programs"][name] = {
        "lowered": True, "custom_calls": targets,
        "cpu_only_custom_calls": [t for t in targets if CPU_ONLY_TARGET.search(t)]}
  return report
