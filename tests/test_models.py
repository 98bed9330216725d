"""The model against the specification and against an independent numpy implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import default as default_config

from convnet_jax import models
from convnet_jax.ops import conv


def numpy_conv(x, w):
  """Direct definition of a stride-1 'SAME' convolution, output pixel by output pixel."""
  kh, kw, _, cout = w.shape
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros((n, h, wd, cout))
  for i in range(h):
    for j in range(wd):
      window = xp[:, i:i + kh, j:j + kw, :]
      out[:, i, j, :] = np.tensordot(window, w, axes=([1, 2, 3], [0, 1, 2]))
  return out


def central_differences(loss, x, step=1e-6):
  """The gradient of a float64 numpy `loss` at `x` by central differences, flattened."""
  steps = np.eye(x.size).reshape(-1, *x.shape) * step
  return np.array([(loss(x + e) - loss(x - e)) / (2 * step) for e in steps])


def numpy_batch_norm(x, eps=1e-5):
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean) ** 2).mean(axis=(0, 1, 2))  # biased
  return (x - mean) / np.sqrt(var + eps)


def numpy_seed_convnet(params, x, norm=None):
  """The specification's network written out in float64 numpy; `norm(name, x)`, if given,
  normalises the input of the BatchNorm `name` ("stem_bn", "block1/bn", ...) in place of the
  batch's own statistics."""
  norm = norm or (lambda name, a: numpy_batch_norm(a))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  relu = lambda a: np.maximum(a, 0)

  def pool(a):
    n, h, w, c = a.shape
    return a.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  def block(a, name):
    q = p[name]
    return relu(norm(f"{name}/bn", numpy_conv(a, q["conv"]["kernel"]))) + \
        numpy_conv(a, q["skip"]["kernel"])

  a = relu(norm("stem_bn", numpy_conv(x, p["stem_conv"]["kernel"])))
  a = pool(block(a, "block1"))
  a = pool(block(a, "block2"))
  a = block(a, "block3").max(axis=(1, 2))
  return 0.125 * (a @ p["head"]["kernel"])


def make_model(conv_implementation="im2col", dtype="float32"):
  model_config = default_config.get_config().model  # the seed convnet
  model_config.dtype, model_config.conv_implementation = dtype, conv_implementation
  return models.create_model(model_config, num_classes=2)


def init_params(model, seed=0, size=8):
  # Compiled as one program: op by op, each of the init's small operations compiles on its own.
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]


def test_batch_norm_matches_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(4, 5, 5, 3)) * np.array([1.0, 10.0, 0.1])
  got = models.batch_norm(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), numpy_batch_norm(x), atol=1e-4)


