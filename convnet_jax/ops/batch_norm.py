"""Batch normalisation with the batch's own statistics as oneDNN custom calls, optionally with
the ReLU that follows it in the same pass.

The same function as `models.layers.batch_norm` (per-channel mean and biased variance over N, H
and W, then (x - mean) / sqrt(variance + epsilon)), computed by oneDNN's batch normalisation
primitive: forward in one call that also returns the statistics, backward in one call. Measured
on a 2-core Zen 3 (AVX2), float32 at batch 128 (median of 30, forward + backward with the ReLU):
the seed net's maps (16, 32, 64 and 128 channels at 32x32, 32x32, 16x16 and 8x8) take 1.8, 5.9,
2.2 and 1.0 ms in oneDNN against ~5, ~12, ~4 and ~1.3 ms in XLA's fusions, which read and write
the map more often (the centred map is written out for the variance, the ReLU's mask is another
pass backward).

float32 only, and only for channel counts that are a multiple of `CHANNEL_MULTIPLE`: with 4
channels oneDNN 3.2's AVX2 kernels (which work on 8 channels at a time) returned a wrong kernel
gradient from the convolution that follows and at times spun forever in its barrier, as if the
normalisation wrote past its buffers; every multiple of 8 tested was right, and every model here
has multiples of 16 (AVX-512's width). On one device only: on a data-parallel mesh the
statistics must be those of the whole batch, which a call on one device's part cannot give
(`models.layers.BatchNorm` then runs the pure-JAX path, as it does for other dtypes).
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
  """Whether `batch_norm_relu_onednn` takes these maps: float32 NHWC with a multiple of
  `CHANNEL_MULTIPLE` channels."""
  return x.dtype == jnp.float32 and x.ndim == 4 and x.shape[-1] % CHANNEL_MULTIPLE == 0


def batch_norm_relu_onednn(x: jax.Array, epsilon: float, relu: bool) -> jax.Array:
  """(x - mean) / sqrt(variance + epsilon) per channel of a float32 NHWC `x`, with the mean and
  biased variance of this batch, followed by max(., 0) when `relu`; oneDNN's primitive forward
  and backward. Works under `jit`, `grad`, `lax.scan` and `vmap` (one call per replica)."""
  if not supports(x):
    raise ValueError(f"batch_norm_relu_onednn takes float32 NHWC maps of a multiple of "
                     f"{CHANNEL_MULTIPLE} channels, not {x.dtype} {x.shape}")
  return _normalize(x, float(epsilon), bool(relu))


def _workspace(x: jax.Array, epsilon: float, relu: bool) -> jax.ShapeDtypeStruct:
  # (Asking oneDNN for its size also loads the extension and registers the custom calls.)
  # The fused ReLU's mask, kept from the forward call for the backward one; one unused byte
  # without the ReLU (no buffer is empty).
  size = onednn.batch_norm_workspace_bytes(tuple(x.shape), epsilon, relu)
  return jax.ShapeDtypeStruct((max(size, 1),), jnp.uint8)


def _forward_call(x, epsilon, relu):
  statistics = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call(
      onednn.TARGETS["batch_norm_forward"],
      (jax.ShapeDtypeStruct(x.shape, x.dtype), statistics, statistics,
       _workspace(x, epsilon, relu)),
      vmap_method="sequential")(x, epsilon=np.float32(epsilon), relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize(x, epsilon, relu):
  return _forward_call(x, epsilon, relu)[0]


def _normalize_forward(x, epsilon, relu):
  y, mean, variance, workspace = _forward_call(x, epsilon, relu)
  return y, (x, mean, variance, workspace)


def _normalize_backward(epsilon, relu, residuals, output_gradient):
  x, mean, variance, workspace = residuals
  return (jax.ffi.ffi_call(onednn.TARGETS["batch_norm_backward"],
                           jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(
                               x, mean, variance, output_gradient, workspace,
                               epsilon=np.float32(epsilon), relu=np.int64(relu)),)


_normalize.defvjp(_normalize_forward, _normalize_backward)
