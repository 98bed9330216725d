"""Muon in airbench94_muon's form (`optim.airbench_muon`, `optim.newton_schulz`): the
orthogonalisation against the closed form of its iteration on a matrix of known SVD, and the
optimiser's steps against a numpy transcription of airbench's `Muon.step` in PyTorch's layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convnet_jax import optim
import built

A, B, C = 3.4445, -4.7750, 2.0315  # airbench's coefficients, copied from its script


def _matrix_of_known_svd(rows, cols, singular_values, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
  v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
  k = min(rows, cols)
  return u[:, :k], np.asarray(singular_values, np.float64), v[:, :k]


@pytest.mark.parametrize("rows, cols", [(6, 15), (15, 6)])
def test_newton_schulz_maps_each_singular_value_through_the_quintic(rows, cols):
  s = np.linspace(0.1, 3.0, min(rows, cols))
  u, s, v = _matrix_of_known_svd(rows, cols, s)
  matrix = (u * s) @ v.T
  # Divided by the Frobenius norm, then x -> a x + b x^3 + c x^5 three times per value.
  x = s / np.sqrt(np.sum(s**2))
  for _ in range(3):
    x = A * x + B * x**3 + C * x**5
  expected = (u * x) @ v.T
  got = optim.newton_schulz(jnp.asarray(matrix, jnp.float32), dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)
  # In bfloat16, as airbench runs it: each product rounded to 8 bits, and the quintic's slope
  # at zero (a = 3.4445) multiplies what lands on the small singular values by up to
  # a^3 = 41 over the three steps; 4-5% of the whole measured here.
  rough = np.asarray(optim.newton_schulz(jnp.asarray(matrix, jnp.float32)), np.float64)
  assert np.linalg.norm(rough - expected) / np.linalg.norm(expected) < 0.1


def _numpy_zeropower(g, steps=3, eps=1e-7):
  """airbench94_muon.py's zeropower_via_newtonschulz5, transcribed (in float64)."""
  x = g / (np.linalg.norm(g) + eps)
  if g.shape[0] > g.shape[1]:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    x = A * x + (B * gram + C * gram @ gram) @ x
  if g.shape[0] > g.shape[1]:
    x = x.T
  return x


def _numpy_muon_steps(p, grads, learning_rates, momentum, nesterov):
  """airbench94_muon.py's Muon.step on one parameter of PyTorch's (out, in, kh, kw) layout,
  transcribed: the parameter after each step."""
  buf = np.zeros_like(p)
  out = []
  for g, lr in zip(grads, learning_rates):
    buf = momentum * buf + g
    g = g + momentum * buf if nesterov else buf
    p = p * (len(p)**0.5 / np.linalg.norm(p))  # normalize the weight
    update = _numpy_zeropower(g.reshape(len(g), -1)).reshape(g.shape)
    p = p - lr * update
    out.append(p)
  return out


def _to_hwio(kernel):  # PyTorch's (out, in, kh, kw) as flax's (kh, kw, in, out)
  return np.transpose(kernel, (2, 3, 1, 0))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_match_airbenchs_muon_step(nesterov):
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(8, 4, 3, 3))  # PyTorch layout: 8 filters of 4 x 3 x 3
  grads = [rng.normal(size=kernel.shape) for _ in range(3)]
  peak, total = 0.24, 10
  learning_rates = [peak * (1 - step / total) for step in range(3)]  # airbench's linear decay
  expected = _numpy_muon_steps(kernel, grads, learning_rates, 0.6, nesterov)

  tx = optim.airbench_muon(lambda count: peak * (1 - count / total), 0.6, nesterov=nesterov,
                           orthogonalisation=optim.NewtonSchulz(dtype=jnp.float32))
  params = {"conv": jnp.asarray(_to_hwio(kernel), jnp.float32)}
  state = tx.init(params)
  for grad, want in zip(grads, expected):
    updates, state = tx.update({"conv": jnp.asarray(_to_hwio(grad), jnp.float32)}, state,
                               params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["conv"]), _to_hwio(want), atol=2e-5)
  # Each filter bank starts every step at norm sqrt(8): the step then moves it by lr x U.
  assert int(state.count) == 3


def test_muon_without_normalisation_is_the_plain_orthogonalised_step():
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=kernel.shape), jnp.float32)
  tx = optim.airbench_muon(0.1, 0.0, nesterov=False, normalize_filters=False,
                           orthogonalisation=optim.NewtonSchulz(dtype=jnp.float32))
  updates, _ = tx.update(grad, tx.init(kernel), kernel)
  expected = -0.1 * _numpy_zeropower(np.asarray(grad, np.float64).reshape(-1, 8).T).T
  np.testing.assert_allclose(np.asarray(updates), expected.reshape(kernel.shape), atol=2e-6)
  assert math.isclose(float(jnp.linalg.norm(updates.reshape(-1, 8).T @ updates.reshape(-1, 8))),
                      float(jnp.linalg.norm(jnp.asarray(expected.T @ expected))), rel_tol=1e-4)


