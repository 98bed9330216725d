"""The CIFAR ResNet family: ResNet-18/34 with basic blocks, ResNet-50 with bottleneck blocks,
batch-statistics BatchNorm with a learnable scale and offset."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet_jax.models.layers import BatchNorm
from convnet_jax.models.layers import Conv
from convnet_jax.models.layers import fan_in_uniform
from convnet_jax.models.layers import uniform_bias


def _projection_shortcut(x: jax.Array, features: int, strides: int, dtype: Any,
                         conv_implementation: str, batch_norm_implementation: str) -> jax.Array:
  """The identity, or a 1x1 convolution (with the block's stride) and BatchNorm where the block
  changes the number of channels or the resolution."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = Conv(features, 1, strides=strides, dtype=dtype, implementation=conv_implementation,
           name="shortcut_conv")(x)
  return BatchNorm(use_scale_and_offset=True,
                   implementation=batch_norm_implementation,
                   name="shortcut_bn")(x)


class BasicBlock(nn.Module):
  """ResNet basic block: relu(bn(conv3x3(relu(bn(conv3x3_stride(x))))) + shortcut(x)), with
  `features` output channels."""

  expansion: ClassVar[int] = 1

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, self.features, 3, dtype=self.dtype,
                             implementation=self.conv_implementation)
    batch_norm_layer = functools.partial(
        BatchNorm, use_scale_and_offset=True,
        implementation=self.batch_norm_implementation)
    y = conv(strides=self.strides, name="conv1")(x)
    y = nn.relu(batch_norm_layer(name="bn1")(y))
    y = batch_norm_layer(name="bn2")(conv(name="conv2")(y))
    shortcut = _projection_shortcut(x, self.features, self.strides, self.dtype,
                                    self.conv_implementation, self.batch_norm_implementation)
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
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, dtype=self.dtype, implementation=self.conv_implementation)
    batch_norm_layer = functools.partial(
        BatchNorm, use_scale_and_offset=True,
        implementation=self.batch_norm_implementation)
    out_features = self.features * self.expansion
    y = nn.relu(batch_norm_layer(name="bn1")(conv(self.features, 1, name="conv1")(x)))
    y = conv(self.features, 3, strides=self.strides, name="conv2")(y)
    y = nn.relu(batch_norm_layer(name="bn2")(y))
    y = batch_norm_layer(name="bn3")(conv(out_features, 1, name="conv3")(y))
    shortcut = _projection_shortcut(x, out_features, self.strides, self.dtype,
                                    self.conv_implementation, self.batch_norm_implementation)
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
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    x = Conv(self.width, 3, dtype=self.dtype, implementation=self.conv_implementation,
             name="stem_conv")(x)
    x = nn.relu(BatchNorm(use_scale_and_offset=True,
                          implementation=self.batch_norm_implementation,
                          name="stem_bn")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = self.block_cls(self.width * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
                           dtype=self.dtype, conv_implementation=self.conv_implementation,
                           batch_norm_implementation=self.batch_norm_implementation,
                           name=f"stage{stage + 1}_block{block + 1}")(x)
    # The mean is taken in float32 so that bfloat16 activations do not lose the small ones.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=fan_in_uniform(), bias_init=uniform_bias(x.shape[-1]),
                 name="head")(x)
    return x.astype(jnp.float32)
