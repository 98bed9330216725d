"""Schedule, optimiser, loss and the epoch/evaluation programs against hand computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
import whole_epochs
from convnet_jax import steps
import built
from convnet_jax import budget as budget_lib


def test_steps_per_epoch_matches_the_specification():
  assert budget_lib.steps_per_epoch(10_000, 128, drop_last_batch=False) == 79
  assert budget_lib.steps_per_epoch(10_000, 128, drop_last_batch=True) == 78


def test_learning_rate_first_middle_last_step():
  config = default_config.get_config()
  schedule = built.schedule(config, built.budget(config, 79))
  total = 5 * 79
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(197)) == pytest.approx(0.1 * (1 - 197 / total))
  assert float(schedule(total - 1)) == pytest.approx(0.1 / total)
  assert float(schedule(total)) == pytest.approx(0.0)


def test_sgd_momentum_matches_pytorch_formula():
  config = default_config.get_config()
  optimizer = built.optimizer(config, built.budget(config, 2))  # 10 steps in all
  w0 = np.array([1.0, -2.0, 0.5])
  g1 = np.array([0.3, -0.1, 2.0])
  g2 = np.array([-1.0, 0.4, 0.2])
  params = jnp.asarray(w0, jnp.float32)
  opt_state = optimizer.init(params)
  for g in (g1, g2):
    updates, opt_state = optimizer.update(jnp.asarray(g, jnp.float32), opt_state, params)
    params = optax.apply_updates(params, updates)
  # PyTorch: v = 0.9 v + g; w = w - lr v, with lr = 0.1 (1 - step / 10).
  v1 = g1
  w1 = w0 - 0.1 * v1
  v2 = 0.9 * v1 + g2
  w2 = w1 - 0.1 * (1 - 1 / 10) * v2
  np.testing.assert_allclose(np.asarray(params), w2, rtol=1e-6)


def test_each_examples_loss_is_its_negative_log_softmax():
  logits = np.array([[2.0, -1.0], [0.5, 0.25], [-3.0, 4.0]])
  labels = np.array([0, 1, 0])
  softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  expected = -np.log(softmax[np.arange(3), labels])
  got = steps.cross_entropy_losses(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def _linear_state(num_pixels, learning_rate=0.0):
  """A linear classifier without BatchNorm, so each example's loss is independent of its batch."""
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(num_pixels, 3)) * 0.01,
                        jnp.float32)
  apply_fn = lambda variables, x: x.reshape(x.shape[0], -1) @ variables["params"]["w"]
  return steps.TrainState.create(apply_fn=apply_fn, params={"w": weights},
                                 tx=optax.sgd(learning_rate))


def _tiny_data(num_examples):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(num_examples, 2, 2, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, size=num_examples).astype(np.int32)
  return images, labels


