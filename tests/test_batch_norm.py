"""BatchNorm in oneDNN (`ops.batch_norm`, `model.batch_norm_implementation`) against its
definition in float64 numpy and against the pure-JAX path, which stays."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from convnet_jax import models
from convnet_jax.errors import UserError
from convnet_jax.models import layers
from convnet_jax.ops import batch_norm as norm_lib
from convnet_jax.ops import onednn
from convnet_jax.runs import validation
from convnet_jax.runs import workdir as workdir_lib

pytestmark = pytest.mark.xdist_group("conv")


@pytest.fixture(scope="module", autouse=True)
def extension_loaded():
  """Where these tests run (Linux x86-64, as CI) the extension must load: never a skip."""
  status = onednn.load()
  assert status.available, status.detail


def numpy_batch_norm(x, epsilon, relu, offset=0.0):
  """The definition in float64: per channel over N, H, W, y = (x - mean) / sqrt(var + eps) with
  the biased variance, plus the per-channel offset, then max(y, 0) when relu."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=(0, 1, 2))
  variance = ((x - mean) ** 2).mean(axis=(0, 1, 2))
  y = (x - mean) / np.sqrt(variance + epsilon) + np.asarray(offset, np.float64)
  return np.maximum(y, 0) if relu else y


def numpy_batch_norm_gradient(x, g, epsilon, relu, offset=0.0):
  """dL/dx for output gradient g: through the ReLU (g where y + offset > 0), then batch
  normalisation's gradient written out by hand, dx = (g - mean(g) - y mean(g y)) / std over the
  M = N H W values of a channel (from dy_i/dx_j = (delta_ij - 1/M - y_i y_j / M) / std)."""
  return _numpy_gradients(x, g, epsilon, relu, offset)[0]


def _numpy_gradients(x, g, epsilon, relu, offset=0.0):
  """(dL/dx, dL/doffset): the offset's is the sum over N, H, W of g past the ReLU."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  mean = x.mean(axis=(0, 1, 2))
  std = np.sqrt(((x - mean) ** 2).mean(axis=(0, 1, 2)) + epsilon)
  y = (x - mean) / std
  if relu:
    g = np.where(y + np.asarray(offset, np.float64) > 0, g, 0.0)
  axes = (0, 1, 2)
  return (g - g.mean(axis=axes) - y * (g * y).mean(axis=axes)) / std, g.sum(axis=axes)


SHAPES = [(4, 6, 6, 16), (3, 5, 7, 48), (8, 4, 4, 32), (2, 31, 31, 64)]


def _inputs(shape, seed=0):
  x = 3.0 * jax.random.normal(jax.random.key(seed), shape) + 1.5
  g = jax.random.normal(jax.random.key(seed + 1), shape)
  return x, g


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradient_match_the_definition(shape, relu):
  x, g = _inputs(shape)
  y, vjp = jax.vjp(lambda x: norm_lib.batch_norm_relu_onednn(x, 1e-5, relu), x)
  np.testing.assert_allclose(y, numpy_batch_norm(x, 1e-5, relu), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(vjp(g)[0], numpy_batch_norm_gradient(x, g, 1e-5, relu),
                             rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_the_offset_comes_before_the_relu_and_gets_its_gradient(relu):
  x, g = _inputs((3, 5, 7, 48))
  offset = jnp.linspace(-2.0, 2.0, 48)
  y, vjp = jax.vjp(lambda x, o: norm_lib.batch_norm_relu_onednn(x, 1e-5, relu, o), x, offset)
  np.testing.assert_allclose(y, numpy_batch_norm(x, 1e-5, relu, offset), rtol=1e-5, atol=2e-6)
  dx, doffset = vjp(g)
  expected_dx, expected_doffset = _numpy_gradients(x, g, 1e-5, relu, offset)
  np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(doffset, expected_doffset, rtol=1e-5, atol=1e-4)


def test_bfloat16_maps_where_the_cpu_has_bfloat16_arithmetic():
  """bfloat16 in and out, float32 inside: each output is the float64 definition at the same
  (bfloat16) inputs, offset included, rounded once (to 2^-8 of its size); elsewhere (AVX2)
  oneDNN would emulate it, so such maps are refused (the module keeps them to the pure-JAX
  path)."""
  x, g = _inputs((4, 6, 6, 32))
  x, g = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  offset = jnp.linspace(-1.0, 1.0, 32)
  if not onednn.load().bf16_native:
    assert not norm_lib.supports(x)
    with pytest.raises(ValueError, match="bfloat16 where the CPU has bfloat16 arithmetic"):
      norm_lib.batch_norm_relu_onednn(x, 1e-5, True, offset)
    return
  assert norm_lib.supports(x)
  y, vjp = jax.vjp(lambda x, o: norm_lib.batch_norm_relu_onednn(x, 1e-5, True, o), x, offset)
  dx, doffset = vjp(g)
  assert (y.dtype, dx.dtype, doffset.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  expected_dx, expected_doffset = _numpy_gradients(x, g, 1e-5, True, offset)
  for got, expected in ((y, numpy_batch_norm(x, 1e-5, True, offset)), (dx, expected_dx)):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2 ** -8, atol=1e-5)
  np.testing.assert_allclose(doffset, expected_doffset, rtol=1e-5, atol=1e-4)


def test_airbench_epsilon_and_a_constant_channel():
  """airbench's epsilon (1e-12, the offsets alone are learnt) and a channel with no variance:
  that channel's output is 0 and so is its gradient, as the definition gives."""
  epsilon = 1e-12
  x, g = _inputs((4, 5, 5, 16))
  x = x.at[..., 2].set(0.75)
  y, vjp = jax.vjp(lambda x: norm_lib.batch_norm_relu_onednn(x, epsilon, False), x)
  np.testing.assert_allclose(y, numpy_batch_norm(x, epsilon, False), rtol=1e-5, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(y)[..., 2], 0.0)
  np.testing.assert_allclose(vjp(g)[0], numpy_batch_norm_gradient(x, g, epsilon, False),
                             rtol=1e-4, atol=2e-5)


