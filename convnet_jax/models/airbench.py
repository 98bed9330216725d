"""airbench94 (Keller Jordan's CIFAR-10 speed-run network, `legacy/airbench94.py` of
KellerJordan/cifar10-airbench): a frozen 2x2 patch-whitening convolution, three conv groups and a
scaled linear head, 94% on CIFAR-10 in under 10 epochs with its recipe
(`configs/cifar10_airbench94.py`).

The network as airbench94 defines it, with this project's batch-statistics BatchNorm (no
running averages: evaluation normalises each evaluation batch with its own statistics, see
docs/resnets.md). The whitening kernel depends on the data: `whitening_kernel` computes it from
training images, and `initialise_from_data` puts it into freshly initialised parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnet_jax.models.layers import BatchNorm
from convnet_jax.models.layers import Conv
from convnet_jax.models.layers import dirac_then_fan_in_uniform
from convnet_jax.models.layers import fan_in_uniform
from convnet_jax.models.layers import max_pool_2x2

# airbench94's BatchNorm epsilon: effectively none, the offsets alone are learnt.
OFFSET_ONLY_BATCH_NORM_EPSILON = 1e-12
# The whitening kernel: from the first 5,000 training images, each eigenvector divided by
# sqrt(eigenvalue + 5e-4).
WHITENING_EXAMPLES = 5000
WHITENING_EPSILON = 5e-4


# The constants of the Gaussian's CDF and density: Phi(x) = (1 + erf(x / sqrt 2)) / 2, and
# phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
_SQRT_HALF = float(np.sqrt(0.5))
_INVERSE_SQRT_2PI = float(1 / np.sqrt(2 * np.pi))


def _gaussian_cdf(x32: jax.Array) -> jax.Array:
  return 0.5 * (1 + jax.lax.erf(x32 * _SQRT_HALF))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU of PyTorch's `nn.GELU()`, x Phi(x) with its erf (jax.nn.gelu defaults to the
  tanh form), computed in float32 whatever the input dtype and returned in it: in bfloat16,
  XLA's CPU backend would round each of the erf's dozen operations to bfloat16.

  Its gradient is written out, Phi(x) + x phi(x), from the input alone: autodiff of
  `jax.nn.gelu` keeps three float32 maps (its erfc, exp and a product;
  `jax.ad_checkpoint.print_saved_residuals`), 12 bytes an element written in the forward pass
  and read in the backward one where a bfloat16 input is 2; recomputing the erf from the input
  is a few multiply-adds on maps whose passes are bound by memory."""
  x32 = x.astype(jnp.float32)
  return (x32 * _gaussian_cdf(x32)).astype(x.dtype)


def _gelu_forward(x):
  return gelu(x), x


def _recomputed(x: jax.Array) -> jax.Array:
  # The saved input in float32 behind a barrier: without it XLA merges the backward's erf with
  # the forward's (common subexpressions) and stores that float32 map after all.
  return jax.lax.optimization_barrier(x).astype(jnp.float32)


def _gelu_backward(x, output_gradient):
  x32 = _recomputed(x)
  density = jnp.exp(-0.5 * jnp.square(x32)) * _INVERSE_SQRT_2PI
  derivative = _gaussian_cdf(x32) + x32 * density
  input_gradient = (output_gradient.astype(jnp.float32) * derivative).astype(output_gradient.dtype)
  # A select that changes no value (a NaN input gives a NaN gradient either way), there to keep
  # this pass out of XLA's YNNPACK reduction fusions, which take no select: fused into the one
  # that sums the whitening layer's bias gradient, it could not read the formula's constants,
  # and XLA wrote each as a full-size float32 map (three of 94 MB a step at batch 1,024).
  return (jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, input_gradient.dtype), input_gradient),)


gelu.defvjp(_gelu_forward, _gelu_backward)