def test_muon_refuses_what_is_not_a_convolution_kernel():
  tx = optim.airbench_muon(0.1, 0.6)
  bias = jnp.zeros(8)
  with pytest.raises(ValueError, match=r"4-D convolution kernels, not shape \(8,\)"):
    tx.update(bias, tx.init(bias), bias)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(bias, tx.init(bias))


def test_muon_compiles_in_bfloat16_and_keeps_the_parameters_dtype():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))
  tx = optim.airbench_muon(0.24, 0.6)
  updates, _ = jax.jit(tx.update)(kernel, tx.init(kernel), kernel)
  assert updates.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(updates)))


# ---------------------------------------------------------------------------------------------
# The recipe's optimiser as a whole (configs/cifar10_airbench94_muon.py through
# `optim.create_optimizer`), against airbench94_muon.py's two optimisers transcribed: PyTorch
# SGD parameter groups (lr, weight_decay = wd / lr, Nesterov momentum 0.85) for the whitening
# bias, the BatchNorm offsets and the head, and Muon for the convolution filters; each group's
# lr set before every step, the whitening bias's to 0 over its own steps and then no gradient.

def _torch_sgd_steps(p, grads, learning_rates, weight_decay, momentum=0.85):
  """torch.optim.SGD(nesterov=True) on one parameter, transcribed: the parameter after each
  step that has a gradient (None: the parameter is skipped, as PyTorch skips it)."""
  buf, out = None, []
  for g, lr in zip(grads, learning_rates):
    if g is not None:
      d = g + weight_decay * p
      buf = d if buf is None else momentum * buf + d
      p = p - lr * (d + momentum * buf)
    out.append(p)
  return out


def _recipe_config(steps_per_epoch):
  from configs import cifar10_airbench94_muon

  config = cifar10_airbench94_muon.get_config()
  config.num_epochs = 3  # 3 x 2 = 6 steps, every schedule spanning them
  config.freeze.late_epochs = 1  # the whitening bias trains 2 steps, its lr to 0 over them
  return config, 3 * steps_per_epoch, 1 * steps_per_epoch


