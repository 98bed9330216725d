"""airbench94 and its recipe (configs/cifar10_airbench94.py), each piece against an independent
expectation: numpy's eigendecomposition, the formulas, PyTorch's SGD update rule written out by
hand, airbench's own counts; and a few real steps on real CIFAR-10."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import real_runs
from configs import cifar10_airbench94
from configs import default as default_config
from convnet_jax import models
from convnet_jax import steps
from convnet_jax.data import input_pipeline
from convnet_jax.data import tta
from convnet_jax.models import airbench
from convnet_jax.models import layers
from convnet_jax.ops import conv
from convnet_jax.runs import validation
from convnet_jax.errors import UserError
import built
from convnet_jax import budget as budget_lib
from convnet_jax.runs import prepare


def _patch_rows(images, size=2):
  """Every size x size patch as a (dy, dx, channel) row, by explicit loops."""
  n, h, w, _ = images.shape
  return np.array([images[b, i:i + size, j:j + size, :].reshape(-1)
                   for b in range(n) for i in range(h - size + 1) for j in range(w - size + 1)])


def test_whitening_kernel_whitens_the_patches():
  rng = np.random.default_rng(0)
  # Correlated channels and neighbouring pixels, as in images.
  base = rng.standard_normal((30, 9, 9, 3)) @ np.array([[1, .8, .6], [0, .5, .3], [0, 0, .2]])
  images = base + 0.7 * np.roll(base, 1, axis=1)
  epsilon = 5e-4
  kernel = airbench.whitening_kernel(images, 2, epsilon)
  assert kernel.shape == (2, 2, 3, 24)
  rows = _patch_rows(images)
  covariance = rows.T @ rows / len(rows)
  eigenvalues = np.linalg.eigvalsh(covariance)[::-1]  # largest first
  filters = kernel.reshape(12, 24).astype(np.float64)
  whitened = rows @ filters[:, :12]
  # The whitened patches are uncorrelated with variance lambda / (lambda + eps): the identity
  # but for eps, which only the smallest eigenvalues feel.
  np.testing.assert_allclose(whitened.T @ whitened / len(rows),
                             np.diag(eigenvalues / (eigenvalues + epsilon)), atol=2e-5)
  np.testing.assert_array_equal(filters[:, 12:], -filters[:, :12])


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla"])
def test_whitening_layer_applies_the_kernel_to_each_patch(implementation):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  kernel = rng.standard_normal((2, 2, 3, 24)).astype(np.float32)
  got = conv.CONV_IMPLEMENTATIONS[implementation](jnp.asarray(images), jnp.asarray(kernel), 1, 0)
  expected = (_patch_rows(images) @ kernel.reshape(12, 24)).reshape(2, 5, 4, 24)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_whitening_bias_gradient_in_bfloat16_is_the_float32_sum_of_the_output_gradient():
  # The bias gradient of a bfloat16 convolution is the sum of the output gradient over batch,
  # rows and columns; summed in float64 here, it must come out to float32 precision, not to a
  # bfloat16 sum's (which drifts by whole percents over 60,000 terms).
  rng = np.random.default_rng(2)
  layer = layers.Conv(features=24, kernel_size=2, padding=0, dtype=jnp.bfloat16, use_bias=True)
  images = jnp.asarray(rng.standard_normal((64, 31, 31, 3)), jnp.float32)
  params = layer.init(jax.random.key(0), images)["params"]
  output_gradient = jnp.asarray(rng.standard_normal((64, 30, 30, 24)) + 0.3, jnp.bfloat16)
  _, pullback = jax.vjp(lambda p: layer.apply({"params": p}, images), params)
  got = pullback(output_gradient)[0]["bias"]
  assert got.dtype == jnp.float32
  expected = np.asarray(output_gradient, np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_data_initialisation_puts_the_kernel_of_the_first_5000_normalised_images():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5200, 4, 4, 3), dtype=np.uint8)
  images[5000:] = 255  # images after the first 5,000 must not count
  mean, std = np.array([.4, .5, .6], np.float32), np.array([.2, .25, .3], np.float32)
  params = {"whiten": {"kernel": jnp.zeros((2, 2, 3, 24)), "bias": jnp.ones(24)}, "head": 1}
  got = airbench.initialise_from_data(params, images, mean, std)
  normalised = (images[:5000].astype(np.float64) / 255 - mean) / std
  np.testing.assert_allclose(got["whiten"]["kernel"], airbench.whitening_kernel(normalised),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got["whiten"]["bias"], np.ones(24))
  assert got["head"] == 1


def test_network_shapes_and_parameter_count_are_airbench94s():
  model = models.Airbench94(num_classes=10)
  images = jnp.zeros((4, 32, 32, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
  assert models.describe_shapes(model, params, images) == [
      "whiten (Conv): (4, 32, 32, 3) -> (4, 31, 31, 24)",
      "group1 (ConvGroup): (4, 31, 31, 24) -> (4, 15, 15, 64)",
      "group2 (ConvGroup): (4, 15, 15, 64) -> (4, 7, 7, 256)",
      "group3 (ConvGroup): (4, 7, 7, 256) -> (4, 3, 3, 256)",
      "head (Dense): (4, 256) -> (4, 10)"]
  whiten = 2 * 2 * 3 * 24 + 24
  convolutions = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 256 * 256 + 256 * 256 + 256 * 256)
  offsets = 2 * (64 + 256 + 256)
  head = 256 * 10
  assert models.count_parameters(params) == whiten + convolutions + offsets + head == 1_971_640
  # PyTorch's sum(p.numel() for p in net.parameters()) for airbench94 is 1,972,792: it also
  # counts the 2 * (64 + 256 + 256) = 1,152 BatchNorm weights that airbench fixes at 1, which
  # this BatchNorm has no parameter for.
  assert models.count_parameters(params) + offsets == 1_972_792


def numpy_conv_same(x, kernel):
  """PyTorch's Conv2d(3, padding=1, bias=False) of NHWC `x` with an HWIO `kernel`, in numpy."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  size = x.shape[1]
  return sum(np.einsum("nijc,co->nijo", padded[:, a:a + size, b:b + size], kernel[a, b])
             for a in range(3) for b in range(3))


