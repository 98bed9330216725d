"""The models `config.model.name` can name, one module per family beside the shared layers:

* `layers`: batch-statistics BatchNorm, the convolution module, the 2x2 max-pool, initialisers;
* `seed`: the seed convnet of the specification;
* `resnet`: the CIFAR ResNets (ResNet-18/34 with basic blocks, ResNet-50 with bottleneck blocks);
* `airbench`: airbench94, the CIFAR-10 speed-run network.

All modules are Flax linen modules: `model.init` returns the parameters as a plain pytree and
`model.apply` is a pure function of (parameters, images). There is no mutable state: BatchNorm
always normalises with the statistics of the batch at hand, in training and in evaluation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnet_jax.models import airbench
from convnet_jax.models import layers
from convnet_jax.models.airbench import Airbench94
from convnet_jax.models.layers import BATCH_STATISTICS
from convnet_jax.models.layers import batch_norm
from convnet_jax.models.layers import BATCH_NORM_EPSILON
from convnet_jax.models.layers import BatchNorm
from convnet_jax.models.layers import Conv
from convnet_jax.models.layers import dirac_then_fan_in_uniform
from convnet_jax.models.layers import fan_in_uniform
from convnet_jax.models.layers import max_pool_2x2
from convnet_jax.models.layers import POPULATION
from convnet_jax.models.layers import uniform_bias
from convnet_jax.models.resnet import BasicBlock
from convnet_jax.models.resnet import BottleneckBlock
from convnet_jax.models.resnet import ResNet
from convnet_jax.models.seed import ResidualBlock
from convnet_jax.models.seed import SeedConvNet
from convnet_jax.ops import conv as conv_lib

# The package's public names: the layers and every family's modules, as `models.X`.
__all__ = [
    "Airbench94", "BATCH_NORM_EPSILON", "BATCH_STATISTICS", "BasicBlock", "BatchNorm",
    "BottleneckBlock", "Conv",
    "DATA_INITIALISERS", "MODELS", "ResNet", "ResidualBlock", "SeedConvNet", "airbench",
    "batch_norm", "count_parameters", "create_model", "describe_shapes",
    "dirac_then_fan_in_uniform", "fan_in_uniform", "initialise_from_data", "max_pool_2x2",
    "POPULATION", "uniform_bias",
]


def _resnet(stage_sizes: Sequence[int], block_cls: type[nn.Module]) -> Callable[..., nn.Module]:
  def build(model_config, num_classes: int, **settings) -> nn.Module:
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                  width=model_config.resnet.width, **settings)
  return build


def _airbench(model_config, num_classes: int, **settings) -> nn.Module:
  options = model_config.airbench
  return Airbench94(num_classes=num_classes, widths=tuple(options.widths),
                    convs_per_group=options.convs_per_group, scale=options.output_scale,
                    head_unit_std=options.head_unit_std, activation=options.activation,
                    **settings)


# Every model `model.name` can name, and how to build it from (the config's `model` group,
# num_classes, dtype=, conv_implementation=, batch_norm_implementation=). The ResNets: blocks per
# stage and the block type.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_convnet": lambda model_config, num_classes, **settings: SeedConvNet(
        num_classes=num_classes, **settings),
    "resnet18": _resnet((2, 2, 2, 2), BasicBlock),
    "resnet34": _resnet((3, 4, 6, 3), BasicBlock),
    "resnet50": _resnet((3, 4, 6, 3), BottleneckBlock),
    "airbench94": _airbench,
}

# Models whose initial parameters also depend on the training data: (the `model` group,
# parameters, uint8 training images, channel mean, channel std) -> parameters, applied after
# `init`.
DATA_INITIALISERS: dict[str, Callable] = {
    "airbench94": lambda model_config, *data: airbench.initialise_from_data(
        *data, num_examples=model_config.airbench.whitening_examples)}


def initialise_from_data(model_config, params, data):
  """`params` with the data-dependent parts of the model (the config's `model` group) filled in
  from the training set `data` (an `input_pipeline.Dataset`); unchanged for models without
  any."""
  initialise = DATA_INITIALISERS.get(model_config.name)
  if initialise is None:
    return params
  return initialise(model_config, params, data.train_images, data.mean, data.std)


def create_model(model_config, num_classes: int, conv_implementation: str | None = None
                 ) -> nn.Module:
  """Builds the model the config's `model` group names.

  Args:
    model_config: the config's `model` group: `name` (a key of `MODELS`), `dtype` ("auto"
      resolved here by `conv.choose_dtype`),
      `conv_implementation`, `batch_norm_implementation` and the family's own subgroup
      (`resnet`, `airbench`).
    num_classes: the number of outputs.
    conv_implementation: the resolved convolution path (a key of
      `conv.CONV_IMPLEMENTATIONS`); default: `model_config.conv_implementation` resolved for
      one device.

  Returns:
    The Flax module; `init` gives its parameters, `apply` is a pure function of (parameters,
    images) returning logits.
  """
  dtype = conv_lib.choose_dtype(model_config.dtype).dtype
  if conv_implementation is None:
    conv_implementation = conv_lib.choose_conv_implementation(
        model_config.conv_implementation, dtype).implementation
  if model_config.name not in MODELS:
    raise ValueError(f"unknown model {model_config.name!r}; expected one of {tuple(MODELS)}")
  return MODELS[model_config.name](
      model_config, num_classes, dtype=jnp.dtype(dtype),
      conv_implementation=conv_implementation,
      batch_norm_implementation=layers.choose_batch_norm_implementation(
          model_config.batch_norm_implementation, conv_implementation))


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