def test_batch_norm_module_has_no_state_and_optional_affine():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
  plain = models.BatchNorm()
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree_util.tree_leaves(variables) == []  # no parameters, no running statistics
  affine = models.BatchNorm(use_scale_and_offset=True)
  variables = affine.init(jax.random.key(0), x)
  scale = jnp.arange(1.0, 5.0)
  offset = jnp.full((4,), 0.5)
  got = affine.apply({"params": {"scale": scale, "offset": offset}}, x)
  expected = numpy_batch_norm(np.asarray(x, np.float64)) * np.arange(1.0, 5.0) + 0.5
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
  assert variables["params"]["scale"].shape == (4,)


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla", "hybrid"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_convolution_matches_direct_definition(implementation, kernel_size):
  rng = np.random.default_rng(kernel_size)
  x = rng.normal(size=(2, 5, 6, 3))
  w = rng.normal(size=(kernel_size, kernel_size, 3, 4))
  got = conv.CONV_IMPLEMENTATIONS[implementation](jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), numpy_conv(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla", "hybrid"])
def test_convolution_gradients_match_the_linear_map(implementation):
  """The convolution is linear in each argument, so d<conv(x, w), r>/dw[k] = <conv(x, e_k), r>
  with e_k the k-th basis kernel (and likewise for x), computed with the direct definition."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(2, 4, 4, 2))
  w = rng.normal(size=(3, 3, 2, 3))
  r = rng.normal(size=(2, 4, 4, 3))
  conv_fn = conv.CONV_IMPLEMENTATIONS[implementation]
  loss = lambda x, w: jnp.sum(conv_fn(x, w) * jnp.asarray(r, jnp.float32))
  grad_x, grad_w = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32),
                                                  jnp.asarray(w, jnp.float32))
  expected_w = np.zeros(w.size)
  for k in range(w.size):
    expected_w[k] = np.sum(numpy_conv(x, np.eye(w.size)[k].reshape(w.shape)) * r)
  expected_x = np.zeros(x.size)
  for k in range(x.size):
    expected_x[k] = np.sum(numpy_conv(np.eye(x.size)[k].reshape(x.shape), w) * r)
  np.testing.assert_allclose(np.asarray(grad_w).reshape(-1), expected_w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad_x).reshape(-1), expected_x, rtol=1e-4, atol=1e-4)


def test_parameter_shapes_and_count():
  params = init_params(make_model())
  shapes = {"/".join(path): leaf.shape for path, leaf in
            _flatten(params)}
  assert shapes == {
      "stem_conv/kernel": (3, 3, 3, 16),
      "block1/conv/kernel": (3, 3, 16, 32), "block1/skip/kernel": (1, 1, 16, 32),
      "block2/conv/kernel": (3, 3, 32, 64), "block2/skip/kernel": (1, 1, 32, 64),
      "block3/conv/kernel": (3, 3, 64, 128), "block3/skip/kernel": (1, 1, 64, 128),
      "head/kernel": (128, 2),
  }
  assert models.count_parameters(params) == 108_208


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def test_initial_weights_are_uniform_within_and_spanning_their_bounds():
  params = init_params(make_model(), seed=3)
  fan_ins = {"stem_conv/kernel": 27, "block1/conv/kernel": 144, "block1/skip/kernel": 16,
             "block2/conv/kernel": 288, "block2/skip/kernel": 32,
             "block3/conv/kernel": 576, "block3/skip/kernel": 64, "head/kernel": 128}
  for path, leaf in _flatten(params):
    name = "/".join(path)
    bound = math.sqrt(1.0 / fan_ins[name])
    w = np.asarray(leaf)
    assert np.all(np.abs(w) <= bound), name
    assert w.max() > 0.9 * bound and w.min() < -0.9 * bound, name  # spans the interval
    # Uniform on [-s, s] has std s / sqrt(3).
    assert abs(w.std() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name


def test_layer_output_shapes_follow_the_specification():
  model = make_model()
  params = init_params(model)
  lines = models.describe_shapes(model, params, jax.ShapeDtypeStruct((128, 32, 32, 3),
                                                                    jnp.float32))
  assert lines == [
      "stem_conv (Conv): (128, 32, 32, 3) -> (128, 32, 32, 16)",
      "stem_bn (BatchNorm): (128, 32, 32, 16) -> (128, 32, 32, 16)",
      "block1 (ResidualBlock): (128, 32, 32, 16) -> (128, 32, 32, 32)",
      "block2 (ResidualBlock): (128, 16, 16, 32) -> (128, 16, 16, 64)",
      "block3 (ResidualBlock): (128, 8, 8, 64) -> (128, 8, 8, 128)",
      "head (Dense): (128, 128) -> (128, 2)",
  ]


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla", "hybrid"])
def test_forward_pass_matches_numpy_reference(implementation):
  model = make_model(implementation)
  params = init_params(model, seed=5)
  x = np.random.default_rng(7).normal(size=(4, 8, 8, 3))
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), numpy_seed_convnet(params, x), rtol=1e-3,
                             atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  model = make_model(dtype="bfloat16")
  params = init_params(model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
  x = np.random.default_rng(7).normal(size=(4, 8, 8, 3))
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(x, jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_seed_convnet(params, x), atol=0.05)


def test_batch_norm_gradient_matches_finite_differences():
  """The closed-form batch-norm gradient against central differences of the formula in
  float64 numpy."""
  rng = np.random.default_rng(5)
  x = rng.normal(1.0, 2.0, size=(3, 2, 2, 2))
  r = rng.normal(size=x.shape)
  expected = central_differences(lambda x: np.sum(numpy_batch_norm(x) * r), x)
  got = jax.grad(lambda x: jnp.sum(models.batch_norm(x) * jnp.asarray(r, jnp.float32)))(
      jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got).reshape(-1), expected, atol=2e-4)


def test_bfloat16_batch_norm_gives_the_float64_gradient_rounded_once():
  """A bfloat16 BatchNorm computes in float32: its gradient is the float64 formula's at the same
  (bfloat16) values, rounded once."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 2, 2, 2)), jnp.bfloat16)
  r = rng.normal(size=x.shape)
  loss = lambda v: jnp.sum(models.batch_norm(v).astype(jnp.float32) * jnp.asarray(r, jnp.float32))
  expected = central_differences(lambda v: np.sum(numpy_batch_norm(v) * r),
                                 np.asarray(x, np.float64))
  got = jax.grad(loss)(x)
  assert got.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: the float32 gradient rounded once, to 2^-8 relative.
  np.testing.assert_allclose(np.asarray(got, np.float64).reshape(-1), expected,
                             rtol=2 ** -8, atol=2e-3)


def _first_maximum_gradient(x, g):
  """PyTorch's MaxPool2d(2) gradient, window by window: the whole of each window's gradient at
  its first maximum in row-major order (numpy's argmax takes the first too)."""
  expected = np.zeros_like(x)
  for n, i, j, c in np.ndindex(g.shape):
    window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
    row, column = np.unravel_index(np.argmax(window), (2, 2))
    expected[n, 2 * i + row, 2 * j + column, c] = g[n, i, j, c]
  return expected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_gradient_goes_to_the_first_maximum_as_in_pytorch(dtype):
  """Each 2x2 window passes its whole gradient to its first maximum: by hand on windows with
  the maximum alone and tied at two, three and four positions, then on small integers (ties
  everywhere, every position first somewhere)."""

  def gradient_and_expected(x, g):
    _, vjp = jax.vjp(models.max_pool_2x2, jnp.asarray(x, dtype))
    rounded_g = np.asarray(jnp.asarray(g, dtype), np.float64)
    got = np.asarray(vjp(jnp.asarray(g, dtype))[0], np.float64)
    return got, _first_maximum_gradient(x, rounded_g)

  x = np.array([[1, 5, 2, 2], [3, 0, 2, 2], [7, 7, 0, 9], [7, 1, 9, 9]], np.float64)
  x = np.stack([x, -x], axis=-1)[None]  # (1, 4, 4, 2): a second channel with other maxima
  pooled = models.max_pool_2x2(jnp.asarray(x, dtype))
  np.testing.assert_array_equal(np.asarray(pooled[0, :, :, 0], np.float64), [[5, 2], [7, 9]])
  got, expected = gradient_and_expected(x, np.random.default_rng(6).normal(size=(1, 2, 2, 2)))
  # Channel 0's windows: 5 alone at (0, 1); 2 at all four; 7 at three; 9 at three, from (0, 1).
  assert [tuple(np.argwhere(got[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0])[0])
          for i in range(2) for j in range(2)] == [(0, 1), (0, 0), (0, 0), (0, 1)]
  np.testing.assert_array_equal(got, expected)
  rng = np.random.default_rng(7)
  got, expected = gradient_and_expected(rng.integers(0, 3, size=(2, 6, 6, 3)).astype(np.float64),
                                        rng.normal(size=(2, 3, 3, 3)))
  np.testing.assert_array_equal(got, expected)