def numpy_pool(y):
  """PyTorch's MaxPool2d(2): an odd last row and column dropped."""
  half = y.shape[1] // 2
  return y[:, :2 * half, :2 * half].reshape(len(y), half, 2, half, 2, -1).max(axis=(2, 4))


def numpy_norm(y, offset):
  """airbench's BatchNorm in training mode: the batch's statistics (biased variance, eps
  1e-12), no scale, plus the offset."""
  return (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-12) + offset


def numpy_gelu(y):
  """PyTorch's nn.GELU(): the exact (erf) form."""
  from scipy.special import erf

  return y * (1 + erf(y / np.sqrt(2))) / 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_gradients_are_the_derivatives_of_pytorchs_definitions(dtype):
  """GELU's gradient is d/dx [x Phi(x)] = Phi(x) + x phi(x) and SiLU's d/dx [x s(x)] =
  s(x) (1 + x (1 - s(x))), by hand in float64 at the values the dtype holds; the gradient
  comes back in the input's dtype, so bfloat16's within its rounding (2^-8 relative, below
  values of ~1.13 at most)."""
  from scipy.special import erf

  x = jnp.asarray(np.linspace(-7, 7, 561), dtype)
  exact = np.asarray(x, np.float64)
  sigmoid = 1 / (1 + np.exp(-exact))
  expected = {
      airbench.gelu: (1 + erf(exact / np.sqrt(2))) / 2
                     + exact * np.exp(-exact**2 / 2) / np.sqrt(2 * np.pi),
      airbench.silu: sigmoid * (1 + exact * (1 - sigmoid)),
  }
  tolerance = 1e-6 if dtype == jnp.float32 else 2.0**-8
  for activation, derivative in expected.items():
    gradient = jax.grad(lambda v: jnp.sum(activation(v).astype(jnp.float32)))
    got = gradient(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), derivative, rtol=tolerance,
                               atol=tolerance)
    nan_gradient = gradient(jnp.asarray([np.nan, 1.0], dtype))
    assert np.isnan(float(nan_gradient[0])) and not np.isnan(float(nan_gradient[1]))


def test_activations_keep_only_their_input_for_the_backward_pass(capsys):
  # Autodiff of the erf form kept three float32 maps per bfloat16 one (erfc, exp and a
  # product): 12 bytes an element where the input alone is 2.
  from jax import ad_checkpoint

  x = jnp.ones((4, 8), jnp.bfloat16)
  for activation in (airbench.gelu, airbench.silu):
    ad_checkpoint.print_saved_residuals(activation, x)
    assert capsys.readouterr().out.splitlines() == ["bf16[4,8] from the argument x"]


