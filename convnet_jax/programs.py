"""The compiled programs of a run, built by one set of functions for the trainer (`Programs`),
the benchmark (which times `Programs.train_steps` itself) and the ahead-of-time compile
(`tools.aot`, which traces the same jitted functions for a TPU topology or a GPU):

* `jitted_train_steps`: `steps.train_steps` (any stretch of steps of an epoch), vmapped over
  replicas when there are several, with the batch split over the mesh and the state donated;
* `jitted_evaluate`: `steps.evaluate` of the test set, optionally with test-time augmentation;
* `jitted_train_step`: one `steps.train_step`, for the compiler's cost and memory figures.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from convnet_jax import steps as steps_lib
from convnet_jax.data import input_pipeline
from convnet_jax.parallel import data_parallel


def compiler_options(run_once: bool = False) -> dict[str, Any]:
  """XLA options for the training programs on the current backend; `run_once` for a program
  that runs a single time (initialisation), where compile time is all that counts."""
  if jax.default_backend() == "cpu":
    # LLVM optimisation level 1 instead of 2: compiles the im2col epoch program ~3x faster, and
    # the step time measured the same, as its time goes to library calls, not generated code.
    # Level 0 for the initialisation: 0.6 s to compile instead of 1.2 s, and it runs once.
    return {"xla_backend_optimization_level": 0 if run_once else 1}
  return {}


class DeviceData(NamedTuple):
  """The data set on the device(s), as uint8 images and int labels, with the channel
  statistics that normalise it."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array


def put_data(data: input_pipeline.Dataset, mesh) -> DeviceData:
  """The whole data set on the device(s) once, mirrored on every device of a mesh."""
  return DeviceData(*data_parallel.put_mirrored(
      (data.train_images, data.train_labels, data.test_images, data.test_labels, data.mean,
       data.std), mesh))


def jitted_train_steps(config, mesh, budget: steps_lib.StepBudget, replicated: bool = False):
  """`steps.train_steps` for `config`, jitted: (state, images, labels, data_key, epoch,
  first_step, end_step, mean, std) -> (state, per-step metrics), the state donated.

  `replicated`: the state and data key have a leading replica axis and one program trains all
  replicas (`vmap`) on the same data, each in its own order. `mesh`: batches are split over the
  mesh's devices and the outputs (state, metrics) are mirrored on all of them."""
  run = functools.partial(
      steps_lib.train_steps, batch_size=config.batch_size,
      drop_last_batch=config.drop_last_batch, augment=steps_lib.augment_options(config),
      batch_sharding=data_parallel.split_sharding(mesh),
      options=steps_lib.step_options(config, budget))
  if replicated:
    run = jax.vmap(run, in_axes=(0, None, None, 0, None, None, None, None, None))
  # Donating the state lets XLA update parameters and momenta in place.
  return jax.jit(run, donate_argnums=0, out_shardings=data_parallel.mirrored_sharding(mesh))


def jitted_evaluate(config, apply_fn: Callable, mesh, test_time_augmentation: str = "none",
                    replicated: bool = False):
  """`steps.evaluate` for `config`, jitted: (params, images, labels, mean, std) ->
  (predictions, totals) (`replicated`, `mesh`: as `jitted_train_steps`)."""
  run = functools.partial(steps_lib.evaluate, apply_fn=apply_fn,
                          batch_size=config.eval_batch_size,
                          batch_sharding=data_parallel.split_sharding(mesh),
                          test_time_augmentation=test_time_augmentation)
  if replicated:
    run = jax.vmap(run, in_axes=(0, None, None, None, None))
  return jax.jit(run, out_shardings=data_parallel.mirrored_sharding(mesh))


def jitted_train_step(config, mesh, budget: steps_lib.StepBudget):
  """One `steps.train_step` for `config`, jitted: (state, batch, labels) -> (state, metrics)."""
  return jax.jit(functools.partial(steps_lib.train_step,
                                   options=steps_lib.step_options(config, budget)),
                 donate_argnums=0, out_shardings=data_parallel.mirrored_sharding(mesh))


def compile_for(jitted, mesh, *arguments):
  """`jitted` compiled ahead of time for these (concrete or abstract) arguments, traced for
  `mesh` (from which the oneDNN convolutions learn how to split a batch)."""
  with data_parallel.tracing_mesh(mesh):
    lowered = jitted.lower(*arguments)
  return lowered.compile(compiler_options=compiler_options())


class Programs:
  """The run's compiled programs, each compiled once when first needed (the training steps and
  the plain evaluation at once): `train_steps` -> (state, images, labels, data_key, epoch,
  first_step, end_step, mean, std) -> (state, per-step metrics); `evaluation_program(level)` ->
  (params, test images, labels, mean, std) -> (predictions, totals), `level` a test-time
  augmentation. `compile_seconds` adds up the compile times. With a `store`, each is loaded
  from it when it holds the program and stored in it when not (`compile_cache.ProgramStore`)."""

  def __init__(self, config, model, state, data: DeviceData, data_key: jax.Array, mesh,
               budget: steps_lib.StepBudget, store=None):
    self._config, self._model, self._mesh, self._store = config, model, mesh, store
    # Shapes only: the state's arrays are donated to the first call, and a program compiled
    # later (test-time augmentation) must not touch them.
    self._arguments = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        (state, data, data_key))
    self._budget = budget
    self._compiled = {}
    self.compile_seconds = 0.0
    self.train_steps
    self.evaluation_program("none")
    logging.info("compiled the training and evaluation programs in %.2f s",
                 self.compile_seconds)

  def _get(self, key: str, arguments: tuple, outputs, build: Callable):
    """The program `key`, compiled from `build()` (a jitted function) the first time only."""
    if key not in self._compiled:
      start = time.perf_counter()
      compile_fn = lambda: compile_for(build(), self._mesh, *arguments)
      self._compiled[key] = (self._store.load_or_compile(key, arguments, outputs, compile_fn)
                             if self._store else compile_fn())
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]

  @property
  def train_steps(self) -> Callable:
    """The program that runs steps first_step to end_step - 1 of an epoch."""
    state, data, data_key = self._arguments
    step = jax.ShapeDtypeStruct((), jnp.int32)
    arguments = (state, data.train_images, data.train_labels, data_key, step, step, step,
                 data.mean, data.std)
    outputs = (state, dict.fromkeys(steps_lib.STEP_METRICS, step))
    return self._get("train", arguments, outputs, lambda: jitted_train_steps(
        self._config, self._mesh, self._budget, self._config.num_replicas > 1))

  def evaluation_program(self, test_time_augmentation: str = "none") -> Callable:
    """The program that evaluates the test set, with `test_time_augmentation`."""
    state, data, _ = self._arguments
    arguments = (state.params, data.test_images, data.test_labels, data.mean, data.std)
    outputs = (data.test_labels, dict.fromkeys(steps_lib.STEP_METRICS, data.mean))
    return self._get(f"evaluate-{test_time_augmentation}", arguments, outputs,
                     lambda: jitted_evaluate(self._config, self._model.apply, self._mesh,
                                             test_time_augmentation,
                                             self._config.num_replicas > 1))
