"""The seed convnet of the specification (`../shared/spec/convnet.md`): a conv-BN-ReLU stem,
three residual blocks with max-pools, a global max-pool and a scaled bias-free linear layer."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet_jax.models.layers import BatchNorm
from convnet_jax.models.layers import Conv
from convnet_jax.models.layers import fan_in_uniform
from convnet_jax.models.layers import max_pool_2x2


class ResidualBlock(nn.Module):
  """out(x) = ReLU(BatchNorm(conv3x3(x))) + conv1x1(x); no ReLU after the sum."""

  features: int
  dtype: Any = jnp.float32
  conv_implementation: str = "im2col"
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, self.features, dtype=self.dtype,
                             implementation=self.conv_implementation)
    norm = BatchNorm(relu=True, implementation=self.batch_norm_implementation, name="bn")
    main = norm(conv(3, name="conv")(x))
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
  batch_norm_implementation: str = "jax"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    x = Conv(self.stem_features, 3, dtype=self.dtype, implementation=self.conv_implementation,
             name="stem_conv")(x)
    x = BatchNorm(relu=True, implementation=self.batch_norm_implementation, name="stem_bn")(x)
    for index, features in enumerate(self.block_features):
      x = ResidualBlock(features, dtype=self.dtype, conv_implementation=self.conv_implementation,
                        batch_norm_implementation=self.batch_norm_implementation,
                        name=f"block{index + 1}")(x)
      if index < len(self.block_features) - 1:
        x = max_pool_2x2(x)
    x = jnp.max(x, axis=(1, 2))  # global max-pool
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=fan_in_uniform(), name="head")(x)
    return (self.alpha * x).astype(jnp.float32)