def _numpy_group(x, kernel1, offset1, kernel2, offset2, activation="gelu"):
  """airbench's ConvGroup as PyTorch defines it, in float64: Conv2d(3, padding=1), then
  MaxPool2d(2), BatchNorm of the batch's statistics plus the offset, exact GELU (or hiverge's
  SiLU, x sigmoid(x)), and again without the pool."""
  def activate(y):
    return y / (1 + np.exp(-y)) if activation == "silu" else numpy_gelu(y)

  y = numpy_pool(numpy_conv_same(x, kernel1))
  return activate(numpy_norm(numpy_conv_same(activate(numpy_norm(y, offset1)), kernel2),
                             offset2))


def _group_and_its_numpy_form(size, implementation, activation="gelu"):
  """A ConvGroup of 5 -> 6 channels with random parameters on a random (4, size, size, 5)
  batch: (its output, `_numpy_group`'s, the parameters, the batch)."""
  rng = np.random.default_rng(size)
  x = rng.standard_normal((4, size, size, 5)).astype(np.float32)
  group = airbench.ConvGroup(6, conv_implementation=implementation, activation=activation)
  params = jax.jit(group.init)(jax.random.key(0), jnp.asarray(x))["params"]
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.3, jnp.float32), params)
  got = group.apply({"params": params}, jnp.asarray(x))
  expected = _numpy_group(*(np.asarray(a, np.float64) for a in (
      x, params["conv1"]["kernel"], params["norm1"]["offset"], params["conv2"]["kernel"],
      params["norm2"]["offset"])), activation=activation)
  return got, expected, params, x


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla"])
@pytest.mark.parametrize("size", [7, 8])
def test_conv_group_on_odd_and_even_maps_is_pytorchs(implementation, size):
  # Odd maps run the first convolution padded (1, 0) (no crop before the pool): the same numbers.
  got, expected, params, x = _group_and_its_numpy_form(size, implementation)
  assert got.shape == (4, size // 2, size // 2, 6)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)

  # The gradient of the padded-(1, 0) convolution is the gradient of PyTorch's crop.
  def cropped_loss(kernel, x):
    y = conv.conv_xla(x, kernel)[:, :size // 2 * 2, :size // 2 * 2]
    return jnp.sum(jnp.sin(y))

  def loss(kernel, x):
    return jnp.sum(jnp.sin(conv.CONV_IMPLEMENTATIONS[implementation](
        x, kernel, 1, (1, 0) if size % 2 else None)))

  kernel = params["conv1"]["kernel"]
  for g, e in zip(jax.grad(loss, (0, 1))(kernel, jnp.asarray(x)),
                  jax.grad(cropped_loss, (0, 1))(kernel, jnp.asarray(x))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_a_silu_conv_group_is_hiverges():
  """cifar10_speedrun.py's ConvGroup: airbench's, with nn.SiLU() after both BatchNorms."""
  got, expected, _, _ = _group_and_its_numpy_form(8, "im2col", activation="silu")
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_convolutions_start_with_identity_filters():
  init = models.dirac_then_fan_in_uniform()
  kernel = np.asarray(init(jax.random.key(0), (3, 3, 24, 64)))
  for channel in range(24):
    expected = np.zeros((3, 3, 24))
    expected[1, 1, channel] = 1
    np.testing.assert_array_equal(kernel[..., channel], expected)
  rest = kernel[..., 24:]
  bound = math.sqrt(1 / (9 * 24))
  assert np.all(np.abs(rest) <= bound) and np.abs(rest).max() > 0.9 * bound


def test_label_smoothed_loss_is_the_formula():
  logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, 3.0, -2.0]])
  labels = np.array([0, 3])
  smoothing = 0.2
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  targets = np.full((2, 4), smoothing / 4)
  targets[np.arange(2), labels] += 1 - smoothing
  expected = -(targets * log_softmax).sum(axis=1)
  got = steps.cross_entropy_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                   smoothing)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _linear_state(config, steps_per_epoch=2, w=None):
  def apply_fn(variables, x):
    return x.reshape(x.shape[0], -1) @ variables["params"]["w"]

  w = jnp.asarray(np.random.default_rng(3).standard_normal((6, 3)) if w is None else w,
                  jnp.float32)
  tx = built.optimizer(config, built.budget(config, steps_per_epoch))
  return steps.TrainState.create(apply_fn=apply_fn, params={"w": w}, tx=tx,
                                 lookahead_params={"w": w} if config.lookahead.every_steps
                                 else None)