def test_under_jit_scan_and_vmap_each_replica_has_its_own_statistics():
  x, g = _inputs((4, 6, 6, 16))
  batch = jnp.stack([x, 2.0 * x - 1.0, x[::-1] ** 2])

  def loss(x):
    return jnp.sum(g * norm_lib.batch_norm_relu_onednn(x, 1e-5, True))

  def scanned(x):
    _, gradients = jax.lax.scan(lambda c, x: (c, jax.grad(loss)(x)), None, x)
    return gradients

  replicas = jax.jit(jax.vmap(lambda x: norm_lib.batch_norm_relu_onednn(x, 1e-5, True)))(batch)
  gradients = jax.jit(scanned)(batch)
  for index in range(3):
    np.testing.assert_allclose(replicas[index], numpy_batch_norm(batch[index], 1e-5, True),
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(gradients[index],
                               numpy_batch_norm_gradient(batch[index], g, 1e-5, True),
                               rtol=1e-4, atol=2e-5)


def _assert_runs_onednn(function, argument, expected: bool):
  """Whether `function`'s program calls oneDNN's BatchNorm is `expected`."""
  jaxpr = str(jax.make_jaxpr(function)(argument))
  assert ("convnet_onednn_batch_norm_forward" in jaxpr) == expected


def _assert_trees_close(ours, theirs, rtol):
  for mine, reference in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs),
                             strict=True):
    np.testing.assert_allclose(mine, reference, rtol=rtol, atol=2e-5)


_FLOAT32_FORMS = [{}, {"relu": True}, {"use_offset": True, "relu": True},
                  {"use_scale_and_offset": True, "relu": True},
                  {"use_offset": True, "epsilon": 1e-12}]
# airbench's (offset, then its activation) and an offset before a ReLU.
_BFLOAT16_FORMS = [{"use_offset": True, "epsilon": 1e-12}, {"use_offset": True, "relu": True}]


@pytest.mark.parametrize("dtype, options",
                         [("float32", options) for options in _FLOAT32_FORMS]
                         + [("bfloat16", options) for options in _BFLOAT16_FORMS])
def test_the_module_matches_its_pure_jax_path(dtype, options):
  """Every BatchNorm form the models use: oneDNN's output and the gradients of the input and of
  the scale and offset match the "jax" path's (the parameters set away from their initial
  values, so that the ReLU after the offset is tested where it differs from one before). In
  bfloat16 (through oneDNN where the CPU has bfloat16 arithmetic) both compute in float32 and
  round once, so they agree to a rounding (2^-8)."""
  x, g = (a.astype(dtype) for a in _inputs((6, 5, 5, 32)))
  modules = {name: layers.BatchNorm(implementation=name, **options) for name in ("jax", "onednn")}
  params = modules["jax"].init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2),
                                                                         p.shape), params)
  results = {}
  for name, module in modules.items():
    y, vjp = jax.vjp(lambda params, x: module.apply(params, x), params, x)
    results[name] = (y, *vjp(g))
    _assert_runs_onednn(lambda x: module.apply(params, x), x,
                        name == "onednn" and (dtype == "float32" or onednn.load().bf16_native))
  if dtype == "float32":
    _assert_trees_close(results["onednn"], results["jax"], rtol=1e-4)
    return
  for mine, reference in zip(jax.tree_util.tree_leaves(results["onednn"]),
                             jax.tree_util.tree_leaves(results["jax"]), strict=True):
    assert mine.dtype == reference.dtype
    np.testing.assert_allclose(np.asarray(mine, np.float64), np.asarray(reference, np.float64),
                               rtol=2 ** -8, atol=1e-3)


