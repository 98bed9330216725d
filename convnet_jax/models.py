"""The seed convnet of the specification and the CIFAR ResNet family (ResNet-18/34 with basic
blocks, ResNet-50 with bottleneck blocks), built from batch-statistics BatchNorm.

All modules are Flax linen modules: `model.init` returns the parameters as a plain pytree and
`model.apply` is a pure function of (parameters, images). There is no mutable state: BatchNorm
always normalises with the statistics of the batch at hand, in training and in evaluation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet_jax import conv as conv_lib

BATCH_NORM_EPSILON = 1e-5


def batch_norm(x: jax.Array, epsilon: float = BATCH_NORM_EPSILON) -> jax.Array:
  """Normalises `x` (NHWC) per channel with the mean and biased variance of this batch.

  Equivalent to PyTorch `BatchNorm2d(C, eps, momentum=None, affine=False,
  track_running_stats=False)`. Statistics are computed in float32 whatever the input dtype.
  """
  return _normalize(x.astype(jnp.float32), epsilon).astype(x.dtype)


_STATISTICS_AXES = (0, 1, 2)


def _statistics(x: jax.Array, epsilon: float):
  mean = jnp.mean(x, axis=_STATISTICS_AXES)
  # Two passes (variance of the centred values), as the formula reads: the one-pass
  # E[x^2]-E[x]^2 loses precision when |mean| >> std.
  variance = jnp.mean(jnp.square(x - mean), axis=_STATISTICS_AXES)
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


class BatchNorm(nn.Module):
  """Batch-statistics BatchNorm with no running averages; optionally a learnable scale and offset."""

  use_scale_and_offset: bool = False
  epsilon: float = BATCH_NORM_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = batch_norm(x, self.epsilon)
    if self.use_scale_and_offset:
      channels = x.shape[-1]
      scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
      offset = self.param("offset", nn.initializers.zeros, (channels,), jnp.float32)
      y = y * scale.astype(y.dtype) + offset.astype(y.dtype)
    return y


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


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on NHWC (H and W even).

  Written as a reshape and max rather than `nn.max_pool`: XLA's CPU gradient of `reduce_window`
  (select-and-scatter) is ~25x slower than the gradient of a plain reduction.
  """
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
  # jnp.max's own gradient: each window's gradient split equally between the positions that
  # hold its maximum. The tie count comes from the four strided quarter-images (small, no
  # reduction over the window axes, which XLA's CPU backend runs slowly) and the gradient is
  # one elementwise pass over the input.
  x, y = residuals
  ties = sum((x[:, i::2, j::2, :] == y).astype(y.dtype) for i in (0, 1) for j in (0, 1))
  share = (output_gradient / ties)[:, :, None, :, None, :]
  windows = _windows(x)
  gradient = jnp.where(windows == y[:, :, None, :, None, :], share, jnp.zeros_like(share))
  return (gradient.reshape(x.shape),)


_max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


class Conv(nn.Module):
  """Bias-free convolution with the specification's uniform initialisation: odd square kernel,
  kernel_size // 2 zeros of padding on each side, stride `strides` (1: 'SAME').

  The kernel is an HWIO array named `kernel`, as in `nn.Conv`; `implementation` only changes how
  the same convolution is computed.
  """

  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  implementation: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", fan_in_uniform(), shape, jnp.float32)
    conv = conv_lib.CONV_IMPLEMENTATIONS[self.implementation]
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)


class ResidualBlock(nn.Module):
  """out(x) = ReLU(BatchNorm(conv3x3(x))) + conv1x1(x); no ReLU after the sum."""

  features: int
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, self.features, dtype=self.dtype,
                             implementation=self.conv_implementation)
    main = nn.relu(BatchNorm(name="bn")(conv(3, name="conv")(x)))
    return main + conv(1, name="skip")(x)


class SeedConvNet(nn.Module):
  """The seed convnet: conv-BN-ReLU stem, three residual blocks with max-pools, global max-pool,
  bias-free linear layer, scaled by `alpha`.

  Returns logits (the softmax of the specification is applied by the loss and by prediction).
  """

  # How the shape trace names the pooling before the head.
  global_pool_name: ClassVar[str] = "global max-pool"

  num_classes: int = 2
  stem_features: int = 16
  block_features: Sequence[int] = (32, 64, 128)
  alpha: float = 0.125
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    x = Conv(self.stem_features, 3, dtype=self.dtype, implementation=self.conv_implementation,
             name="stem_conv")(x)
    x = nn.relu(BatchNorm(name="stem_bn")(x))
    for index, features in enumerate(self.block_features):
      x = ResidualBlock(features, dtype=self.dtype, conv_implementation=self.conv_implementation,
                        name=f"block{index + 1}")(x)
      if index < len(self.block_features) - 1:
        x = max_pool_2x2(x)
    x = jnp.max(x, axis=(1, 2))  # global max-pool
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=fan_in_uniform(), name="head")(x)
    return (self.alpha * x).astype(jnp.float32)