def _config(overrides=None):
  config = default_config.get_config()
  return built.with_values(config, overrides or {})


def test_lookahead_matches_a_hand_written_loop():
  # Plain SGD (lr 0.1, no momentum) on a linear model with a summed squared-error-free loss:
  # the mean cross-entropy; lookahead every 2 steps of 5, decay 0.6 * (step / 5) ** 2.
  config = _config({
      "schedule.name": "step", "optim.momentum": 0.0, "optim.learning_rate": 0.1, "num_epochs": 2.5,
      "lookahead.every_steps": 2, "lookahead.decay": 0.6, "lookahead.power": 2.0})
  rng = np.random.default_rng(4)
  x = rng.standard_normal((8, 2, 3)).astype(np.float32)
  y = rng.integers(0, 3, 8)
  state = _linear_state(config)
  options = prepare.step_options(config, built.budget(config, 2))
  assert options.total_steps == 5
  step = jax.jit(lambda s: steps.train_step(s, jnp.asarray(x), jnp.asarray(y), options))

  def gradient(w):  # d/dw of the mean cross-entropy of softmax(x w)
    flat = x.reshape(8, -1).astype(np.float64)
    logits = flat @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(8), y] -= 1
    return flat.T @ p / 8

  w = np.asarray(state.params["w"], np.float64)
  slow = w.copy()
  for count in range(1, 6):
    state, _ = step(state)
    w = w - 0.1 * gradient(w)
    if count % 2 == 0:
      decay = 0.6 * (count / 5) ** 2
      slow = slow + (1 - decay) * (w - slow)
      w = slow.copy()
    elif count == 5:  # the final copy
      w = slow.copy()
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.lookahead_params["w"], slow, rtol=1e-5, atol=1e-6)