def _numpy_losses(weights, images, labels):
  logits = (images.reshape(len(images), -1).astype(np.float64) / 255.0) @ \
      np.asarray(weights, np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -log_softmax[np.arange(len(labels)), labels], logits.argmax(axis=1)


def test_evaluate_with_test_time_augmentation_sums_the_views_and_the_plain_images_in_one_pass():
  images, labels = _tiny_data(10)
  state = _linear_state(12)
  traced_views = []

  def apply_fn(variables, x):
    traced_views.append(x.shape)
    return state.apply_fn(variables, x)

  run = jax.jit(functools.partial(steps.evaluate, apply_fn=apply_fn, batch_size=4,
                                  test_time_augmentation="mirror"))
  predictions, totals = run(state.params, steps.DeviceData(images[:0], labels[:0], images,
                                                          labels, jnp.zeros(3), jnp.ones(3)))
  # Two views (the images and their mirror images) for the full batches' program and two for
  # the short last batch: no third pass for the plain accuracy.
  assert traced_views == [(4, 2, 2, 3)] * 2 + [(2, 2, 2, 3)] * 2
  losses, expected = _numpy_losses(state.params["w"], images, labels)
  np.testing.assert_array_equal(np.asarray(predictions), expected)
  assert float(totals["loss_sum"]) == pytest.approx(losses.sum(), rel=1e-5)
  assert float(totals["correct"]) == np.sum(expected == labels)
  # The mirror view's logits, by hand, and the views' mean.
  weights = np.asarray(state.params["w"], np.float64)
  plain = images.reshape(10, -1).astype(np.float64) / 255.0 @ weights
  mirrored = images[:, :, ::-1].reshape(10, -1).astype(np.float64) / 255.0 @ weights
  mean = (plain + mirrored) / 2
  log_softmax = mean - np.log(np.exp(mean).sum(axis=1, keepdims=True))
  assert float(totals["tta_loss_sum"]) == pytest.approx(
      -log_softmax[np.arange(10), labels].sum(), rel=1e-5)
  assert float(totals["tta_correct"]) == np.sum(mean.argmax(axis=1) == labels)


@pytest.mark.parametrize("drop_last_batch", [False, True])
def test_train_epoch_sees_every_example_once(drop_last_batch):
  images, labels = _tiny_data(10)  # two batches of 4 and a last one of 2
  state = _linear_state(12)  # learning rate 0: the parameters stay, losses just add up
  epoch = jax.jit(functools.partial(whole_epochs.train_epoch, batch_size=4,
                                    drop_last_batch=drop_last_batch))
  new_state, totals = epoch(state, images, labels, jax.random.key(3), 0, jnp.zeros(3),
                            jnp.ones(3))
  losses, predictions = _numpy_losses(state.params["w"], images, labels)
  assert int(new_state.step) == (2 if drop_last_batch else 3)
  if not drop_last_batch:  # every example exactly once: the sums are order-free
    assert float(totals["loss_sum"]) == pytest.approx(losses.sum(), rel=1e-5)
    assert float(totals["correct"]) == np.sum(predictions == labels)
  else:  # 8 of the 10 examples, a random subset
    assert losses.sum() - float(totals["loss_sum"]) > 0


def test_a_fractional_epoch_runs_only_its_full_batches():
  # 10 examples in batches of 4: two full batches and a short one. An epoch cut to 2 steps
  # (num_steps, the fractional last epoch) takes the two full batches and not the short one.
  images, labels = _tiny_data(10)
  state = _linear_state(12)
  for num_steps in (1, 2):
    epoch = jax.jit(functools.partial(whole_epochs.train_epoch, batch_size=4, drop_last_batch=False,
                                      num_steps=num_steps))
    new_state, totals = epoch(state, images, labels, jax.random.key(3), 0, jnp.zeros(3),
                              jnp.ones(3))
    assert int(new_state.step) == num_steps
    assert totals["step_losses"].shape == (num_steps,)


def test_train_epoch_orders_differ_between_keys():
  images, labels = _tiny_data(12)
  state = _linear_state(12, learning_rate=0.5)
  epoch = jax.jit(functools.partial(whole_epochs.train_epoch, batch_size=4, drop_last_batch=False))
  a, _ = epoch(state, images, labels, jax.random.key(1), 0, jnp.zeros(3), jnp.ones(3))
  b, _ = epoch(state, images, labels, jax.random.key(2), 0, jnp.zeros(3), jnp.ones(3))
  c, _ = epoch(state, images, labels, jax.random.key(1), 0, jnp.zeros(3), jnp.ones(3))
  assert not np.allclose(a.params["w"], b.params["w"])
  np.testing.assert_array_equal(a.params["w"], c.params["w"])


def test_evaluate_predicts_in_order_with_a_short_last_batch():
  images, labels = _tiny_data(10)
  state = _linear_state(12)
  run = jax.jit(functools.partial(steps.evaluate, apply_fn=state.apply_fn, batch_size=4))
  predictions, totals = run(state.params, steps.DeviceData(images[:0], labels[:0], images,
                                                          labels, jnp.zeros(3), jnp.ones(3)))
  losses, expected = _numpy_losses(state.params["w"], images, labels)
  np.testing.assert_array_equal(np.asarray(predictions), expected)
  assert float(totals["loss_sum"]) == pytest.approx(losses.sum(), rel=1e-5)
  assert float(totals["correct"]) == np.sum(expected == labels)
