"""Using a trained model: BatchNorm's recorded and given statistics against numpy, population
statistics against every value a layer saw, image files, and `load`/`evaluate`/`predict` on
real saved workdirs against what those runs recorded."""

import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import real_runs
from configs import default as default_config
from conftest import DATA
from conftest import REPO_ROOT
from PIL import Image
from test_models import init_params
from test_models import make_model
from test_models import numpy_batch_norm
from test_models import numpy_seed_convnet

import convnet_jax
from convnet_jax import models
from convnet_jax import steps as steps_lib
from convnet_jax import trained
from convnet_jax.data import images as images_lib
from convnet_jax.data import input_pipeline
from convnet_jax.errors import UserError


def _uint8_images(count, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


MEAN = np.array([0.5, 0.4, 0.3], np.float32)
STD = np.array([0.25, 0.2, 0.3], np.float32)


def _normalized(images):
  return (images.astype(np.float64) / 255 - MEAN) / STD


def _get(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def test_batch_norm_records_its_batch_statistics_and_normalises_with_given_ones():
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 2)) * 3 + 1
  module = models.BatchNorm(use_offset=True)
  params = {"offset": jnp.array([0.5, -1.0])}
  x64 = np.asarray(x, np.float64)
  y, recorded = module.apply({"params": params}, x, mutable=[models.BATCH_STATISTICS])
  stats = recorded[models.BATCH_STATISTICS]
  np.testing.assert_allclose(stats["mean"][0], x64.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats["variance"][0], x64.var(axis=(0, 1, 2)), rtol=1e-5)
  # Recording changes nothing of what is computed.
  np.testing.assert_allclose(y, numpy_batch_norm(x64) + [0.5, -1.0], atol=1e-5)
  population = {"mean": jnp.array([2.0, -1.0]), "variance": jnp.array([4.0, 0.25])}
  y = module.apply({"params": params, models.POPULATION: population}, x)
  expected = (x64 - [2.0, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-5) + [0.5, -1.0]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _numpy_population(params, images, batch_size, num_batches):
  """Every value each BatchNorm's input took over the batches (the network normalising each
  batch by its own statistics), then their mean and variance: the definition."""
  seen = {}

  def record(name, a):
    seen.setdefault(name, []).append(a)
    return numpy_batch_norm(a)

  for index in range(num_batches):
    numpy_seed_convnet(params, _normalized(images[index * batch_size:(index + 1) * batch_size]),
                       norm=record)
  values = {name: np.concatenate(parts) for name, parts in seen.items()}
  return {name: (a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))) for name, a in values.items()}


def test_population_statistics_are_the_mean_and_variance_of_every_value_a_layer_saw(
    monkeypatch):
  model = make_model()
  params = init_params(model)
  images = _uint8_images(14)
  # Full batches of 4 within at most 10 images: the first two batches, 8 images.
  monkeypatch.setattr(steps_lib, "POPULATION_EXAMPLES", 10)
  got = trained.population_statistics(model, params, images, MEAN, STD, batch_size=4)
  expected = _numpy_population(params, images, batch_size=4, num_batches=2)
  assert sorted(expected) == ["block1/bn", "block2/bn", "block3/bn", "stem_bn"]
  for name, (mean, variance) in expected.items():
    np.testing.assert_allclose(_get(got, name)["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_get(got, name)["variance"], variance, rtol=1e-4)


def test_population_statistics_of_fewer_images_than_a_batch_use_them_all():
  model = make_model()
  params = init_params(model)
  images = _uint8_images(3, seed=1)
  got = trained.population_statistics(model, params, images, MEAN, STD, batch_size=128)
  expected = _numpy_population(params, images, batch_size=3, num_batches=1)
  np.testing.assert_allclose(got["stem_bn"]["variance"], expected["stem_bn"][1], rtol=1e-4)


def _numpy_statistics_of_batches(params, normalized_batches):
  """Each BatchNorm input's mean and variance over every value it took in these (already
  normalised) batches, the network normalising each batch by its own statistics."""
  seen = {}

  def record(name, a):
    seen.setdefault(name, []).append(a)
    return numpy_batch_norm(a)

  for batch in normalized_batches:
    numpy_seed_convnet(params, np.asarray(batch, np.float64), norm=record)
  values = {name: np.concatenate(parts) for name, parts in seen.items()}
  return {name: (a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))) for name, a in values.items()}


