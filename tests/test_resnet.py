"""The CIFAR ResNet family: parameter counts, strided convolutions and the blocks against direct
numpy definitions, and the stage shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import default as default_config

from convnet_jax import models
from convnet_jax.ops import conv


def make_resnet(name, width=64, num_classes=10, conv_implementation="im2col"):
  model_config = default_config.get_config().model
  model_config.name, model_config.resnet.width = name, width
  model_config.conv_implementation = conv_implementation
  return models.create_model(model_config, num_classes=num_classes)


def abstract_params(model, size=32):
  """The parameter shapes, without running the initialisers (no FLOPs)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def basic_resnet_parameters(stage_sizes, num_classes=10):
  """Hand count of a CIFAR ResNet with basic blocks: bias-free convolutions, two parameters per
  BatchNorm channel, a linear layer with bias."""
  total = 3 * 3 * 3 * 64 + 2 * 64  # stem conv and BN
  in_channels = 64
  for stage, num_blocks in enumerate(stage_sizes):
    out = 64 * 2**stage
    for block in range(num_blocks):
      total += 9 * in_channels * out + 2 * out + 9 * out * out + 2 * out
      if in_channels != out or (stage > 0 and block == 0):
        total += in_channels * out + 2 * out  # 1x1 projection and its BN
      in_channels = out
  return total + 512 * num_classes + num_classes


def test_resnet18_has_the_tutorial_parameter_count():
  assert models.count_parameters(abstract_params(make_resnet("resnet18"))) == 11_173_962


def test_resnet50_has_the_tutorial_parameter_count():
  assert models.count_parameters(abstract_params(make_resnet("resnet50"))) == 23_520_842


def test_basic_block_resnets_match_the_hand_count():
  assert basic_resnet_parameters((2, 2, 2, 2)) == 11_173_962  # the formula agrees with the tutorial
  assert models.count_parameters(abstract_params(make_resnet("resnet34"))) == \
      basic_resnet_parameters((3, 4, 6, 3))


def test_parameter_count_does_not_depend_on_the_image_size():
  model = make_resnet("resnet18")
  assert models.count_parameters(abstract_params(model, size=8)) == 11_173_962


def test_initialisation_follows_pytorch_defaults():
  """model.init itself (not just shapes) on a one-stage ResNet: compiling the initialisation of
  a whole ResNet-18 takes ~25 s on CPU, and every ResNet shares this code."""
  width = 4
  model = models.ResNet(stage_sizes=(2,), block_cls=models.BasicBlock, num_classes=10,
                        width=width)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  # Stem conv + BN, two blocks of two 3x3 convs + BN (identity shortcuts), head with bias.
  expected = 27 * width + 2 * width + 2 * (2 * 9 * width * width + 4 * width) + width * 10 + 10
  assert models.count_parameters(params) == expected
  for bn in ("stem_bn", "stage1_block1/bn1", "stage1_block2/bn2"):
    leaf = params
    for key in bn.split("/"):
      leaf = leaf[key]
    np.testing.assert_array_equal(leaf["scale"], np.ones(width))
    np.testing.assert_array_equal(leaf["offset"], np.zeros(width))
  bounds = {"stem_conv": np.sqrt(1 / 27), "head": np.sqrt(1 / width)}
  for name, bound in bounds.items():
    for leaf in params[name].values():  # kernel, and the head's bias with the kernel's bound
      assert np.all(np.abs(np.asarray(leaf)) <= bound), name
      assert np.max(np.abs(np.asarray(leaf))) > 0.5 * bound, name


def numpy_conv(x, w, stride=1):
  """PyTorch's convolution: kernel_size // 2 zeros on each side, then windows every `stride`."""
  kh, kw, _, cout = w.shape
  n, h, wd, _ = x.shape
  pad = kh // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (h + 2 * pad - kh) // stride + 1
  out_w = (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, out_h, out_w, cout))
  for i in range(out_h):
    for j in range(out_w):
      window = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.tensordot(window, w, axes=([1, 2, 3], [0, 1, 2]))
  return out


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla"])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_strided_convolution_matches_pytorch_definition(implementation, kernel_size, size):
  rng = np.random.default_rng(kernel_size)
  x = rng.normal(size=(2, *size, 3))
  w = rng.normal(size=(kernel_size, kernel_size, 3, 4))
  got = conv.CONV_IMPLEMENTATIONS[implementation](jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(w, jnp.float32), 2)
  expected = numpy_conv(x, w, stride=2)
  assert got.shape == expected.shape == (2, (size[0] + 1) // 2, (size[1] + 1) // 2, 4)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def numpy_bn(x, scale, offset, eps=1e-5):
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + offset


def random_params(module, input_shape, seed):
  """The module's parameter tree with every value random, so BN scales and offsets matter too."""
  params = abstract_params_of(module, input_shape)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(0.5, 0.5, size=leaf.shape), jnp.float32)
                for leaf in leaves])


def abstract_params_of(module, input_shape):
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))["params"]


