"""Batch normalisation with the batch's own statistics as oneDNN custom calls, optionally with
a learnt per-channel offset and the ReLU that follows it in the same pass.

The same function as `models.layers.batch_norm` (per-channel mean and biased variance over N, H
and W, then (x - mean) / sqrt(variance + epsilon)), computed by oneDNN's batch normalisation
primitive: forward in one call that also returns the statistics, backward in one call (which
also gives the offset's gradient). Measured on a 2-core Zen 3 (AVX2), float32 at batch 128
(median of 30, forward + backward with the ReLU): the seed net's maps (16, 32, 64 and 128
channels at 32x32, 32x32, 16x16 and 8x8) take 1.8, 5.9, 2.2 and 1.0 ms in oneDNN against ~5,
~12, ~4 and ~1.3 ms in XLA's fusions, which read and write the map more often (the centred map
is written out for the variance, the ReLU's mask is another pass backward).

bfloat16 maps too, where oneDNN runs bfloat16 natively (AVX512_BF16 or AMX): computed in float32
and rounded once, the offset added before the rounding, as the pure-JAX path does. XLA's own
bfloat16 normalisation writes a float32 copy of the map for its reductions and float32 centred
and normalised maps besides (its YNNPACK reductions take no convert or broadcast), where oneDNN
reads and writes the bfloat16 map itself: on a 2-core AMX Xeon, airbench's BatchNorm, offset and
GELU forward and backward on a 1,024 x 16 x 16 x 128 map took 144 ms against XLA's 225 (median
of 7; float32: 174 and 167, level).

Only for channel counts that are a multiple of `CHANNEL_MULTIPLE`: with 4 channels oneDNN 3.2's
AVX2 kernels (which work on 8 channels at a time) returned a wrong kernel gradient from the
convolution that follows and at times spun forever in its barrier, as if the normalisation wrote
past its buffers; every multiple of 8 tested was right, and every model here has multiples of 16
(AVX-512's width). On one device only: on a data-parallel mesh the statistics must be those of
the whole batch, which a call on one device's part cannot give (`models.layers.BatchNorm` then
runs the pure-JAX path, as it does for other dtypes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from convnet_jax.ops import onednn

# The channel counts oneDNN's batch normalisation is used for: multiples of this (see above).
CHANNEL_MULTIPLE = 16


def supports(x: jax.Array) -> bool:
  """Whether `batch_norm_relu_onednn` takes these maps: NHWC with a multiple of
  `CHANNEL_MULTIPLE` channels, float32, or bfloat16 where oneDNN runs it natively."""
  if x.ndim != 4 or x.shape[-1] % CHANNEL_MULTIPLE:
    return False
  return x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and onednn.load().bf16_native)


def batch_norm_relu_onednn(x: jax.Array, epsilon: float, relu: bool,
                           offset: jax.Array | None = None) -> jax.Array:
  """(x - mean) / sqrt(variance + epsilon) per channel of an NHWC `x`, with the mean and biased
  variance of this batch, plus the float32 per-channel `offset` when given, followed by max(., 0)
  when `relu`; oneDNN's primitive forward and backward, in `x`'s dtype (float32 arithmetic).
  Works under `jit`, `grad`, `lax.scan` and `vmap` (one call per replica)."""
  if not supports(x):
    raise ValueError(f"batch_norm_relu_onednn takes float32 NHWC maps of a multiple of "
                     f"{CHANNEL_MULTIPLE} channels (bfloat16 where the CPU has bfloat16 "
                     f"arithmetic), not {x.dtype} {x.shape}")
  if offset is None:
    return _normalize(x, jnp.zeros((1,), jnp.float32), float(epsilon), bool(relu), False)
  return _normalize(x, offset.astype(jnp.float32), float(epsilon), bool(relu), True)


def _workspace(x: jax.Array, epsilon: float, relu: bool, use_offset: bool) -> jax.ShapeDtypeStruct:
  # (Asking oneDNN for its size also loads the extension and registers the custom calls.)
  # The fused ReLU's mask, kept from the forward call for the backward one; one unused byte
  # without the ReLU (no buffer is empty).
  size = onednn.batch_norm_workspace_bytes(tuple(x.shape), epsilon, relu, use_offset,
                                           x.dtype == jnp.bfloat16)
  return jax.ShapeDtypeStruct((max(size, 1),), jnp.uint8)


def _forward_call(x, offset, epsilon, relu, use_offset):
  statistics = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call(
      onednn.TARGETS["batch_norm_forward"],
      (jax.ShapeDtypeStruct(x.shape, x.dtype), statistics, statistics,
       _workspace(x, epsilon, relu, use_offset)),
      vmap_method="sequential")(x, offset, epsilon=np.float32(epsilon), relu=np.int64(relu),
                                offset=np.int64(use_offset))


# Without an offset, `offset` is a one-element placeholder (no buffer is empty) whose gradient
# is zero.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _normalize(x, offset, epsilon, relu, use_offset):
  return _forward_call(x, offset, epsilon, relu, use_offset)[0]


def _normalize_forward(x, offset, epsilon, relu, use_offset):
  y, mean, variance, workspace = _forward_call(x, offset, epsilon, relu, use_offset)
  return y, (x, mean, variance, workspace, offset)


def _normalize_backward(epsilon, relu, use_offset, residuals, output_gradient):
  x, mean, variance, workspace, offset = residuals
  gradient, offset_gradient = jax.ffi.ffi_call(
      onednn.TARGETS["batch_norm_backward"],
      (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(mean.shape, jnp.float32)),
      vmap_method="sequential")(x, mean, variance, output_gradient, workspace,
                                epsilon=np.float32(epsilon), relu=np.int64(relu),
                                offset=np.int64(use_offset))
  if not use_offset:
    offset_gradient = jnp.zeros_like(offset)
  return gradient, offset_gradient


_normalize.defvjp(_normalize_forward, _normalize_backward)