def _statistics(model, params, images, batch_size, augment):
  return trained.population_statistics(model, params, images, MEAN, STD, batch_size, augment)


def test_augmented_statistics_are_those_of_the_batches_a_training_step_sees(monkeypatch):
  model = make_model()
  params = init_params(model)
  images = _uint8_images(12, seed=5)
  monkeypatch.setattr(steps_lib, "POPULATION_EXAMPLES", 8)  # two batches of 4
  augment = steps_lib.AugmentOptions(translate=2, padding="reflect", flip="random", cutout=3)
  got = _statistics(model, params, images, 4, augment)
  # The definition: training's own augmentation of each batch (`steps.training_batch`, tested
  # in test_augmentation.py), under the fixed key of the statistics and the batch's index.
  key = jax.random.key(steps_lib.POPULATION_AUGMENT_SEED)
  batches = [steps_lib.training_batch(jax.random.fold_in(key, index),
                                      jnp.asarray(images[4 * index:4 * (index + 1)]),
                                      (MEAN, STD), augment) for index in range(2)]
  expected = _numpy_statistics_of_batches(params, batches)
  for name, (mean, variance) in expected.items():
    np.testing.assert_allclose(_get(got, name)["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_get(got, name)["variance"], variance, rtol=1e-4, atol=1e-6)
  # And they are not the un-augmented ones.
  plain = _statistics(model, params, images, 4, None)
  assert not np.allclose(plain["stem_bn"]["variance"], got["stem_bn"]["variance"], rtol=1e-2)


def test_a_cutout_of_the_whole_image_leaves_batch_norm_only_zeros():
  # The seed net has no biases before its BatchNorms: zero images give zero at every one.
  model = make_model()
  params = init_params(model)
  augment = steps_lib.AugmentOptions(translate=0, flip="none", cutout=8)  # 8x8 images
  got = _statistics(model, params, _uint8_images(8, seed=6), 4, augment)
  for leaf in jax.tree_util.tree_leaves(got):
    np.testing.assert_array_equal(leaf, 0.0)


def test_an_augmentation_that_changes_nothing_gives_the_population_statistics():
  model = make_model()
  params = init_params(model)
  images = _uint8_images(8, seed=7)
  identity = steps_lib.AugmentOptions(translate=0, flip="none", cutout=0)
  got = _statistics(model, params, images, 4, identity)
  expected = _numpy_population(params, images, batch_size=4, num_batches=2)
  for name, (mean, variance) in expected.items():
    np.testing.assert_allclose(_get(got, name)["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_get(got, name)["variance"], variance, rtol=1e-4)


def test_population_options_of_each_choice():
  augment = steps_lib.AugmentOptions(translate=4, padding="reflect", flip="alternate", cutout=12)
  assert steps_lib.population_options("batch", 1024, augment) is None
  assert steps_lib.population_options("population", 1024, augment) == \
      steps_lib.PopulationOptions(1024)
  # airbench's alternating flips flip each image with probability 1/2 in any one epoch.
  assert steps_lib.population_options("augmented", 1024, augment) == steps_lib.PopulationOptions(
      1024, steps_lib.AugmentOptions(translate=4, padding="reflect", flip="random", cutout=12))
  # A run without augmentation: its training batches are the images as they are.
  assert steps_lib.population_options("augmented", 64, None) == steps_lib.PopulationOptions(64)


def test_evaluation_with_population_statistics_normalises_every_test_batch_with_them():
  model = make_model()
  params = init_params(model)
  train_images, test_images = _uint8_images(8, seed=8), _uint8_images(6, seed=9)
  test_labels = np.array([0, 1, 1, 0, 1, 0], np.int32)
  data = steps_lib.DeviceData(jnp.asarray(train_images), jnp.zeros(8, jnp.int32),
                              jnp.asarray(test_images), jnp.asarray(test_labels),
                              jnp.asarray(MEAN), jnp.asarray(STD))
  population = _numpy_population(params, train_images, batch_size=4, num_batches=2)

  def norm(name, a):
    mean, variance = population[name]
    return (a - mean) / np.sqrt(variance + 1e-5)

  logits = numpy_seed_convnet(params, _normalized(test_images), norm=norm)
  log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  expected_loss = -log_probabilities[np.arange(6), test_labels].sum()
  for batch_size in (1, 4, 6):  # the batches no longer matter
    predictions, totals = jax.jit(functools.partial(
        steps_lib.evaluate, apply_fn=model.apply, batch_size=batch_size,
        population=steps_lib.PopulationOptions(4)))(params, data)
    np.testing.assert_array_equal(predictions, logits.argmax(axis=1))
    np.testing.assert_allclose(totals["loss_sum"], expected_loss, rtol=1e-4)


def _tiny_trained(params, model, train_images):
  config = default_config.get_config()
  config.batch_size, config.eval.batch_size = 4, 4
  data = input_pipeline.Dataset(train_images, np.zeros(len(train_images), np.int32),
                                train_images[:6], np.array([0, 1, 0, 1, 1, 0], np.int32), MEAN,
                                STD, ("airplane", "automobile"))
  return trained.TrainedModel(model=model, params=params, config=config, step=0, history=[],
                              data=data, workdir=REPO_ROOT / "no-such-workdir")


def test_population_normalisation_gives_what_numpy_computes_with_those_statistics():
  model = make_model()
  params = init_params(model)
  statistics = trained.population_statistics(model, params, _uint8_images(8), MEAN, STD,
                                             batch_size=4)
  images = _uint8_images(5, seed=2)
  apply = steps_lib.with_population(model.apply, statistics)
  got = jax.jit(apply)({"params": params}, jnp.asarray(_normalized(images), jnp.float32))

  def norm(name, a):
    layer = _get(statistics, name)
    return (a - layer["mean"]) / np.sqrt(layer["variance"].astype(np.float64) + 1e-5)

  expected = numpy_seed_convnet(params, _normalized(images), norm=norm)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_predictions_with_population_statistics_do_not_depend_on_the_batch():
  model = make_model()
  model_here = _tiny_trained(init_params(model), model, _uint8_images(8, size=32))
  images = _uint8_images(5, size=32, seed=2)
  together = model_here.probabilities(images, batch_norm_statistics="population", batch_size=5)
  np.testing.assert_allclose(together.sum(axis=1), 1.0, rtol=1e-5)
  for index in range(len(images)):
    alone = model_here.probabilities(images[index:index + 1],
                                     batch_norm_statistics="population")
    np.testing.assert_allclose(alone[0], together[index], rtol=1e-4, atol=1e-6)


def test_prediction_with_batch_statistics_refuses_too_few_images_naming_the_option():
  model = make_model()
  model_here = _tiny_trained(init_params(model), model, _uint8_images(8))
  with pytest.raises(UserError, match=r"^predict: 10 images with batch_norm_statistics='batch'.*"
                     r"use batch_norm_statistics='population'$"):
    model_here.predict(_uint8_images(10, size=32), batch_norm_statistics="batch")
  with pytest.raises(UserError, match="batch_norm_statistics: 'running', expected one of batch, "
                     "population"):
    model_here.predict(_uint8_images(10, size=32), batch_norm_statistics="running")


def test_combining_batches_gives_the_statistics_of_all_their_values():
  rng = np.random.default_rng(3)
  batches = rng.normal(2.0, 3.0, (5, 7, 2)) + rng.normal(0, 1, (5, 1, 2))  # batch means differ
  node = {"mean": (batches.mean(axis=1),), "variance": (batches.var(axis=1),)}
  got = steps_lib._combined_statistics({"layer": node})["layer"]  # in float32
  every_value = batches.reshape(-1, 2)
  np.testing.assert_allclose(got["mean"], every_value.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(got["variance"], every_value.var(axis=0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Image files.

def test_an_npz_set_keeps_the_runs_classes_and_numbers_them_in_its_order(tmp_path):
  images = _uint8_images(5, size=32)
  np.savez(tmp_path / "set.npz", images=images, labels=np.array([3, 5, 9, 5, 0]))
  got_images, got_labels = images_lib.read_labelled(tmp_path / "set.npz", (5, 3))
  np.testing.assert_array_equal(got_images, images[[0, 1, 3]])
  np.testing.assert_array_equal(got_labels, [1, 0, 0])


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 32, 32, 3), np.uint8)}, r"no array named 'labels' \(it holds "
     r"images; expected images, labels\)"),
    ({"images": np.zeros((2, 28, 28), np.uint8), "labels": np.zeros(2, int)},
     r"images of shape \(2, 28, 28\) and dtype uint8, expected uint8 N x 32 x 32 x 3"),
    ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([1, 10])},
     r"labels must be 2 integers 0-9"),
])
def test_a_malformed_npz_set_is_one_line_naming_the_file(tmp_path, arrays, message):
  path = tmp_path / "set.npz"
  np.savez(path, **arrays)
  with pytest.raises(input_pipeline.DataError, match=f"^{path}: {message}"):
    images_lib.read_labelled(path, (0, 1))


