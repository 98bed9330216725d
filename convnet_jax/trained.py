"""A trained model back from its workdir: `load` it, then evaluate it or classify images.

    import convnet_jax
    trained = convnet_jax.load("runs/seed")        # the newest intact checkpoint
    trained.evaluate()["test_acc"]                  # the run's own test set, as it was evaluated
    trained.predict(images)                         # uint8 NHWC images -> class probabilities

BatchNorm here normalises with the statistics of the batch it is given (the specification's
choice; no running averages), unless the run evaluated with precise statistics
(`eval.batch_norm_statistics`): the run's own evaluation, in batches of `eval.batch_size`, is
reproduced that way by default. A batch of one image, or of a few of one class, is normalised
by its own statistics, so its predictions are not the model's. For those,
`batch_norm_statistics="population"` normalises every image with statistics computed once from
the training images (precise BatchNorm: each BatchNorm input's mean and variance over up to
`steps.POPULATION_EXAMPLES` training images, in training-sized batches normalised as in
training; "augmented": those images augmented as in training), stored in the workdir beside
the checkpoints and never used in training.

`python -m convnet_jax.evaluate` and `python -m convnet_jax.predict` are the command lines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import ml_collections
import numpy as np
from absl import logging

from convnet_jax import models
from convnet_jax import programs as programs_lib
from convnet_jax import steps as steps_lib
from convnet_jax.data import input_pipeline
from convnet_jax.data import tta
from convnet_jax.errors import UserError
from convnet_jax.runs import checkpoints
from convnet_jax.runs import prepare
from convnet_jax.runs import validation
from convnet_jax.runs import workdir as workdir_lib

# `batch_norm_statistics`: normalise each batch by its own statistics (the specification's, as
# in training) or by precise BatchNorm statistics of the training images, as they are
# ("population") or augmented as in training ("augmented"): `steps.population_statistics`.
BATCH_NORM_STATISTICS = steps_lib.BATCH_NORM_STATISTICS
# With "batch" statistics, prediction refuses fewer images than this: in smaller batches the
# seed net and the speedrun lose accuracy measurably (docs/operations.md, "Using a trained
# model": the table by batch size).
MIN_IMAGES_FOR_BATCH_STATISTICS = 100


class NotARun(UserError):
  """The folder holds no run to load: no config.json, or no intact checkpoint."""


def _check_statistics(batch_norm_statistics: str) -> None:
  if batch_norm_statistics not in BATCH_NORM_STATISTICS:
    raise UserError(f"batch_norm_statistics: {batch_norm_statistics!r}, expected one of "
                    f"{', '.join(BATCH_NORM_STATISTICS)}")


def population_statistics(model: nn.Module, params, images: np.ndarray, mean: np.ndarray,
                          std: np.ndarray, batch_size: int,
                          augment: steps_lib.AugmentOptions | None = None) -> dict:
  """Precise BatchNorm's statistics (`steps.population_statistics`, as a run's evaluation
  computes them): each BatchNorm's input mean and (biased) variance over the first full batches
  of `batch_size` of uint8 `images` (up to `steps.POPULATION_EXAMPLES` of them, at least one
  batch), augmented as `augment` says (None: as they are), the network normalising each batch
  as in training.

  Returns:
    A `models.POPULATION` collection: per BatchNorm, {"mean", "variance"} float32 arrays.
  """
  options = steps_lib.PopulationOptions(batch_size, augment)
  compute = jax.jit(functools.partial(steps_lib.population_statistics, apply_fn=model.apply,
                                      options=options))
  return jax.device_get(compute(params, images, mean, std))


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A run's model at a checkpoint, with its data and config.

  Attributes:
    model: the Flax module (built for this machine's backend).
    params: its trained parameters (one replica's, of a run that trained several).
    config: the config the run used (its config.json).
    step: the training steps of the checkpoint.
    history: the records of the epochs it completed (metrics.jsonl's lines up to it).
    data: the run's data set (the training images give the normalisation and the population
      statistics; the test set is what `evaluate` uses by default).
    workdir: the run's folder.
    replica: which replica `params` are (0 for a run of one).
  """

  model: nn.Module
  params: Any
  config: ml_collections.ConfigDict
  step: int
  history: list
  data: input_pipeline.Dataset
  workdir: Path
  replica: int = 0
  # The jitted probability functions, by (statistics, test-time augmentation): repeated
  # predictions compile once per batch shape.
  _probability_fns: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
  # The precise BatchNorm statistics, by `batch_norm_statistics`, once computed or read.
  _populations: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.data.class_names

  def _population_options(self, batch_norm_statistics: str
                          ) -> steps_lib.PopulationOptions | None:
    return steps_lib.population_options(batch_norm_statistics, self.config.batch_size,
                                        steps_lib.augment_options(self.config.augment))

  def population(self, batch_norm_statistics: str = "population") -> dict:
    """The precise BatchNorm statistics of this checkpoint (`population_statistics`) for
    "population" or "augmented": read from the workdir when computed before, else computed and
    stored there (kept in memory only where the workdir cannot be written)."""
    if batch_norm_statistics not in self._populations:
      self._populations[batch_norm_statistics] = self._stored_population(batch_norm_statistics)
    return self._populations[batch_norm_statistics]

  def _stored_population(self, batch_norm_statistics: str) -> dict:
    path = self.workdir / "population_statistics" / (
        f"step{self.step}" + (f"_replica{self.replica}" if self.config.replicas.count > 1
                              else "")
        + ("_augmented" if batch_norm_statistics == "augmented" else "") + ".npz")
    if path.is_file():
      with np.load(path) as saved:
        return traverse_util.unflatten_dict({key: saved[key] for key in saved.files},
                                            sep="/")
    options = self._population_options(batch_norm_statistics)
    statistics = population_statistics(self.model, self.params, self.data.train_images,
                                       self.data.mean, self.data.std, options.batch_size,
                                       options.augment)
    try:
      path.parent.mkdir(exist_ok=True)
      workdir_lib.write_atomically(
          path, lambda temporary: _save_npz(
              temporary, traverse_util.flatten_dict(statistics, sep="/")))
    except OSError as error:
      logging.warning("population statistics not stored (%s); computed again next time", error)
    return statistics

  def _apply_fn(self, batch_norm_statistics: str) -> Callable:
    _check_statistics(batch_norm_statistics)
    if batch_norm_statistics != "batch":
      return steps_lib.with_population(self.model.apply, self.population(batch_norm_statistics))
    return self.model.apply

  def evaluate(self, images: np.ndarray | None = None, labels: np.ndarray | None = None, *,
               batch_size: int | None = None, batch_norm_statistics: str | None = None,
               test_time_augmentation: str | None = None) -> dict[str, Any]:
    """Accuracy and mean loss on labelled images, in order, in batches of `batch_size` (the last
    one short), as the run evaluated its test set after each epoch.

    Args:
      images: uint8 NHWC 32x32 RGB images (default: the run's test set).
      labels: their labels, 0..k-1 in the run's class order (`class_names`).
      batch_size: default: the run's `eval.batch_size`.
      batch_norm_statistics: "batch" (each batch's own, as in training), "population" or
        "augmented" (`BATCH_NORM_STATISTICS`); default: the run's `eval.batch_norm_statistics`.
      test_time_augmentation: also the accuracy with these views (`tta.LEVELS`); default: the
        run's `eval.test_time_augmentation`.

    Returns:
      {"examples", "batch_size", "test_acc", "test_loss"} and, with test-time augmentation,
      "tta_test_acc":
      the keys and values of the run's metrics.jsonl (with the defaults, on its test set, the
      same digits).
    """
    if images is None:
      images, labels = self.data.test_images, self.data.test_labels
    if labels is None or len(labels) != len(images):
      raise UserError(f"evaluate: {len(images)} images need as many labels")
    # A set smaller than a batch is one batch.
    batch_size = min(batch_size or self.config.eval.batch_size, len(labels))
    level = (self.config.eval.test_time_augmentation if test_time_augmentation is None
             else test_time_augmentation)
    if level not in tta.LEVELS:
      raise UserError(f"test_time_augmentation: {level!r}, expected one of "
                      f"{', '.join(tta.LEVELS)}")
    apply_fn = self._apply_fn(batch_norm_statistics or self.config.eval.batch_norm_statistics)
    # The data the run's own evaluation program takes, with these images as its test set; it
    # reads no training image, so none is copied to the device.
    data = programs_lib.put_data(dataclasses.replace(
        self.data, train_images=self.data.train_images[:0],
        train_labels=self.data.train_labels[:0], test_images=np.asarray(images, np.uint8),
        test_labels=np.asarray(labels, np.int32)), None)
    options = programs_lib.ProgramOptions(steps_lib.EpochOptions(self.config.batch_size),
                                          eval_batch_size=batch_size)
    # One pass: with test-time augmentation, the plain sums come from its first view.
    program = programs_lib.compile_for(programs_lib.jitted_evaluate(options, apply_fn, None, level),
                                       None, self.params, data)
    _, totals = jax.device_get(program(self.params, data))
    # float64 on the host, as the run's records: an accuracy is exactly correct / count.
    sums = {key: float(np.asarray(value, np.float64)) for key, value in totals.items()}
    record = {"examples": len(labels), "batch_size": batch_size,
              "test_acc": sums["correct"] / len(labels),
              "test_loss": sums["loss_sum"] / len(labels)}
    if level != "none":
      record["tta_test_acc"] = sums[steps_lib.AUGMENTED_PREFIX + "correct"] / len(labels)
    return record

  def probabilities(self, images: np.ndarray, *, batch_size: int | None = None,
                    batch_norm_statistics: str | None = None,
                    test_time_augmentation: str = "none") -> np.ndarray:
    """Class probabilities (N, classes) of uint8 NHWC 32x32 RGB `images`, in batches of
    `batch_size` (default: the run's `eval.batch_size`; the last one short), BatchNorm
    normalising with `batch_norm_statistics` (`BATCH_NORM_STATISTICS`; default: the run's
    `eval.batch_norm_statistics` where those are precise statistics, else "population", so that
    no prediction depends on its batch).

    With "batch" statistics, fewer than `MIN_IMAGES_FOR_BATCH_STATISTICS` images raise a
    `UserError`: normalised by their own statistics, their probabilities are not the model's.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != input_pipeline.IMAGE_SHAPE or \
        images.dtype != np.uint8:
      raise UserError(f"predict: images of shape {images.shape} and dtype {images.dtype}, "
                      f"expected uint8 (N, 32, 32, 3)")
    if batch_norm_statistics is None:
      batch_norm_statistics = self.config.eval.batch_norm_statistics
      if batch_norm_statistics == "batch":
        batch_norm_statistics = "population"
    _check_statistics(batch_norm_statistics)
    if batch_norm_statistics == "batch" and len(images) < MIN_IMAGES_FOR_BATCH_STATISTICS:
      raise UserError(
          f"predict: {len(images)} images with batch_norm_statistics='batch': BatchNorm would "
          f"normalise them with their own statistics, and below "
          f"{MIN_IMAGES_FOR_BATCH_STATISTICS} images the predictions are not the model's; use "
          f"batch_norm_statistics='population'")
    batch_size = batch_size or self.config.eval.batch_size
    key = (batch_norm_statistics, test_time_augmentation)
    if key not in self._probability_fns:
      apply_fn = self._apply_fn(batch_norm_statistics)

      @jax.jit
      def batch_probabilities(params, batch):
        normalized = input_pipeline.normalize(batch, self.data.mean, self.data.std)
        return jax.nn.softmax(tta.logits(params, apply_fn, normalized, test_time_augmentation))

      self._probability_fns[key] = batch_probabilities
    run = self._probability_fns[key]
    return np.concatenate([np.asarray(run(self.params, images[start:start + batch_size]))
                           for start in range(0, len(images), batch_size)])

  def predict(self, images: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
    """(classes, probabilities of those classes) of `images`; `options` as `probabilities`."""
    probabilities = self.probabilities(images, **options)
    classes = np.argmax(probabilities, axis=-1)
    return classes, probabilities[np.arange(len(classes)), classes]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
  with open(path, "wb") as file:  # a file object: np.savez would add ".npz" to a path
    np.savez(file, **arrays)


def saved_config(files: workdir_lib.RunFiles) -> dict:
  """The config.json of a run's folder, as written; `NotARun` when there is none."""
  if not files.workdir.is_dir():
    raise NotARun(f"--workdir {files.workdir}: no such folder")
  if not files.config.is_file():
    raise NotARun(f"--workdir {files.workdir}: not a convnet_jax run (no config.json)")
  try:
    saved = json.loads(files.config.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise NotARun(f"{files.config}: not valid JSON ({error})") from None
  if not isinstance(saved, dict):
    raise NotARun(f"{files.config}: expected a JSON object")
  return saved


def load(workdir: str | Path, *, data_dir: str | None = None, replica: int = 0
         ) -> TrainedModel:
  """The model of a run's newest intact checkpoint, on this machine's default backend.

  Args:
    workdir: the run's folder (`--workdir` of `convnet_jax.main`).
    data_dir: where the run's CIFAR-10 binary files are now, if not where its config says
      (`data.dir`); the training images give the normalisation and population statistics.
    replica: of a run that trained several replicas together, which one.

  Returns:
    A `TrainedModel`.

  Raises:
    NotARun: no config.json, or no checkpoint that reads back intact.
    UserError: the data cannot be read, or `replica` is out of range.
  """
  files = workdir_lib.RunFiles(workdir)
  saved = saved_config(files)
  values = workdir_lib.upgraded(saved)
  values.pop(workdir_lib.CONV_RECORD_KEY, None)
  # The fingerprints the run's checkpoints carry: of its config, and of config.json as an
  # earlier version of the package wrote it (see `train.train_and_evaluate`).
  fingerprints = tuple(checkpoints.config_fingerprint(workdir_lib.identity(v))
                       for v in (values, saved))
  config = ml_collections.ConfigDict(values)
  if data_dir is not None:
    config.data.dir = str(data_dir)
  validation.validate_config(config)
  if not 0 <= replica < config.replicas.count:
    raise UserError(f"replica {replica}: the run trained {config.replicas.count} replica(s)")
  if not any(path.name.isdigit() for path in files.checkpoints.glob("*")):
    raise NotARun(f"--workdir {files.workdir}: no checkpoint in {files.checkpoints}")
  data = prepare.load_data(config)
  try:
    conv_choice = prepare.choose_convolutions(config, None)
  except UserError:  # the run's path cannot run here (oneDNN on a GPU): the same math another way
    logging.info("convolutions %r unavailable here; choosing again ('auto')",
                 config.model.conv_implementation)
    config.model.conv_implementation = "auto"
    conv_choice = prepare.choose_convolutions(config, None)
  model = models.create_model(config.model, data.num_classes, conv_choice.implementation)
  budget = prepare.step_budget(config, len(data.train_labels))
  state, _ = prepare.create_run_state(config, model, budget, None, data)
  store = checkpoints.CheckpointStore(files.checkpoints, read_only=True)
  try:
    restored = store.restore_latest(state, fingerprints)
  except checkpoints.ForeignCheckpointError as error:
    raise NotARun(str(error)) from None
  finally:
    store.close()
  if restored is None:
    raise NotARun(f"--workdir {files.workdir}: no checkpoint reads back intact in "
                  f"{files.checkpoints}")
  state, record = restored
  params = state.params
  if config.replicas.count > 1:
    params = jax.tree_util.tree_map(lambda x: x[replica], params)
  step = int(np.asarray(state.step).reshape(-1)[0])  # stacked replicas each count the same
  return TrainedModel(model=model, params=params, config=config, step=step,
                      history=record["history"], data=data, workdir=files.workdir,
                      replica=replica)