def _pytorch_sgd(params, grads_per_step, groups):
  """PyTorch's SGD step (torch.optim.SGD, momentum, dampening 0, nesterov=True), as its docs
  write it, per parameter group {names: (lr, weight_decay)}: d = g + wd p; b = m b + d (b = d
  at the first step); d = d + m b; p = p - lr d. `lr` may be a function of the step."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buffers = {}
  for t, grads in enumerate(grads_per_step):
    for name, (lr, weight_decay, momentum) in groups.items():
      d = grads[name] + weight_decay * params[name]
      buffers[name] = d if t == 0 else momentum * buffers[name] + d
      d = d + momentum * buffers[name]
      params[name] = params[name] - lr(t) * d
  return params


def test_decoupled_nesterov_with_fast_offsets_matches_pytorchs_rule():
  config = cifar10_airbench94.get_config()
  config.num_epochs = 2.0
  config.freeze.parameters = config.freeze.late_parameters = ()
  rng = np.random.default_rng(5)
  params = {"conv": {"kernel": rng.standard_normal((3, 4))},
            "norm": {"offset": rng.standard_normal(4)}}
  grads = [{"conv": {"kernel": rng.standard_normal((3, 4))},
            "norm": {"offset": rng.standard_normal(4)}} for _ in range(4)]
  steps_per_epoch = 2
  optimizer = built.optimizer(config, built.budget(config, steps_per_epoch))
  state = optimizer.init(jax.tree_util.tree_map(jnp.float32, params))
  got = jax.tree_util.tree_map(jnp.float32, params)
  for g in grads:
    updates, state = optimizer.update(jax.tree_util.tree_map(jnp.float32, g), state, got)
    got = optax.apply_updates(got, updates)

  # airbench's conversion of its decoupled hyperparameters, in its own words.
  momentum, batch_size = 0.85, 1024
  kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
  lr = 11.5 / kilostep_scale
  wd = 0.0153 * batch_size / kilostep_scale
  lr_biases = lr * 64.0
  total = 4
  warmup = int(total * 0.23)

  def shape(step):  # airbench's get_lr
    if step < warmup:
      frac = step / warmup
      return 0.2 * (1 - frac) + 1.0 * frac
    frac = (step - warmup) / (total - warmup)
    return 1.0 * (1 - frac) + 0.07 * frac

  expected = _pytorch_sgd(
      {"conv": params["conv"]["kernel"], "norm": params["norm"]["offset"]},
      [{"conv": g["conv"]["kernel"], "norm": g["norm"]["offset"]} for g in grads],
      {"conv": (lambda t: lr * shape(t), wd / lr, momentum),
       "norm": (lambda t: lr_biases * shape(t), wd / lr_biases, momentum)})
  np.testing.assert_allclose(got["conv"]["kernel"], expected["conv"], rtol=2e-5)
  np.testing.assert_allclose(got["norm"]["offset"], expected["norm"], rtol=2e-5)


def test_frozen_parameters_never_move_and_late_frozen_ones_stop_after_their_epochs():
  config = _config({
      "schedule.name": "step", "optim.momentum": 0.9, "optim.weight_decay": 0.1, "num_epochs": 3.0,
      "freeze.parameters": ("whiten/kernel",), "freeze.late_parameters": ("whiten",),
      "freeze.late_epochs": 1})
  params = {"whiten": {"kernel": jnp.ones(3), "bias": jnp.ones(2)}, "head": jnp.ones(2)}
  optimizer = built.optimizer(config, built.budget(config, 2))
  state = optimizer.init(params)
  history = []
  for _ in range(5):
    updates, state = optimizer.update(jax.tree_util.tree_map(jnp.ones_like, params), state,
                                      params)
    params = optax.apply_updates(params, updates)
    history.append(jax.device_get(params))
  assert all(np.all(h["whiten"]["kernel"] == 1) for h in history)
  bias = [float(h["whiten"]["bias"][0]) for h in history]
  assert bias[0] < 1 and bias[1] < bias[0] and bias[1] == bias[2] == bias[3] == bias[4]
  head = [float(h["head"][0]) for h in history]
  assert all(b < a for a, b in zip(head, head[1:]))


def test_frozen_parameters_get_no_gradient():
  params = {"whiten": {"kernel": jnp.ones(3)}, "head": jnp.ones(3)}
  grads = jax.grad(lambda p: jnp.sum(steps.stop_frozen_gradients(p, ("whiten",))["whiten"]
                                     ["kernel"] * p["head"]))(params)
  np.testing.assert_array_equal(grads["whiten"]["kernel"], np.zeros(3))
  np.testing.assert_array_equal(grads["head"], np.ones(3))


def test_alternating_flips_flip_each_image_in_every_other_epoch():
  key = jax.random.key(7)
  flips = np.array([steps.epoch_flips(key, epoch, 1000) for epoch in range(5)])
  assert np.all(flips[1:] != flips[:-1])
  assert 0.4 < flips[0].mean() < 0.6
  images = np.random.default_rng(8).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
  mask = np.array([True, False, True, True, False, False])
  got = np.asarray(input_pipeline.augment(jax.random.key(0), jnp.asarray(images), 0, "zeros",
                                          jnp.asarray(mask)))
  np.testing.assert_array_equal(got[mask], images[mask][:, :, ::-1])
  np.testing.assert_array_equal(got[~mask], images[~mask])


def test_reflect_translation_is_a_crop_of_the_reflected_image():
  images = np.random.default_rng(9).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
  got = np.asarray(input_pipeline.augment(jax.random.key(1), jnp.asarray(images), 2, "reflect",
                                          jnp.zeros(20, bool)))
  offsets = set()
  for image, result in zip(images, got):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    matches = [(i, j) for i in range(5) for j in range(5)
               if np.array_equal(padded[i:i + 6, j:j + 6], result)]
    assert matches, "not a crop of the reflect-padded image"
    offsets.update(matches)
  assert len(offsets) > 5  # translations vary


def test_test_time_augmentation_is_the_weighted_mean_of_six_views():
  rng = np.random.default_rng(10)
  images = rng.standard_normal((3, 6, 6, 2)).astype(np.float32)
  weights = rng.standard_normal((72, 4)).astype(np.float32)

  def apply_fn(variables, x):  # a nonlinear function of the whole batch, like BatchNorm
    flat = x.reshape(x.shape[0], -1)
    return jnp.tanh((flat - flat.mean(0)) @ variables["params"])

  def numpy_logits(x):
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.tanh((flat - flat.mean(0)) @ weights)

  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  up_left, down_right = padded[:, 0:6, 0:6], padded[:, 2:8, 2:8]
  views = [(images, 1 / 4), (images[:, :, ::-1], 1 / 4), (up_left, 1 / 8),
           (up_left[:, :, ::-1], 1 / 8), (down_right, 1 / 8), (down_right[:, :, ::-1], 1 / 8)]
  expected = sum(weight * numpy_logits(view) for view, weight in views)
  got = tta.logits(weights, apply_fn, jnp.asarray(images), "mirror_translate")
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  mirror = tta.logits(weights, apply_fn, jnp.asarray(images), "mirror")
  np.testing.assert_allclose(
      mirror, (numpy_logits(images) + numpy_logits(images[:, :, ::-1])) / 2, rtol=1e-5,
      atol=1e-6)


def test_an_evaluation_with_test_time_augmentation_gives_the_plain_evaluations_numbers():
  """The run's last evaluation takes its plain accuracy and loss from the augmented program's
  first view: the same as the plain program's (BatchNorm sees the same batches)."""
  config = cifar10_airbench94.get_config()
  config.model.airbench.widths = (16, 32, 32)
  model = models.create_model(config.model, 10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 50).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))["params"]
  data = steps.DeviceData(images[:0], labels[:0], images, labels, jnp.zeros(3), jnp.ones(3))
  results = {level: jax.jit(functools.partial(
      steps.evaluate, apply_fn=model.apply, batch_size=25, test_time_augmentation=level))(
          params, data) for level in ("none", "mirror_translate")}
  (plain_predictions, plain), (predictions, totals) = results["none"], results["mirror_translate"]
  np.testing.assert_array_equal(predictions, plain_predictions)
  assert float(totals["correct"]) == float(plain["correct"])
  assert float(totals["loss_sum"]) == pytest.approx(float(plain["loss_sum"]), rel=1e-6)
  assert set(totals) == {"loss_sum", "correct", "tta_loss_sum", "tta_correct"}