def apply(module, params, x):
  return jax.jit(module.apply)({"params": params}, jnp.asarray(x, jnp.float32))


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def test_basic_block_with_projection_matches_numpy():
  block = models.BasicBlock(features=5, strides=2)
  x = np.random.default_rng(0).normal(size=(3, 6, 6, 4))
  params = random_params(block, (1, 6, 6, 4), 1)
  assert set(params) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv", "shortcut_bn"}
  p = _np(params)
  relu = lambda a: np.maximum(a, 0)
  y = relu(numpy_bn(numpy_conv(x, p["conv1"]["kernel"], 2), **p["bn1"]))
  y = numpy_bn(numpy_conv(y, p["conv2"]["kernel"]), **p["bn2"])
  shortcut = numpy_bn(numpy_conv(x, p["shortcut_conv"]["kernel"], 2), **p["shortcut_bn"])
  got = apply(block, params, x)
  assert got.shape == (3, 3, 3, 5)
  np.testing.assert_allclose(np.asarray(got), relu(y + shortcut), rtol=1e-3, atol=1e-4)


def test_basic_block_keeps_the_identity_shortcut_when_shapes_match():
  block = models.BasicBlock(features=4)
  x = np.random.default_rng(2).normal(size=(3, 5, 5, 4))
  params = random_params(block, (1, 5, 5, 4), 3)
  assert set(params) == {"conv1", "bn1", "conv2", "bn2"}
  p = _np(params)
  relu = lambda a: np.maximum(a, 0)
  y = relu(numpy_bn(numpy_conv(x, p["conv1"]["kernel"]), **p["bn1"]))
  y = numpy_bn(numpy_conv(y, p["conv2"]["kernel"]), **p["bn2"])
  got = apply(block, params, x)
  np.testing.assert_allclose(np.asarray(got), relu(y + x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla"])
def test_bottleneck_block_matches_numpy(implementation):
  block = models.BottleneckBlock(features=3, strides=2, conv_implementation=implementation)
  x = np.random.default_rng(4).normal(size=(2, 6, 6, 5))
  params = random_params(block, (1, 6, 6, 5), 5)
  p = _np(params)
  assert p["conv1"]["kernel"].shape == (1, 1, 5, 3)
  assert p["conv2"]["kernel"].shape == (3, 3, 3, 3)
  assert p["conv3"]["kernel"].shape == (1, 1, 3, 12)  # expansion 4
  relu = lambda a: np.maximum(a, 0)
  y = relu(numpy_bn(numpy_conv(x, p["conv1"]["kernel"]), **p["bn1"]))
  y = relu(numpy_bn(numpy_conv(y, p["conv2"]["kernel"], 2), **p["bn2"]))
  y = numpy_bn(numpy_conv(y, p["conv3"]["kernel"]), **p["bn3"])
  shortcut = numpy_bn(numpy_conv(x, p["shortcut_conv"]["kernel"], 2), **p["shortcut_bn"])
  got = apply(block, params, x)
  assert got.shape == (2, 3, 3, 12)
  np.testing.assert_allclose(np.asarray(got), relu(y + shortcut), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name, block, channels", [("resnet18", "BasicBlock", (64, 128, 256, 512)),
                                                   ("resnet50", "BottleneckBlock",
                                                    (256, 512, 1024, 2048))])
def test_stages_halve_the_resolution_from_stage_two(name, block, channels):
  model = make_resnet(name)
  lines = models.describe_shapes(model, abstract_params(model),
                                 jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert lines[0] == "stem_conv (Conv): (2, 32, 32, 3) -> (2, 32, 32, 64)"
  assert lines[1] == "stem_bn (BatchNorm): (2, 32, 32, 64) -> (2, 32, 32, 64)"
  last_blocks = {1: 2, 2: 2, 3: 2, 4: 2} if name == "resnet18" else {1: 3, 2: 4, 3: 6, 4: 3}
  for stage, size in zip(range(1, 5), (32, 16, 8, 4)):
    out = f"(2, {size}, {size}, {channels[stage - 1]})"
    first = [line for line in lines if line.startswith(f"stage{stage}_block1 ")]
    last = [line for line in lines if line.startswith(f"stage{stage}_block{last_blocks[stage]} ")]
    assert first[0].startswith(f"stage{stage}_block1 ({block}): ") and first[0].endswith(out)
    assert last[0].endswith(f"{out} -> {out}")
  assert lines[-1] == f"head (Dense): (2, {channels[-1]}) -> (2, 10)"
  assert len(lines) == 3 + sum(last_blocks.values())


def test_one_stage_resnet_forward_matches_numpy():
  """The ResNet scaffolding (stem, a block, global average pool, linear layer with bias) against
  numpy, on a ResNet narrow and short enough to compile in a second."""
  model = models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock, num_classes=5, width=3)
  x = np.random.default_rng(6).normal(size=(4, 6, 6, 3))
  params = random_params(model, (1, 6, 6, 3), 7)
  p = _np(params)
  relu = lambda a: np.maximum(a, 0)
  a = relu(numpy_bn(numpy_conv(x, p["stem_conv"]["kernel"]), **p["stem_bn"]))
  block = p["stage1_block1"]
  y = relu(numpy_bn(numpy_conv(a, block["conv1"]["kernel"]), **block["bn1"]))
  y = numpy_bn(numpy_conv(y, block["conv2"]["kernel"]), **block["bn2"])
  a = relu(y + a)
  expected = a.mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
  got = apply(model, params, x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-4)