def test_odd_channel_counts_scaled_bfloat16_and_population_statistics_keep_to_the_pure_jax_path():
  x, _ = _inputs((4, 5, 5, 16))
  module = layers.BatchNorm(implementation="onednn", relu=True)
  for maps in (x[..., :4], x[..., :8]):
    _assert_runs_onednn(lambda x: module.apply({}, x), maps, False)
  # bfloat16 maps run in oneDNN where it has bfloat16 arithmetic, unless a scale follows (it
  # would come after oneDNN's rounding).
  maps = x.astype(jnp.bfloat16)
  _assert_runs_onednn(lambda x: module.apply({}, x), maps, onednn.load().bf16_native)
  scaled = layers.BatchNorm(implementation="onednn", use_scale_and_offset=True)
  params = scaled.init(jax.random.key(0), maps)
  _assert_runs_onednn(lambda x: scaled.apply(params, x), maps, False)
  with pytest.raises(ValueError, match="multiple of 16 channels"):
    norm_lib.batch_norm_relu_onednn(x[..., :4], 1e-5, False)
  population = {layers.POPULATION: {"mean": jnp.full((16,), 1.5),
                                    "variance": jnp.full((16,), 9.0)}}
  y = module.apply(population, x)
  np.testing.assert_allclose(y, np.maximum((np.asarray(x) - 1.5) / np.sqrt(9.0 + 1e-5), 0),
                             rtol=1e-5, atol=1e-6)


def _model(name, batch_norm_implementation):
  model_config = default_config.get_config().model
  # The smallest widths whose BatchNorms all run in oneDNN (multiples of 16 channels).
  model_config.name, model_config.resnet.width = name, 16
  model_config.airbench.widths = (16, 32, 32)
  model_config.conv_implementation = "onednn"
  model_config.batch_norm_implementation = batch_norm_implementation
  return models.create_model(model_config, num_classes=10)


@pytest.mark.parametrize("name", ["seed_convnet", pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("airbench94", marks=pytest.mark.slow)])
def test_each_model_gives_the_same_logits_and_gradients_with_either_path(name):
  images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  results = {}
  for implementation in ("jax", "onednn"):
    model = _model(name, implementation)
    params = model.init(jax.random.key(0), images)
    # airbench's whitening is zeros until the data fills it in (and its BatchNorm's epsilon is
    # 1e-12): moved away from zero, every BatchNorm sees maps with a variance.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(4), p.shape), params)

    def loss(params):
      logits = model.apply(params, images)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), logits

    results[implementation] = jax.jit(jax.grad(loss, has_aux=True))(params)
    _assert_runs_onednn(lambda p: model.apply(p, images), params, implementation == "onednn")
  _assert_trees_close(results["onednn"], results["jax"], rtol=2e-3)


def test_how_batch_norm_is_computed_is_not_part_of_a_runs_identity():
  """A workdir resumes whichever BatchNorm path it started with (the same function)."""
  config = default_config.get_config()
  values = json.loads(config.to_json_best_effort())
  other = json.loads(config.to_json_best_effort())
  other["model"]["batch_norm_implementation"] = "jax"
  assert workdir_lib.identity(values) == workdir_lib.identity(other)
  other["model"]["conv_implementation"] = "im2col"
  assert workdir_lib.identity(values) != workdir_lib.identity(other)


def test_auto_follows_the_convolutions_and_a_bad_value_is_one_line():
  assert layers.choose_batch_norm_implementation("auto", "onednn") == "onednn"
  assert layers.choose_batch_norm_implementation("auto", "im2col") == "jax"
  assert layers.choose_batch_norm_implementation("jax", "onednn") == "jax"
  config = default_config.get_config()
  config.model.batch_norm_implementation = "cudnn"
  with pytest.raises(UserError, match=r"^config\.model\.batch_norm_implementation='cudnn': "
                                      r"expected one of \('auto', 'jax', 'onednn'\)$"):
    validation.validate_config(config)