def test_a_run_evaluated_only_at_the_end_compiles_the_augmented_evaluation_first():
  config = cifar10_airbench94.get_config()
  budget = built.budget(config, 48)
  assert config.eval.test_time_augmentation == "mirror_translate"
  config.operations.eval_every_epochs = 0
  assert prepare.program_options(config, budget).first_evaluation == "mirror_translate"
  config.operations.eval_every_epochs = budget.epochs_run + 1
  assert prepare.program_options(config, budget).first_evaluation == "mirror_translate"
  config.operations.eval_every_epochs = 1
  assert prepare.program_options(config, budget).first_evaluation == "none"


def test_the_recipe_takes_476_steps_with_a_44_step_last_epoch():
  config = cifar10_airbench94.get_config()
  validation.validate_config(config)
  steps_per_epoch = budget_lib.steps_per_epoch(50_000, config.batch_size,
                                               config.data.drop_last_batch)
  assert steps_per_epoch == 48  # 50,000 // 1,024, the short batch dropped
  assert built.budget(config, steps_per_epoch).total_steps == 476  # ceil(48 * 9.9)
  assert budget_lib.epochs_run(config.num_epochs) == 10
  assert [built.budget(config, 48).epoch_steps(e) for e in range(10)] == [48] * 9 + [44]
  # The whitening bias trains 3 epochs.
  assert built.budget(config, 48).late_freeze_step == 144


def test_warmup_linear_is_airbenchs_schedule():
  config = cifar10_airbench94.get_config()
  schedule = built.schedule(config, built.budget(config, 48), peak=1.0)
  warmup = int(476 * 0.23)
  assert warmup == 109
  for step in (0, 1, 50, 108, 109, 110, 300, 475):
    if step < warmup:
      expected = 0.2 * (1 - step / warmup) + step / warmup
    else:
      frac = (step - warmup) / (476 - warmup)
      expected = (1 - frac) + 0.07 * frac
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step


