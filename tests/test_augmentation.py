"""Training-set augmentation: real crops of the zero-padded image, flips half the time, fresh per
image and per key, applied in the training epoch only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import whole_epochs
from convnet_jax import steps
from convnet_jax.data import input_pipeline

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("augmentation")

PAD = 4


def random_images(count, size=8, seed=0):
  # No zero pixels, so the padding can never be mistaken for image content.
  return np.random.default_rng(seed).integers(1, 256, size=(count, size, size, 3), dtype=np.uint8)


def find_windows(original, augmented):
  """For each image, every (row offset, column offset, flipped) whose window of the 4-pixel
  zero-padded original, mirrored when flipped, equals the augmented image."""
  size = original.shape[1]
  padded = np.pad(original, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  matches = [[] for _ in range(len(original))]
  for dy in range(2 * PAD + 1):
    for dx in range(2 * PAD + 1):
      window = padded[:, dy:dy + size, dx:dx + size, :]
      for flipped, candidate in ((False, window), (True, window[:, :, ::-1, :])):
        equal = np.all(candidate == augmented, axis=(1, 2, 3))
        for index in np.flatnonzero(equal):
          matches[index].append((dy, dx, flipped))
  return matches


@pytest.fixture(scope="module")
def augmented_batch():
  original = random_images(2000)
  augmented = np.asarray(jax.jit(input_pipeline.augment)(jax.random.key(0), original))
  return original, augmented, find_windows(original, augmented)


def test_keeps_shape_and_uint8(augmented_batch):
  original, augmented, _ = augmented_batch
  assert augmented.shape == original.shape and augmented.dtype == np.uint8


def test_each_image_is_one_window_of_its_zero_padded_original(augmented_batch):
  _, _, matches = augmented_batch
  assert all(len(found) == 1 for found in matches)  # exactly one crop and flip explains it


def test_offsets_cover_the_whole_padding_uniformly(augmented_batch):
  _, _, matches = augmented_batch
  rows = np.array([found[0][0] for found in matches])
  columns = np.array([found[0][1] for found in matches])
  for offsets in (rows, columns):
    counts = np.bincount(offsets, minlength=2 * PAD + 1)
    assert len(counts) == 2 * PAD + 1  # shifts of -4..+4 pixels, nothing beyond
    # 2000 draws of 9 equally likely offsets: 222 each, std ~14.
    assert counts.min() > 160 and counts.max() < 290, counts
  # Row and column offsets are drawn independently: all 81 pairs occur.
  assert len(set(zip(rows.tolist(), columns.tolist()))) == (2 * PAD + 1) ** 2


def test_flips_happen_about_half_the_time(augmented_batch):
  _, _, matches = augmented_batch
  flipped = np.mean([found[0][2] for found in matches])
  assert 0.45 < flipped < 0.55  # 2000 fair coins: std 0.011


def test_padding_is_black_before_normalisation(augmented_batch):
  original, augmented, matches = augmented_batch
  for index in range(50):
    dy, dx, flipped = matches[index][0]
    image = augmented[index][:, ::-1] if flipped else augmented[index]
    size = original.shape[1]
    rows = np.arange(dy, dy + size) - PAD
    columns = np.arange(dx, dx + size) - PAD
    outside = (rows[:, None] < 0) | (rows[:, None] >= size) | (columns < 0) | (columns >= size)
    assert np.all(image[outside] == 0) and np.all(image[~outside] > 0)


def test_copies_of_one_image_are_augmented_independently():
  copies = np.repeat(random_images(1), 200, axis=0)
  augmented = np.asarray(input_pipeline.augment(jax.random.key(1), copies))
  distinct = {tuple(found[0]) for found in find_windows(copies, augmented)}
  # 200 draws from 162 equally likely (offset, flip) triples give ~118 distinct ones.
  assert len(distinct) > 90


def test_same_key_same_result_other_key_other_result():
  images = random_images(64)
  a = np.asarray(input_pipeline.augment(jax.random.key(5), images))
  b = np.asarray(input_pipeline.augment(jax.random.key(5), images))
  c = np.asarray(input_pipeline.augment(jax.random.key(6), images))
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.all(a == c, axis=(1, 2, 3))) < 0.1  # same crop and flip: 1/162 each


def _linear_state():
  """A linear classifier without BatchNorm and with learning rate 0: losses just add up."""
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(8 * 8 * 3, 3)) * 0.01, jnp.float32)
  apply_fn = lambda variables, x: x.reshape(x.shape[0], -1) @ variables["params"]["w"]
  return steps.TrainState.create(apply_fn=apply_fn, params={"w": weights}, tx=optax.sgd(0.0))


def _numpy_loss_sum(weights, images, labels):
  logits = (images.reshape(len(images), -1).astype(np.float64) / 255.0) @ \
      np.asarray(weights, np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -log_softmax[np.arange(len(labels)), labels].sum()


def test_training_epoch_augments_and_evaluation_does_not():
  images = random_images(10, seed=3)  # two batches of 4 and a short one of 2
  labels = np.random.default_rng(4).integers(0, 3, size=10).astype(np.int32)
  state = _linear_state()
  zeros, ones = jnp.zeros(3), jnp.ones(3)
  plain_loss = _numpy_loss_sum(state.params["w"], images, labels)

  epoch = functools.partial(whole_epochs.train_epoch, batch_size=4, drop_last_batch=False)
  _, plain = jax.jit(epoch)(state, images, labels, jax.random.key(3), 0, zeros, ones)
  augmented_epoch = jax.jit(functools.partial(epoch, augment=steps.AugmentOptions()))
  _, augmented = augmented_epoch(state, images, labels, jax.random.key(3), 0, zeros, ones)
  _, next_epoch = augmented_epoch(state, images, labels, jax.random.key(4), 0, zeros, ones)
  assert float(plain["loss_sum"]) == pytest.approx(plain_loss, rel=1e-5)
  # Augmented images give other losses, and another epoch key gives other augmentations.
  assert abs(float(augmented["loss_sum"]) - plain_loss) > 1e-3
  assert abs(float(next_epoch["loss_sum"]) - float(augmented["loss_sum"])) > 1e-3

  evaluate = jax.jit(functools.partial(steps.evaluate, apply_fn=state.apply_fn, batch_size=4))
  _, totals = evaluate(state.params, steps.DeviceData(images[:0], labels[:0], images, labels,
                                                     zeros, ones))
  assert float(totals["loss_sum"]) == pytest.approx(plain_loss, rel=1e-5)