@jax.custom_vjp
def silu(x: jax.Array) -> jax.Array:
  """PyTorch's `nn.SiLU()`, x sigmoid(x) (hiverge/cifar10-speedrun's activation: one
  exponential where the erf GELU takes a polynomial), in float32 as `gelu`, and as it with its
  gradient, sigmoid(x) (1 + x (1 - sigmoid(x))), from the saved input alone."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.nn.sigmoid(x32)).astype(x.dtype)


def _silu_forward(x):
  return silu(x), x


def _silu_backward(x, output_gradient):
  x32 = _recomputed(x)
  sigmoid = jax.nn.sigmoid(x32)
  derivative = sigmoid * (1 + x32 * (1 - sigmoid))
  return ((output_gradient.astype(jnp.float32) * derivative).astype(output_gradient.dtype),)


silu.defvjp(_silu_forward, _silu_backward)


# `model.airbench.activation`: the activation after every BatchNorm (the whitening's is GELU).
ACTIVATIONS = {"gelu": gelu, "silu": silu}


class ConvGroup(nn.Module):
  """conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU (airbench94's,
  `num_convs=2`); with `num_convs=3`, airbench96's: conv3x3 -> 2x2 max-pool -> BN -> GELU, kept
  as x0, then conv3x3 -> BN -> GELU -> conv3x3 -> BN, plus x0, -> GELU (a residual over the last
  two convolutions). Bias-free convolutions with identity-initialised first filters, BatchNorm
  with a learnable offset only (`activation`: a key of `ACTIVATIONS` in place of GELU)."""

  features: int
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"
  batch_norm_implementation: str = "jax"
  activation: str = "gelu"
  num_convs: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(name, padding=None):
      return Conv(self.features, 3, padding=padding, dtype=self.dtype,
                  implementation=self.conv_implementation,
                  kernel_init=dirac_then_fan_in_uniform(), name=name)

    def norm(name):
      return BatchNorm(use_offset=True, epsilon=OFFSET_ONLY_BATCH_NORM_EPSILON,
                       implementation=self.batch_norm_implementation,
                       name=name)

    # On an odd-sized map (31, 15, 7) the max-pool drops the convolution's last row and
    # column: padding (1, 0) computes only the rows and columns it keeps, the same numbers
    # without the crop's copy (and its gradient's padded copy) and up to a quarter fewer FLOPs.
    _, height, width, _ = x.shape
    odd_square = height == width and height % 2 == 1
    activation = ACTIVATIONS[self.activation]
    x = max_pool_2x2(conv("conv1", padding=(1, 0) if odd_square else None)(x))
    x = activation(norm("norm1")(x))
    if self.num_convs == 2:
      return activation(norm("norm2")(conv("conv2")(x)))
    residual = x
    x = activation(norm("norm2")(conv("conv2")(x)))
    return activation(norm("norm3")(conv("conv3")(x)) + residual)


class Airbench94(nn.Module):
  """whiten (2x2 conv 3 -> 24 with bias, no padding) -> GELU -> conv groups of `widths` (each
  of `convs_per_group` convolutions: 2, airbench94's and airbench95's, or 3, airbench96's) ->
  3x3 max-pool -> bias-free linear -> times `scale`. Returns logits. `head_unit_std`: the
  linear head's initial weights divided by their standard deviation (airbench94_muon's
  `w *= 1 / w.std()`). `activation`: the conv groups' activation, a key of `ACTIVATIONS` (GELU
  or hiverge's SiLU)."""

  global_pool_name: ClassVar[str] = "3x3 max-pool"

  num_classes: int = 10
  widths: Sequence[int] = (64, 256, 256)
  convs_per_group: int = 2
  whitening_kernel_size: int = 2
  scale: float = 1 / 9
  head_unit_std: bool = False
  activation: str = "gelu"
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    size = self.whitening_kernel_size
    x = images.astype(self.dtype)
    # Zeros until `initialise_from_data` puts the whitening eigenvectors in.
    x = Conv(2 * images.shape[-1] * size**2, size, padding=0, dtype=self.dtype,
             implementation=self.conv_implementation, kernel_init=nn.initializers.zeros,
             use_bias=True, name="whiten")(x)
    x = gelu(x)  # hiverge's SiLU recipe keeps this one GELU
    for index, features in enumerate(self.widths):
      x = ConvGroup(features, dtype=self.dtype, conv_implementation=self.conv_implementation,
                    batch_norm_implementation=self.batch_norm_implementation,
                    activation=self.activation, num_convs=self.convs_per_group,
                    name=f"group{index + 1}")(x)
    if x.shape[1:3] == (3, 3):
      # MaxPool2d(3) on the 3x3 map that three halvings leave of 31x31 is one window: a plain
      # max, whose gradient is cheaper on the CPU than reduce_window's select-and-scatter.
      x = jnp.max(x, axis=(1, 2))
    else:
      x = nn.max_pool(x, (3, 3), strides=(3, 3)).reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=(unit_std(fan_in_uniform()) if self.head_unit_std
                              else fan_in_uniform()), name="head")(x)
    return (self.scale * x).astype(jnp.float32)


def unit_std(initializer) -> nn.initializers.Initializer:
  """`initializer`'s draw divided by its own standard deviation (PyTorch's `Tensor.std()`, with
  Bessel's correction), so the weights have standard deviation exactly 1."""

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    weights = initializer(key, shape, dtype)
    return weights / jnp.std(weights, ddof=1)

  return init


def patches(images: np.ndarray, size: int) -> np.ndarray:
  """Every size x size patch of NHWC `images` as rows of (dy, dx, channel) values."""
  batch, height, width, channels = images.shape
  rows, columns = height - size + 1, width - size + 1
  shifted = [images[:, i:i + rows, j:j + columns, :] for i in range(size) for j in range(size)]
  return np.stack(shifted, axis=3).reshape(batch * rows * columns, size * size * channels)


def whitening_kernel(images: np.ndarray, size: int = 2,
                     epsilon: float = WHITENING_EPSILON) -> np.ndarray:
  """The HWIO kernel of airbench's whitening convolution from normalised NHWC images: the
  eigenvectors of the uncentred covariance of all size x size patches, largest eigenvalue first,
  each divided by sqrt(eigenvalue + epsilon), then the same filters negated."""
  channels = images.shape[-1]
  dimension = size * size * channels
  covariance = np.zeros((dimension, dimension))
  count = 0
  for start in range(0, len(images), 500):  # 500 images at a time: ~40 MB of patches
    rows = patches(np.asarray(images[start:start + 500], np.float64), size)
    covariance += rows.T @ rows
    count += len(rows)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance / count)
  order = np.argsort(eigenvalues)[::-1]
  filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + epsilon)
  kernel = filters.reshape(size, size, channels, dimension)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def initialise_from_data(params, train_images: np.ndarray, mean: np.ndarray, std: np.ndarray,
                         num_examples: int = WHITENING_EXAMPLES):
  """The parameters with the whitening kernel computed from the first `num_examples` training
  images (uint8 NHWC, normalised with `mean` and `std` as training normalises them); a leading
  replica axis of the parameters is kept."""
  images = (np.asarray(train_images[:num_examples], np.float32) / 255.0 - mean) / std
  current = params["whiten"]["kernel"]
  size = current.shape[-4]
  kernel = whitening_kernel(images, size)
  kernel = np.broadcast_to(kernel, current.shape)
  whiten = dict(params["whiten"], kernel=jax.device_put(kernel, getattr(current, "sharding",
                                                                         None)))
  return dict(params, whiten=whiten)