def test_the_muon_recipes_optimiser_is_airbench94_muons(monkeypatch):
  monkeypatch.setattr(optim, "MUON_DTYPE", jnp.float32)
  steps_per_epoch = 2
  config, total, whiten_steps = _recipe_config(steps_per_epoch)
  rng = np.random.default_rng(3)
  torch_params = {  # PyTorch layouts
      "whiten/kernel": rng.normal(size=(6, 3, 2, 2)), "whiten/bias": rng.normal(size=6),
      "group1/conv1/kernel": rng.normal(size=(8, 6, 3, 3)),
      "group1/norm1/offset": rng.normal(size=8), "head/kernel": rng.normal(size=(4, 8)),
  }
  num_steps = 5
  grads = {name: [rng.normal(size=p.shape) for _ in range(num_steps)]
           for name, p in torch_params.items()}
  wd, bias_lr, head_lr = 2e-6 * 2000, 0.053, 0.67  # airbench94_muon's numbers
  decay = [1 - step / total for step in range(num_steps)]
  expected = {
      "whiten/kernel": [torch_params["whiten/kernel"]] * num_steps,  # requires_grad=False
      "whiten/bias": _torch_sgd_steps(
          torch_params["whiten/bias"],
          [g if step < whiten_steps else None for step, g in enumerate(grads["whiten/bias"])],
          [bias_lr * (1 - step / whiten_steps) for step in range(num_steps)], wd / bias_lr),
      "group1/norm1/offset": _torch_sgd_steps(torch_params["group1/norm1/offset"],
                                              grads["group1/norm1/offset"],
                                              [bias_lr * f for f in decay], wd / bias_lr),
      "head/kernel": _torch_sgd_steps(torch_params["head/kernel"], grads["head/kernel"],
                                      [head_lr * f for f in decay], wd / head_lr),
      "group1/conv1/kernel": _numpy_muon_steps(torch_params["group1/conv1/kernel"],
                                               grads["group1/conv1/kernel"],
                                               [0.24 * f for f in decay], 0.6, True),
  }

  def to_flax(name, value):
    value = _to_hwio(value) if value.ndim == 4 else value.T if value.ndim == 2 else value
    return jnp.asarray(value, jnp.float32)

  def tree(values):
    nested = {}
    for name, value in values.items():
      *outer, leaf = name.split("/")
      node = nested
      for key in outer:
        node = node.setdefault(key, {})
      node[leaf] = to_flax(name, value)
    return nested

  tx = built.optimizer(config, built.budget(config, steps_per_epoch))
  params = tree(torch_params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(num_steps):
    updates, state = update(tree({name: g[step] for name, g in grads.items()}), state, params)
    params = optax.apply_updates(params, updates)
    want = tree({name: values[step] for name, values in expected.items()})
    for (path, got), (_, wanted) in zip(jax.tree_util.tree_leaves_with_path(params),
                                        jax.tree_util.tree_leaves_with_path(want)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(wanted), rtol=2e-5, atol=2e-5,
                                 err_msg=f"{optim.parameter_name(path)} after step {step}")


# ---------------------------------------------------------------------------------------------
# hiverge/cifar10-speedrun's Muon (configs/cifar10_speedrun.py): other coefficients, a weight
# decay after the update, and the kernels re-normalised on a schedule that thins out.

HIVERGE_COEFFICIENTS = (3.4576, -4.7391, 2.0843)  # copied from cifar10_speedrun.py


def _hiverge_normalised_steps(total, period=2, growth=15):
  """The steps (from 1) at which cifar10_speedrun.py's Muon.step re-normalises, transcribed
  with its float arithmetic: norm_freq = 2 + int(15 * step_count / total_train_steps)."""
  last, marked = 0, []
  for step_count in range(1, total + 1):
    if step_count - last >= period + int(growth * (step_count / total)):
      last = step_count
      marked.append(step_count)
  return marked


@pytest.mark.parametrize("total", [20, 200, 243, 476])
def test_the_normalisation_schedule_is_hiverges(total):
  table = optim.normalization_steps(total, 2, 15)
  assert list(np.flatnonzero(table) + 1) == _hiverge_normalised_steps(total)
  if total >= 200:  # every other step at first
    assert list(np.flatnonzero(table[:8]) + 1) == [2, 4, 6, 8]
  assert np.all(np.diff(np.flatnonzero(table)) <= 17)
  assert optim.normalization_steps(total, 1, 0) is None  # every step: no table


def _hiverge_muon_steps(p, grads, learning_rates, total, momentum, weight_decay):
  """cifar10_speedrun.py's Muon.step (Nesterov) on one (out, in, kh, kw) parameter,
  transcribed in float64: the parameter after each step."""
  a, b, c = HIVERGE_COEFFICIENTS
  buf, last_norm_step, out = np.zeros_like(p), 0, []
  for step_count, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
    norm_freq = 2 + int(15 * (step_count / total))
    buf = momentum * buf + g
    g = g + momentum * buf
    x = g.reshape(len(g), -1)
    x = x / (np.linalg.norm(x) + 1e-5)
    for _ in range(3):  # 8 x 36: never transposed
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    if step_count - last_norm_step >= norm_freq:
      last_norm_step = step_count
      p = p * (len(p) ** 0.5 / (np.linalg.norm(p) + 1e-7))
    p = p - lr * x.reshape(p.shape)
    p = p * (1 - lr * weight_decay)
    out.append(p)
  return out


def test_muon_steps_match_hiverges_muon_step():
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(8, 4, 3, 3))
  total, peak, momentum, wd = 12, 0.205, 0.655, 0.05  # a large decay, to be seen in 12 steps
  grads = [rng.normal(size=kernel.shape) for _ in range(total)]
  learning_rates = [peak * (1 - step / total) for step in range(total)]
  expected = _hiverge_muon_steps(kernel, grads, learning_rates, total, momentum, wd)
  tx = optim.airbench_muon(lambda count: peak * (1 - count / total), momentum,
                           orthogonalisation=optim.NewtonSchulz(3, HIVERGE_COEFFICIENTS,
                                                                jnp.float32),
                           weight_decay=wd,
                           normalize_steps=optim.normalization_steps(total, 2, 15))
  params = jnp.asarray(_to_hwio(kernel), jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step, (grad, want) in enumerate(zip(grads, expected)):
    updates, state = update(jnp.asarray(_to_hwio(grad), jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), _to_hwio(want), rtol=1e-4, atol=2e-5,
                               err_msg=f"after step {step}")
  # Not normalised at step 1 (as it would be every step): the schedule matters.
  every_step = _numpy_muon_steps(kernel, grads[:1], learning_rates[:1], momentum, True)
  assert not np.allclose(expected[0], every_step[0] * (1 - learning_rates[0] * wd), atol=1e-3)
