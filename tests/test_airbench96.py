"""airbench95 and airbench96: their configs against the scripts' numbers, airbench96's conv group
of three convolutions against its PyTorch definition written out in numpy, cutout's squares
worked out by hand, and a short real-data run of each recipe."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import built
import real_runs
import convnet_jax
from configs import cifar10_airbench94
from configs import cifar10_airbench95
from configs import cifar10_airbench96
from configs import cifar10_airbench96_faster
from convnet_jax import models
from convnet_jax.data import input_pipeline
from convnet_jax.models import airbench
from convnet_jax.runs import prepare
from convnet_jax.runs import validation
from test_airbench import numpy_conv_same, numpy_gelu, numpy_norm, numpy_pool


def _numpy_three_conv_group(x, kernels, offsets):
  """airbench96's ConvGroup as PyTorch defines it, in float64: conv1 (3x3, padding 1) ->
  MaxPool2d(2) -> BatchNorm (the batch's statistics, eps 1e-12, plus the offset) -> GELU, kept
  as x0; conv2 -> BN -> GELU -> conv3 -> BN; x + x0 -> GELU."""
  x0 = numpy_gelu(numpy_norm(numpy_pool(numpy_conv_same(x, kernels[0])), offsets[0]))
  y = numpy_gelu(numpy_norm(numpy_conv_same(x0, kernels[1]), offsets[1]))
  return numpy_gelu(numpy_norm(numpy_conv_same(y, kernels[2]), offsets[2]) + x0)


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla"])
@pytest.mark.parametrize("size", [7, 8])
def test_a_three_conv_group_is_airbench96s(implementation, size):
  rng = np.random.default_rng(size)
  x = rng.standard_normal((4, size, size, 5)).astype(np.float32)
  group = airbench.ConvGroup(6, conv_implementation=implementation, num_convs=3)
  params = jax.jit(group.init)(jax.random.key(0), jnp.asarray(x))["params"]
  assert sorted(params) == ["conv1", "conv2", "conv3", "norm1", "norm2", "norm3"]
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.3, jnp.float32), params)
  got = group.apply({"params": params}, jnp.asarray(x))
  expected = _numpy_three_conv_group(
      np.asarray(x, np.float64),
      [np.asarray(params[f"conv{i}"]["kernel"], np.float64) for i in (1, 2, 3)],
      [np.asarray(params[f"norm{i}"]["offset"], np.float64) for i in (1, 2, 3)])
  assert got.shape == (4, size // 2, size // 2, 6)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_airbench96s_network_has_its_parameter_count():
  config = cifar10_airbench96.get_config()
  model = models.create_model(config.model, 10, "im2col")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = params["params"]
  # By hand from the script's make_net: the whitening 2x2 conv 3 -> 24 with bias; per group
  # conv1 c_in -> c, conv2 and conv3 c -> c (3x3, no bias) and three BatchNorm offsets; the head.
  convolutions = sum(9 * (c_in * c + 2 * c * c) for c_in, c in ((24, 128), (128, 384),
                                                                  (384, 512)))
  expected = (24 * 3 * 4 + 24) + convolutions + 3 * (128 + 384 + 512) + 512 * 10
  assert models.count_parameters(params) == expected == 9_915_704
  assert params["group3"]["conv3"]["kernel"].shape == (3, 3, 512, 512)


def test_cutout_zeroes_one_square_inside_each_image_and_nothing_else():
  images = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (500, 10, 10, 3)), jnp.float32)
  got = np.asarray(input_pipeline.cutout(jax.random.key(1), images, 4))
  corners = []
  for image, original in zip(got, np.asarray(images)):
    zero = np.all(image == 0, axis=-1)
    rows, columns = np.nonzero(zero)
    top, left = rows.min(), columns.min()
    # One 4 x 4 square, all of it inside the image, every channel zero; the rest untouched.
    expected = np.zeros((10, 10), bool)
    expected[top:top + 4, left:left + 4] = True
    np.testing.assert_array_equal(zero, expected)
    np.testing.assert_array_equal(image[~zero], original[~zero])
    corners.append((top, left))
  # The corner is uniform over the 7 x 7 positions that fit: every one of them is drawn.
  tops, lefts = zip(*corners)
  assert set(tops) == set(lefts) == set(range(7))
  assert np.mean(tops) == pytest.approx(3.0, abs=0.3)


def test_cutout_is_last_and_draws_apart_from_the_crops_and_jitter():
  """A batch with cutout is the batch without it (the same crops, flips and jitter) with a
  square set to 0: the cutout draws from its own key stream, after everything else."""
  from convnet_jax import steps

  images = jnp.asarray(np.random.default_rng(2).integers(1, 256, (8, 8, 8, 3)), jnp.uint8)
  normalization = (jnp.zeros(3), jnp.ones(3) / 255)  # pixel values, all positive
  def batch(cutout):
    augment = steps.AugmentOptions(translate=2, padding="reflect", flip="random",
                                   brightness=0.1, contrast=0.1, cutout=cutout)
    return np.asarray(steps.training_batch(jax.random.key(5), images, normalization, augment))

  plain, cut = batch(0), batch(3)
  square = np.all(cut == 0, axis=-1)
  assert square.reshape(8, -1).sum(axis=1).tolist() == [9] * 8  # one 3 x 3 square an image
  np.testing.assert_array_equal(cut[~square], plain[~square])
  assert not np.any(plain == 0)


def test_the_recipes_are_the_scripts():
  base = cifar10_airbench94.get_config()
  a95 = cifar10_airbench95.get_config()
  # airbench95.py: airbench94 with widths 128/384/384, 15 epochs, lr 10.0; the rest unchanged.
  assert tuple(a95.model.airbench.widths) == (128, 384, 384)
  assert (a95.num_epochs, a95.optim.learning_rate) == (15.0, 10.0)
  # And the dtype "auto": bfloat16 where it is faster (the "bfloat16 by default").
  assert a95.model.dtype == "auto" and base.model.dtype == "float32"
  a95.model.airbench.widths, a95.num_epochs, a95.optim.learning_rate, a95.model.dtype = (
      base.model.airbench.widths, base.num_epochs, base.optim.learning_rate, base.model.dtype)
  assert a95 == base
  a96 = cifar10_airbench96.get_config()
  assert tuple(a96.model.airbench.widths) == (128, 384, 512)
  assert a96.model.airbench.convs_per_group == 3
  assert (a96.augment.translate, a96.augment.cutout, a96.augment.flip) == (4, 12, "alternate")
  assert (a96.optim.learning_rate, a96.optim.weight_decay, a96.num_epochs) == (9.0, 0.012, 37.0)
  assert (a96.optim.momentum, a96.optim.offset_lr_multiplier, a96.optim.label_smoothing) == (
      0.85, 64.0, 0.2)
  assert (a96.freeze.late_epochs, a96.lookahead.every_steps) == (3, 5)
  assert a96.model.dtype == "auto"
  # airbench96.py evaluates with BatchNorm's running averages of its (cut out) training batches.
  assert (a96.eval.batch_norm_statistics, base.eval.batch_norm_statistics) == ("augmented",
                                                                               "batch")
  for config in (a95, a96):
    validation.validate_config(config)


def test_airbench96s_schedule_warms_up_over_a_tenth_then_falls_to_zero():
  """airbench96.py's get_lr, for its 37 epochs of 48 steps (1,776 steps, 177 of warm-up)."""
  config = cifar10_airbench96.get_config()
  budget = prepare.step_budget(config, 50_000)
  total = budget.total_steps
  assert (budget.steps_per_epoch, total) == (48, 1776)
  schedule = built.schedule(config, budget, peak=1.0)
  warmup = int(total * 0.1)
  for step in (0, 1, 88, 176, 177, 178, 1000, 1775, 1776):
    if step < warmup:
      frac = step / warmup
      expected = 0.2 * (1 - frac) + 1.0 * frac
    else:
      expected = (total - step) / (total - warmup)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("key, value, message", [
    ("model.airbench.convs_per_group", 4, "expected 2 (airbench94's groups) or 3"),
    ("model.airbench.widths", (128, 384), "expected three positive integers"),
    ("augment.cutout", 33, "expected 0 (none) or a square's side in pixels, at most 32"),
    ("augment.cutout", -1, "expected 0 (none) or a square's side"),
    ("eval.batch_norm_statistics", "running",
     "expected one of ('batch', 'population', 'augmented')"),
])
def test_bad_values_of_the_new_keys_are_named(key, value, message):
  config = cifar10_airbench96.get_config()
  error = built.validation_error(config, key, value)
  assert error.startswith(f"config.{key}=") and message in error


@pytest.mark.slow
@pytest.mark.parametrize("config_module", [cifar10_airbench95, cifar10_airbench96,
                                           cifar10_airbench96_faster])
def test_the_recipe_learns_on_real_cifar10(config_module, cifar10_dir, tmp_path):
  """Two epochs of 4 steps of the recipe at batch 500 on 2,000 real training images."""
  config = config_module.get_config()
  config.freeze.late_epochs = 1
  last, records = real_runs.short_real_run(config, cifar10_dir, tmp_path, train_examples=2000,
                                           batch_size=500, num_epochs=2)
  assert [r["epoch"] for r in records] == [0, 1]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  # Chance is 0.1; 0.14 is four standard errors above it on 1,000 test images.
  assert records[1]["test_acc"] > 0.14
  assert last == records[1] and 0.14 < last["tta_test_acc"] <= 1
  # The trained model, loaded, evaluates as the run did: airbench96's with the precise
  # statistics of augmented training batches (stored in the workdir), the others' with each
  # test batch's own.
  evaluated = convnet_jax.load(tmp_path).evaluate()
  assert (evaluated["test_acc"], evaluated["tta_test_acc"]) == (last["test_acc"],
                                                               last["tta_test_acc"])
  stored = tmp_path / "population_statistics" / "step8_augmented.npz"
  assert stored.is_file() == (config.eval.batch_norm_statistics == "augmented")