@pytest.mark.parametrize("key, value, message", [
    ("optim.label_smoothing", 1.0, "expected a number in [0, 1)"),
    ("optim.loss_reduction", "max", "expected one of ('mean', 'sum')"),
    ("augment.flip", "sometimes", "expected one of ('random', 'alternate', 'none')"),
    ("augment.padding", "edge", "expected one of ('zeros', 'reflect')"),
    ("eval.test_time_augmentation", "all", "expected one of ('none', 'mirror', "),
    ("lookahead.every_steps", -1, "expected 0 (no lookahead) or a positive integer"),
    ("optim.offset_lr_multiplier", 0.0, "expected a positive number"),
    ("schedule.name", "triangle", "expected one of ('linear', 'step', 'cosine', 'warmup_linear')"),
    ("schedule.warmup_fraction", 1.0, "expected a number in [0, 1)"),
])
def test_bad_recipe_keys_are_named(key, value, message):
  config = cifar10_airbench94.get_config()
  error = built.validation_error(config, key, value)
  assert error.startswith(f"config.{key}=") and message in error


def test_parameter_paths_that_name_nothing_are_refused():
  config = cifar10_airbench94.get_config()
  config.freeze.parameters = ("whitening/kernel",)
  params = jax.eval_shape(lambda: models.Airbench94().init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3))))["params"]
  validation.check_parameter_paths(cifar10_airbench94.get_config(), params)
  with pytest.raises(UserError, match="config.freeze.parameters=.*'whitening/kernel' names none"):
    validation.check_parameter_paths(config, params)


@pytest.mark.slow
def test_real_steps_on_real_cifar10_lower_the_loss(cifar10_dir, tmp_path):
  """Twelve steps of the recipe at batch 256 on 2,048 real training images (a fractional
  second epoch of 4 of its 8 steps), the whitening from those images."""
  last, records = real_runs.short_real_run(cifar10_airbench94.get_config(), cifar10_dir,
                                           tmp_path, train_examples=2048, batch_size=256,
                                           num_epochs=1.5)
  assert [r["epoch"] for r in records] == [0, 1]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert records[1]["test_acc"] > 0.2  # chance is 0.1
  assert last == records[1] and 0.2 < last["tta_test_acc"] <= 1
  assert "tta_test_acc" not in records[0]


def test_late_frozen_parameters_get_no_gradient_after_they_freeze():
  """From the freeze on, the whitening bias's momentum buffer only decays (no gradient is
  added, PyTorch's `b.detach()`), while every other parameter trains as before."""
  import whole_epochs

  config = _config({
      "schedule.name": "step", "optim.momentum": 0.5, "optim.learning_rate": 0.1, "num_epochs": 3.0,
      "freeze.late_parameters": ("whiten/bias",), "freeze.late_epochs": 1})
  budget = built.budget(config, 2)  # 8 images in batches of 4: frozen from step 2
  rng = np.random.default_rng(12)
  images = rng.integers(0, 256, (8, 2, 2, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, 8).astype(np.int32)

  def apply_fn(variables, x):
    params = variables["params"]
    return x.reshape(len(x), -1) @ params["head"] + params["whiten"]["bias"]

  params = {"whiten": {"bias": jnp.zeros(3)},
            "head": jnp.asarray(rng.normal(size=(12, 3)) * 0.1, jnp.float32)}
  start = steps.TrainState.create(apply_fn=apply_fn, params=params,
                                  tx=built.optimizer(config, budget))
  zeros, ones = jnp.zeros(3), jnp.ones(3)

  def train(options):
    epoch = jax.jit(functools.partial(whole_epochs.train_epoch, batch_size=4,
                                      drop_last_batch=True, options=options))
    state, buffers = start, []
    for index in range(3):
      state, _ = epoch(state, images, labels, jax.random.key(13), index, zeros, ones)
      buffers.append(np.asarray(optax.tree_utils.tree_get(state.opt_state, "trace")["whiten"]
                                ["bias"]))
    return state, buffers

  options = prepare.step_options(config, budget)
  assert (options.late_frozen_parameters, options.late_freeze_step) == (("whiten/bias",), 2)
  state, buffers = train(options)
  assert np.all(buffers[0] != 0)
  np.testing.assert_allclose(buffers[1], 0.5**2 * buffers[0], rtol=1e-6)
  np.testing.assert_allclose(buffers[2], 0.5**4 * buffers[0], rtol=1e-6)
  # With the gradient still computed (and masked by the optimiser) the rest is the same.
  masked, masked_buffers = train(dataclasses.replace(options, late_frozen_parameters=()))
  assert not np.allclose(masked_buffers[2], buffers[2])
  np.testing.assert_allclose(state.params["head"], masked.params["head"], rtol=1e-6)
  np.testing.assert_array_equal(state.params["whiten"]["bias"], masked.params["whiten"]["bias"])
