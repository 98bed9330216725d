"""The layers every model family shares: batch-statistics BatchNorm, the convolution module,
the 2x2 max-pool and the initialisers.

BatchNorm normalises with the statistics of the batch at hand, in training and in evaluation;
there are no running averages and no mutable state. Only after training, to evaluate or predict
on small batches, may a `population` collection of statistics be given instead
(`convnet_jax.trained`: precise BatchNorm, computed from training images once).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet_jax.ops import batch_norm as norm_lib
from convnet_jax.ops import conv as conv_lib

BATCH_NORM_EPSILON = 1e-5
# Flax variable collections of BatchNorm, both absent in training: `model.apply(..., mutable=
# [BATCH_STATISTICS])` records each BatchNorm's batch mean and variance as it normalises;
# `{"params": ..., POPULATION: ...}` normalises with those statistics (each layer's "mean" and
# "variance") in place of the batch's.
BATCH_STATISTICS = "batch_statistics"
POPULATION = "population"


def batch_norm(x: jax.Array, epsilon: float = BATCH_NORM_EPSILON) -> jax.Array:
  """Normalises `x` (NHWC) per channel with the mean and biased variance of this batch.

  Equivalent to PyTorch `BatchNorm2d(C, eps, momentum=None, affine=False,
  track_running_stats=False)`. Statistics are computed in float32 whatever the input dtype.
  """
  return _normalize(x.astype(jnp.float32), epsilon).astype(x.dtype)


_STATISTICS_AXES = (0, 1, 2)


def _mean_and_variance(x: jax.Array):
  mean = jnp.mean(x, axis=_STATISTICS_AXES)
  # Two passes (variance of the centred values), as the formula reads: the one-pass
  # E[x^2]-E[x]^2 loses precision when |mean| >> std.
  return mean, jnp.mean(jnp.square(x - mean), axis=_STATISTICS_AXES)


def _statistics(x: jax.Array, epsilon: float):
  mean, variance = _mean_and_variance(x)
  return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, epsilon: float) -> jax.Array:
  mean, inverse_std = _statistics(x, epsilon)
  return (x - mean) * inverse_std


def _normalize_forward(x, epsilon):
  mean, inverse_std = _statistics(x, epsilon)
  return (x - mean) * inverse_std, (x, mean, inverse_std)


def _normalize_backward(epsilon, residuals, output_gradient):
  # The closed-form gradient of batch normalisation, y = (x - mean) / std over N values per
  # channel: dx = (g - mean(g) - y * mean(g * y)) / std. The same derivative autodiff takes,
  # in two reductions and one elementwise pass instead of the ~7 passes of the traced chain.
  x, mean, inverse_std = residuals
  y = (x - mean) * inverse_std
  mean_gradient = jnp.mean(output_gradient, axis=_STATISTICS_AXES)
  mean_projection = jnp.mean(output_gradient * y, axis=_STATISTICS_AXES)
  return ((output_gradient - mean_gradient - y * mean_projection) * inverse_std,)


_normalize.defvjp(_normalize_forward, _normalize_backward)


def choose_batch_norm_implementation(requested: str, conv_implementation: str) -> str:
  """`config.model.batch_norm_implementation` resolved: "auto" is "onednn" beside oneDNN's
  convolutions (its batch normalisation primitive, `ops.batch_norm`) and "jax" elsewhere; the
  others are as asked (validation has checked that oneDNN loads where it is asked for)."""
  if requested == "auto":
    return "onednn" if conv_implementation == "onednn" else "jax"
  return requested


class BatchNorm(nn.Module):
  """Batch-statistics BatchNorm with no running averages; optionally a learnable scale and
  offset (`use_scale_and_offset`, init 1 and 0) or a learnable offset alone (`use_offset`, the
  scale fixed at 1, as airbench has it), and a ReLU after it all (`relu`).

  `implementation` "onednn" normalises maps of a multiple of 16 channels with oneDNN's
  primitive: float32 ones, and bfloat16 ones where the CPU has bfloat16 arithmetic and there is
  no scale (the offset and the ReLU go in the same pass, before its one rounding; a scale would
  come after it). Other maps, a batch split over a data-parallel mesh and the statistics below
  run the pure-JAX path ("jax"), which computes the same function.

  After training only: with a mutable `BATCH_STATISTICS` collection it also records the batch's
  mean and (biased) variance; given a `POPULATION` collection it normalises with its "mean" and
  "variance" instead."""

  use_scale_and_offset: bool = False
  use_offset: bool = False
  epsilon: float = BATCH_NORM_EPSILON
  relu: bool = False
  implementation: str = "jax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = offset = None
    if self.use_scale_and_offset:
      scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    if self.use_scale_and_offset or self.use_offset:
      offset = self.param("offset", nn.initializers.zeros, (channels,), jnp.float32)
    # In float32 to the end, scale and offset included, then returned in the input's dtype:
    # one rounding in a bfloat16 run instead of one per operation.
    x32 = x.astype(jnp.float32)
    # (In `init` every collection is mutable: nothing is recorded there.)
    if self.is_mutable_collection(BATCH_STATISTICS) and not self.is_initializing():
      mean, variance = _mean_and_variance(x32)
      self.sow(BATCH_STATISTICS, "mean", mean)
      self.sow(BATCH_STATISTICS, "variance", variance)
    if self.has_variable(POPULATION, "mean"):
      mean = self.get_variable(POPULATION, "mean")
      variance = self.get_variable(POPULATION, "variance")
      y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
    elif self._runs_onednn(x):
      if scale is None:
        # The offset and the ReLU in oneDNN's pass, before its one rounding.
        return norm_lib.batch_norm_relu_onednn(x, self.epsilon, self.relu, offset)
      y = norm_lib.batch_norm_relu_onednn(x, self.epsilon, relu=False)
    else:
      y = _normalize(x32, self.epsilon)
    if scale is not None:
      y = y * scale
    if offset is not None:
      y = y + offset
    if self.relu:
      y = nn.relu(y)
    return y.astype(x.dtype)

  def _runs_onednn(self, x: jax.Array) -> bool:
    # Maps `ops.batch_norm` takes (float32, or bfloat16 without a scale: see above), on one
    # device only; `init` needs no custom call.
    return (self.implementation == "onednn" and norm_lib.supports(x)
            and (x.dtype == jnp.float32 or not self.use_scale_and_offset)
            and not self.is_initializing() and conv_lib.split_mesh(x.shape[0]) is None)


def fan_in_uniform() -> nn.initializers.Initializer:
  """U(-s, s) with s = sqrt(1 / fan_in), fan_in = all kernel dimensions but the output one.

  That is kh*kw*in_channels for an HWIO convolution kernel and in_dim for a dense kernel,
  the specification's (and PyTorch's default-style) initialisation.
  """

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    fan_in = math.prod(shape[:-1])
    bound = math.sqrt(1.0 / fan_in)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def uniform_bias(fan_in: int) -> nn.initializers.Initializer:
  """U(-s, s) with s = sqrt(1 / fan_in) for a bias, PyTorch's default for `nn.Linear` (the bias'
  own shape does not carry the fan-in, so it is given)."""
  bound = math.sqrt(1.0 / fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def dirac_then_fan_in_uniform() -> nn.initializers.Initializer:
  """`fan_in_uniform` for an HWIO kernel, except that the first `in_channels` filters are the
  identity (1 at the centre tap from input channel i to output channel i, 0 elsewhere), as
  airbench initialises its convolutions (PyTorch's `dirac_` on `weight[:in_channels]`)."""
  uniform = fan_in_uniform()

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    kernel = uniform(key, shape, dtype)
    height, width, in_channels, out_channels = shape
    identity = min(in_channels, out_channels)
    dirac = jnp.zeros((height, width, in_channels, identity), dtype)
    dirac = dirac.at[height // 2, width // 2].set(jnp.eye(in_channels, identity, dtype=dtype))
    return kernel.at[..., :identity].set(dirac)

  return init


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on NHWC; an odd last row or column is dropped (PyTorch's
  `MaxPool2d(2)`: 31x31 -> 15x15). Its gradient is PyTorch's too: each window's to its first
  maximum in row-major order, where `jnp.max` would split it between tied maxima.

  Written as a reshape and max rather than `nn.max_pool`: XLA's CPU gradient of `reduce_window`
  (select-and-scatter) is ~25x slower than the gradient of a plain reduction.
  """
  _, height, width, _ = x.shape
  if height % 2 or width % 2:
    x = x[:, :height - height % 2, :width - width % 2, :]
  return _max_pool_2x2(x)


def _windows(x: jax.Array) -> jax.Array:
  """NHWC -> (N, H/2, 2, W/2, 2, C): each 2x2 window along axes 2 and 4."""
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  return jnp.max(_windows(x), axis=(2, 4))


def _max_pool_forward(x):
  y = _max_pool_2x2(x)
  return y, (x, y)


def _max_pool_backward(residuals, output_gradient):
  # PyTorch's rule (MaxPool2d): each window's whole gradient goes to its first maximum in
  # row-major order. Written on the window layout so that XLA makes it one elementwise pass over
  # the input: a position takes the gradient if it holds the maximum and no earlier position
  # of its window does (the three earlier positions' tests are broadcasts, not a reduction).
  # Splitting ties equally (jnp.max's rule) needs each window's tie count first: a second
  # pass over the input, ~35% slower on a bfloat16 map of 1,536 x 30 x 30 x 64 on the CPU.
  x, y = residuals
  windows = _windows(x)
  is_max = windows == y[:, :, None, :, None, :]
  first_row_first, first_row_second = is_max[:, :, :1, :, :1, :], is_max[:, :, :1, :, 1:, :]
  second_row_first = is_max[:, :, 1:, :, :1, :]
  row = jax.lax.broadcasted_iota(jnp.int32, windows.shape, 2)
  column = jax.lax.broadcasted_iota(jnp.int32, windows.shape, 4)
  earlier_max = jnp.where(
      row == 0,
      (column == 1) & first_row_first,
      first_row_first | first_row_second | ((column == 1) & second_row_first))
  gradient = output_gradient[:, :, None, :, None, :]
  gradient = jnp.where(is_max & ~earlier_max, gradient, jnp.zeros_like(gradient))
  return (gradient.reshape(x.shape),)


_max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


class Conv(nn.Module):
  """Bias-free convolution, by default with the specification's uniform initialisation: square
  kernel, `padding` zeros on each side (None: kernel_size // 2, i.e. 'SAME' for an odd kernel at
  stride 1) or a pair (before, after) for rows and columns alike, stride `strides`.

  The kernel is an HWIO array named `kernel`, as in `nn.Conv`; `implementation` only changes how
  the same convolution is computed.
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: conv_lib.Padding = None
  dtype: Any = jnp.float32
  implementation: str = "im2col"
  kernel_init: nn.initializers.Initializer = fan_in_uniform()
  # A bias (initialised to zero) added after the convolution.
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    conv = conv_lib.CONV_IMPLEMENTATIONS[self.implementation]
    y = conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      # Added in float32 and rounded once, so that its gradient is a float32 sum of the output
      # gradient: a bfloat16 bias's is summed in bfloat16 on the CPU (XLA's reduce-window), which
      # lost a third of a 1024x31x31 map's sum and took 66 ms against 4 on an AMX Xeon.
      y = (y.astype(jnp.float32) + bias).astype(y.dtype)
    return y