def _projection_shortcut(x: jax.Array, features: int, strides: int, dtype: Any,
                         conv_implementation: str) -> jax.Array:
  """The identity, or a 1x1 convolution (with the block's stride) and BatchNorm where the block
  changes the number of channels or the resolution."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = Conv(features, 1, strides=strides, dtype=dtype, implementation=conv_implementation,
           name="shortcut_conv")(x)
  return BatchNorm(use_scale_and_offset=True, name="shortcut_bn")(x)


class BasicBlock(nn.Module):
  """ResNet basic block: relu(bn(conv3x3(relu(bn(conv3x3_stride(x))))) + shortcut(x)), with
  `features` output channels."""

  expansion: ClassVar[int] = 1

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, self.features, 3, dtype=self.dtype,
                             implementation=self.conv_implementation)
    batch_norm_layer = functools.partial(BatchNorm, use_scale_and_offset=True)
    y = conv(strides=self.strides, name="conv1")(x)
    y = nn.relu(batch_norm_layer(name="bn1")(y))
    y = batch_norm_layer(name="bn2")(conv(name="conv2")(y))
    shortcut = _projection_shortcut(x, self.features, self.strides, self.dtype,
                                    self.conv_implementation)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """ResNet bottleneck block: 1x1 reduce to `features`, 3x3 (with the stride), 1x1 expand to
  4 * `features`, each followed by BatchNorm, ReLU after the first two and after the sum with the
  shortcut. The stride sits on the 3x3 convolution, as in torchvision and the CIFAR tutorial."""

  expansion: ClassVar[int] = 4

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, dtype=self.dtype, implementation=self.conv_implementation)
    batch_norm_layer = functools.partial(BatchNorm, use_scale_and_offset=True)
    out_features = self.features * self.expansion
    y = nn.relu(batch_norm_layer(name="bn1")(conv(self.features, 1, name="conv1")(x)))
    y = conv(self.features, 3, strides=self.strides, name="conv2")(y)
    y = nn.relu(batch_norm_layer(name="bn2")(y))
    y = batch_norm_layer(name="bn3")(conv(out_features, 1, name="conv3")(y))
    shortcut = _projection_shortcut(x, out_features, self.strides, self.dtype,
                                    self.conv_implementation)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """The CIFAR ResNet: 3x3 stem convolution with `width` channels, BatchNorm and ReLU, no stem
  pooling; four stages of `stage_sizes` blocks with width, 2, 4 and 8 times width channels (times
  the block's expansion), stride 2 at the start of stages 2-4; global average pool; linear layer
  with bias. BatchNorm uses batch statistics, with a learnable scale and offset.

  Returns logits.
  """

  global_pool_name: ClassVar[str] = "global average-pool"

  stage_sizes: Sequence[int]
  block_cls: type
  num_classes: int = 10
  width: int = 64
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    x = Conv(self.width, 3, dtype=self.dtype, implementation=self.conv_implementation,
             name="stem_conv")(x)
    x = nn.relu(BatchNorm(use_scale_and_offset=True, name="stem_bn")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = self.block_cls(self.width * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
                           dtype=self.dtype, conv_implementation=self.conv_implementation,
                           name=f"stage{stage + 1}_block{block + 1}")(x)
    # The mean is taken in float32 so that bfloat16 activations do not lose the small ones.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=fan_in_uniform(), bias_init=uniform_bias(x.shape[-1]),
                 name="head")(x)
    return x.astype(jnp.float32)


def _resnet(stage_sizes: Sequence[int], block_cls: type[nn.Module]) -> Callable[..., nn.Module]:
  def build(config, num_classes: int, **settings) -> nn.Module:
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                  width=config.resnet_width, **settings)
  return build


# Every model `config.model` can name, and how to build it from (config, num_classes, dtype=,
# conv_implementation=). The ResNets: blocks per stage and the block type.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_convnet": lambda config, num_classes, **settings: SeedConvNet(num_classes=num_classes,
                                                                        **settings),
    "resnet18": _resnet((2, 2, 2, 2), BasicBlock),
    "resnet34": _resnet((3, 4, 6, 3), BasicBlock),
    "resnet50": _resnet((3, 4, 6, 3), BottleneckBlock),
}


def create_model(config, num_classes: int, conv_implementation: str | None = None) -> nn.Module:
  """Builds the model named by `config.model` (a key of `MODELS`) for `num_classes` outputs;
  ResNets take their base width from `config.resnet_width`.

  `conv_implementation`: the resolved convolution path (a key of `conv.CONV_IMPLEMENTATIONS`);
  default: `config.conv_implementation` resolved for one device.
  """
  if conv_implementation is None:
    conv_implementation = conv_lib.choose_conv_implementation(
        config.conv_implementation, config.dtype).implementation
  if config.model not in MODELS:
    raise ValueError(f"unknown model {config.model!r}; expected one of {tuple(MODELS)}")
  return MODELS[config.model](config, num_classes, dtype=jnp.dtype(config.dtype),
                              conv_implementation=conv_implementation)


def count_parameters(params) -> int:
  """Total number of scalar parameters in a pytree."""
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def describe_shapes(model: nn.Module, params, images: jax.Array) -> list[str]:
  """The reference-style shape trace of one forward pass: each top-level layer's input and
  output shape, computed abstractly (no FLOPs are spent)."""
  lines = []

  def record(next_fn, args, kwargs, context):
    output = next_fn(*args, **kwargs)
    module = context.module
    parent = module.parent
    if context.method_name == "__call__" and isinstance(parent, nn.Module) and \
        not isinstance(parent.parent, nn.Module):  # direct children of the model only
      in_shape = tuple(args[0].shape)
      out_shape = tuple(output.shape)
      lines.append(f"{module.name} ({type(module).__name__}): {in_shape} -> {out_shape}")
    return output

  def forward(params, images):
    with nn.intercept_methods(record):
      return model.apply({"params": params}, images)

  jax.eval_shape(forward, params, images)
  return lines
