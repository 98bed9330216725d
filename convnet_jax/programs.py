"""The compiled programs of a run, built by one set of functions for the trainer (`Programs`),
the benchmark (which times `Programs.train_steps` itself) and the ahead-of-time compile
(`tools.aot`, which traces the same jitted functions for a TPU topology or a GPU):

* `jitted_train_steps`: `steps.train_steps` (any stretch of steps of an epoch), vmapped over
  replicas when there are several, with the batch split over the mesh and the state donated;
* `jitted_evaluate`: `steps.evaluate` of the test set, optionally with test-time augmentation;
* `jitted_train_step`: one `steps.train_step`, for the compiler's cost and memory figures.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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


# The data set on the device(s): see `steps.DeviceData`.
DeviceData = steps_lib.DeviceData


@dataclasses.dataclass(frozen=True)
class ProgramOptions:
  """What a run's programs compute besides the model (static; `runs.prepare.program_options`
  builds it from a config): how an epoch is trained (`steps.EpochOptions`, its batches split
  over the mesh when the programs are built), the evaluation's batch size, and whether the
  state stacks replicas trained together (`vmap`); `first_evaluation`: the test-time
  augmentation of the run's first evaluation, whose program is compiled with the training
  program (so that a bad evaluation batch fails before training); `eval_population`: the
  evaluation normalises with precise BatchNorm statistics from the training images
  (`steps.population_statistics`), None: with each test batch's own."""
  epoch: steps_lib.EpochOptions
  eval_batch_size: int
  replicated: bool = False
  first_evaluation: str = "none"
  eval_population: steps_lib.PopulationOptions | None = None


def put_data(data: input_pipeline.Dataset, mesh) -> DeviceData:
  """The whole data set on the device(s) once, mirrored on every device of a mesh."""
  return DeviceData(*data_parallel.put_mirrored(
      (data.train_images, data.train_labels, data.test_images, data.test_labels, data.mean,
       data.std), mesh))


def jitted_train_steps(options: ProgramOptions, mesh):
  """`steps.train_steps` as `options` say, jitted: (state, data, data_key, epoch, first_step,
  end_step) -> (state, per-step metrics), the state donated.

  `options.replicated`: the state and data key have a leading replica axis and one program
  trains all replicas (`vmap`) on the same data, each in its own order. `mesh`: batches are
  split over the mesh's devices and the outputs (state, metrics) are mirrored on all of them."""
  epoch = dataclasses.replace(options.epoch, batch_sharding=data_parallel.split_sharding(mesh))
  run = functools.partial(steps_lib.train_steps, options=epoch)
  if options.replicated:
    run = jax.vmap(run, in_axes=(0, None, 0, None, None, None))
  # Donating the state lets XLA update parameters and momenta in place.
  return jax.jit(run, donate_argnums=0, out_shardings=data_parallel.mirrored_sharding(mesh))


def jitted_evaluate(options: ProgramOptions, apply_fn: Callable, mesh,
                    test_time_augmentation: str = "none"):
  """`steps.evaluate` as `options` say, jitted: (params, data) -> (predictions, totals)
  (`options.replicated`, `mesh`: as `jitted_train_steps`)."""
  run = functools.partial(steps_lib.evaluate, apply_fn=apply_fn,
                          batch_size=options.eval_batch_size,
                          batch_sharding=data_parallel.split_sharding(mesh),
                          test_time_augmentation=test_time_augmentation,
                          population=options.eval_population)
  if options.replicated:
    run = jax.vmap(run, in_axes=(0, None))
  return jax.jit(run, out_shardings=data_parallel.mirrored_sharding(mesh))


def jitted_train_step(options: ProgramOptions, mesh):
  """One `steps.train_step` as `options` say, jitted: (state, batch, labels) -> (state,
  metrics)."""
  return jax.jit(functools.partial(steps_lib.train_step, options=options.epoch.step),
                 donate_argnums=0, out_shardings=data_parallel.mirrored_sharding(mesh))


def compile_for(jitted, mesh, *arguments):
  """`jitted` compiled ahead of time for these (concrete or abstract) arguments, traced for
  `mesh` (from which the oneDNN convolutions learn how to split a batch)."""
  with data_parallel.tracing_mesh(mesh):
    lowered = jitted.lower(*arguments)
  return lowered.compile(compiler_options=compiler_options())


class Programs:
  """The run's compiled programs, each compiled once when first needed (the training steps and
  the first evaluation's at once).

  Args:
    options: what the programs compute (`ProgramOptions`).
    model: the Flax module.
    state: the train state (its shapes and shardings are what the programs are compiled for).
    data: the data set on the device (`DeviceData`).
    data_key: the key of the data order.
    mesh: the data-parallel mesh (None: one device).
    store: where compiled programs are kept between runs (`compile_cache.ProgramStore`; each is
      loaded from it when it holds the program and stored in it when not), or None.

  Attributes:
    train_steps: the program (state, data, data_key, epoch, first_step, end_step) -> (state,
      per-step metrics); `run_steps` calls it on the run's data.
    evaluation_program(level): the program (params, data) -> (predictions, totals), `level` a
      test-time augmentation; `evaluate` calls it on the run's test set.
    data, data_key: the run's data on the device and its data-order key.
    compile_seconds: the compile times added up.
  """

  def __init__(self, options: ProgramOptions, model, state, data: DeviceData,
               data_key: jax.Array, mesh, store=None):
    self._options, self._model, self._mesh, self._store = options, model, mesh, store
    self.data, self.data_key = data, data_key
    self.num_train = int(data.train_labels.shape[0])
    self.num_test = int(data.test_labels.shape[0])
    # Shapes only: the state's arrays are donated to the first call, and a program compiled
    # later (test-time augmentation) must not touch them.
    self._arguments = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        (state, data, data_key))
    self._compiled = {}
    self.compile_seconds = 0.0
    self.train_steps
    self.evaluation_program(options.first_evaluation)
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
    arguments = (state, data, data_key, step, step, step)
    outputs = (state, dict.fromkeys(steps_lib.STEP_METRICS, step))
    return self._get("train", arguments, outputs,
                     lambda: jitted_train_steps(self._options, self._mesh))

  def evaluation_program(self, test_time_augmentation: str = "none") -> Callable:
    """The program that evaluates the test set, with `test_time_augmentation` also with its
    views (`steps.evaluate`)."""
    state, data, _ = self._arguments
    arguments = (state.params, data)
    outputs = (data.test_labels,
               dict.fromkeys(steps_lib.evaluation_metrics(test_time_augmentation), data.mean))
    return self._get(f"evaluate-{test_time_augmentation}", arguments, outputs,
                     lambda: jitted_evaluate(self._options, self._model.apply, self._mesh,
                                             test_time_augmentation))

  def run_steps(self, state, epoch: int, first_step: int, end_step: int):
    """Steps `first_step` to `end_step` - 1 of epoch `epoch` on the run's data: (state,
    per-step metrics)."""
    return self.train_steps(state, self.data, self.data_key, np.int32(epoch),
                            np.int32(first_step), np.int32(end_step))

  def evaluate(self, params, test_time_augmentation: str = "none"):
    """The run's test set evaluated with `params`: (predictions, summed metrics)."""
    return self.evaluation_program(test_time_augmentation)(params, self.data)