def test_image_files_read_back_as_written(tmp_path):
  images = _uint8_images(3, size=32)
  for index, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{index}.png")
  np.savez(tmp_path / "more.npz", images=images[:2])
  names, got = images_lib.read_unlabelled(
      [tmp_path / "2.png", tmp_path / "more.npz", tmp_path / "0.png"])
  assert names == [str(tmp_path / "2.png"), f"{tmp_path / 'more.npz'}[0]",
                   f"{tmp_path / 'more.npz'}[1]", str(tmp_path / "0.png")]
  np.testing.assert_array_equal(got, images[[2, 0, 1, 0]])


def test_an_image_of_another_size_or_not_an_image_is_one_line_naming_it(tmp_path):
  Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "wide.png")
  with pytest.raises(input_pipeline.DataError, match=r"wide.png: 40x20 pixels; the model takes "
                     r"32x32 RGB images \(resize it first\)$"):
    images_lib.read_unlabelled([tmp_path / "wide.png"])
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(input_pipeline.DataError, match=r"notes.png: not a readable image"):
    images_lib.read_unlabelled([tmp_path / "notes.png"])


# ---------------------------------------------------------------------------------------------
# Workdirs.

def test_load_of_a_folder_that_holds_no_run_or_no_checkpoint_is_one_line(tmp_path):
  with pytest.raises(trained.NotARun, match=r"not a convnet_jax run \(no config.json\)$"):
    convnet_jax.load(tmp_path)
  shutil.copy(DATA / "flat_workdir" / "config.json", tmp_path / "config.json")
  with pytest.raises(trained.NotARun, match=f"no checkpoint in {tmp_path}/checkpoints$"):
    convnet_jax.load(tmp_path)


@pytest.mark.slow
def test_load_of_a_workdir_saved_before_the_config_groups_gives_its_recorded_accuracy(
    tmp_path, cifar10_dir):
  """The workdir that main at ebaaff8 wrote (flat config.json, stopped after epoch 0): its
  recorded test accuracy and loss, to the digit."""
  workdir = tmp_path / "run"
  shutil.copytree(DATA / "flat_workdir", workdir)
  model = convnet_jax.load(workdir, data_dir=cifar10_dir)
  recorded = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert (model.step, len(model.history)) == (4, 1)
  got = model.evaluate()
  assert (got["test_acc"], got["test_loss"]) == (recorded["test_acc"], recorded["test_loss"])


@pytest.fixture(scope="module")
def seed_workdir(tmp_path_factory, cifar10_dir):
  """A short seed run on real CIFAR-2: its workdir and its records."""
  workdir = tmp_path_factory.mktemp("trained") / "seed"
  _, records = real_runs.short_real_run(
      default_config.get_config(), cifar10_dir, workdir, train_examples=1024, batch_size=128,
      num_epochs=2, test_examples=300, eval_batch_size=128)
  return workdir, records


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"convnet_jax.{module}", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


@pytest.mark.slow
def test_evaluate_gives_the_runs_last_recorded_accuracy_and_predict_its_preds(
    seed_workdir, tmp_path, cifar10_dir):
  workdir, records = seed_workdir
  result = _run("evaluate", "--workdir", workdir)
  assert result.returncode == 0, result.stderr
  line = json.loads(result.stdout)
  assert (line["test_acc"], line["test_loss"], line["step"], line["epochs"]) == (
      records[-1]["test_acc"], records[-1]["test_loss"], 16, 2)
  # The first evaluation batch (128 test images) as PNG files, predicted with batch statistics
  # in one batch of 128: the classes the run's own evaluation wrote to preds.
  test_images, _ = input_pipeline.read_binary_file(cifar10_dir / "test_batch.bin", (0, 1))
  paths = []
  for index, image in enumerate(test_images[:128]):
    paths.append(tmp_path / f"{index:03d}.png")
    Image.fromarray(image).save(paths[-1])
  preds = (workdir / "preds").read_text().split()[:128]
  result = _run("predict", "--workdir", workdir, "--batch_norm_statistics=batch", *paths)
  assert result.returncode == 0, result.stderr
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  names = ("airplane", "automobile")
  assert [line["image"] for line in lines] == list(map(str, paths))
  assert [names.index(line["class"]) for line in lines] == [int(p) for p in preds]
  # Ten images: population statistics by default; with the batch's own, refused in one line.
  result = _run("predict", "--workdir", workdir, *paths[:10])
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.splitlines()) == 10
  assert (workdir / "population_statistics" / "step16.npz").is_file()
  result = _run("predict", "--workdir", workdir, "--batch_norm_statistics=batch", *paths[:10])
  assert result.returncode == 2
  assert result.stderr.splitlines()[-1].startswith(
      "error: predict: 10 images with batch_norm_statistics='batch'")
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_population_statistics_are_computed_once_and_read_back(seed_workdir):
  workdir, _ = seed_workdir
  model = convnet_jax.load(workdir)
  first = model.evaluate(batch_norm_statistics="population", batch_size=1)
  stored = workdir / "population_statistics" / "step16.npz"
  assert stored.is_file()
  again = convnet_jax.load(workdir).evaluate(batch_norm_statistics="population", batch_size=300)
  # Population statistics make every image's prediction independent of its batch.
  assert first["test_acc"] == again["test_acc"]
  np.testing.assert_allclose(first["test_loss"], again["test_loss"], rtol=1e-5)


def test_evaluate_on_fewer_images_than_a_batch_takes_them_as_one_batch():
  model = make_model()
  params = init_params(model)
  model_here = _tiny_trained(params, model, _uint8_images(8))  # eval batch size 4
  images, labels = _uint8_images(3, seed=4), np.array([1, 0, 1], np.int32)
  got = model_here.evaluate(images, labels)
  logits = numpy_seed_convnet(params, _normalized(images))  # one batch, its own statistics
  log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  assert (got["examples"], got["batch_size"]) == (3, 3)
  assert got["test_acc"] == np.mean(np.argmax(logits, axis=1) == labels)
  np.testing.assert_allclose(got["test_loss"], -log_probabilities[np.arange(3), labels].mean(),
                             rtol=1e-4)
