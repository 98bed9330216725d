"""The convolution paths: one convolution, several ways to compute it.

Every function here computes the same bias-free convolution of an NHWC input with an HWIO
kernel (square kernel, `padding` zeros on each side, kernel_size // 2 when None, or a pair
(before, after) for the rows and the columns alike; the same stride on both axes; for an odd
kernel with the default padding, output pixel i is centred on input pixel stride * i as in
PyTorch). They differ only in
speed on each backend and in the last digits of float sums:

* "onednn": XLA FFI custom calls into oneDNN (forward, input gradient and kernel gradient), the
  fastest on x86-64 CPUs where the extension was built (`convnet_jax.ops.onednn`);
* "im2col": patches times the kernel, one matrix product (pure JAX, the CPU fallback);
* "xla": XLA's native convolution (cuDNN on GPU, the MXU on TPU);
* "hybrid": XLA's convolution forward, matrix products for the kernel gradient (pure JAX).

`choose_conv_implementation` resolves `config.model.conv_implementation` ("auto" included) to one of
them and says why; `choose_dtype` resolves `config.model.dtype` ("auto": bfloat16 where the
hardware has bfloat16 arithmetic, float32 elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from convnet_jax.ops import onednn
from convnet_jax.parallel import data_parallel
from convnet_jax.errors import UserError


Padding = int | tuple[int, int] | None


def padding_pair(kernel_size: int, padding: Padding) -> tuple[int, int]:
  """The zeros (before, after) of `padding`: kernel_size // 2 on each side for None
  (PyTorch's `padding=k // 2`), p on each side for an int p, a pair as it is."""
  if padding is None:
    return kernel_size // 2, kernel_size // 2
  if isinstance(padding, (tuple, list)):
    before, after = padding
    return int(before), int(after)
  return int(padding), int(padding)


def conv_output_size(size: int, strides: int, kernel_size: int = 1,
                     padding: Padding = None) -> int:
  """Output height (or width) of a convolution with `padding` (`padding_pair`): for an odd
  kernel with the default that is `size` at stride 1 and 16 for 32 at stride 2; 31 for a 2x2
  kernel without padding on 32; 30 for a 3x3 kernel padded (1, 0) on 31."""
  before, after = padding_pair(kernel_size, padding)
  return (size + before + after - kernel_size) // strides + 1


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: int = 1,
                padding: Padding = None) -> jax.Array:
  """Convolution (NHWC input, HWIO kernel, `padding` as `padding_pair` reads it, the same
  stride along height and width) as one matrix product over patches.

  XLA's CPU convolution gradients are slow (and slower still inside `lax.scan`); the patches are
  plain slices, so forward and backward become dots that run at matmul speed. With a stride the
  patches are strided slices, so only the output pixels that are kept get computed.
  Output pixel i is centred on input pixel strides * i, as in PyTorch (XLA's 'SAME' would pad
  only after the image for stride 2 and shift the windows by one pixel).
  """
  kh, kw, cin, cout = kernel.shape
  padding = padding_pair(kh, padding)
  if kh == kw == 1 and padding == (0, 0):
    if strides > 1:
      x = x[:, ::strides, ::strides, :]
    return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
  _, height, width, _ = x.shape
  out_height = conv_output_size(height, strides, kh, padding)
  out_width = conv_output_size(width, strides, kw, padding)
  padded = jnp.pad(x, ((0, 0), padding, padding, (0, 0)))
  row_span, column_span = strides * (out_height - 1) + 1, strides * (out_width - 1) + 1
  patches = jnp.concatenate([padded[:, i:i + row_span:strides, j:j + column_span:strides, :]
                             for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def conv_xla(x: jax.Array, kernel: jax.Array, strides: int = 1,
             padding: Padding = None) -> jax.Array:
  """The same convolution as `conv_im2col` with XLA's native convolution (cuDNN on GPU, MXU on
  TPU); for an odd kernel at stride 1 with the default padding this is 'SAME' padding."""
  padding = padding_pair(kernel.shape[0], padding)
  # The kernel is passed as OHWI: on XLA's CPU backend that layout ran the forward and input
  # gradient convolutions fastest of the six orders measured (18 ms against 34 ms for HWIO).
  return jax.lax.conv_general_dilated(x, kernel.transpose(3, 0, 1, 2), (strides, strides),
                                      (padding, padding),
                                      dimension_numbers=("NHWC", "OHWI", "NHWC"))


def _kernel_gradient_by_shifts(x: jax.Array, output_gradient: jax.Array, kernel_shape):
  """dL/dkernel of a stride-1 'SAME' convolution: for each tap (i, j), the shifted input
  window times the output gradient, each as one plain 2-D matrix product."""
  kh, kw, cin, cout = kernel_shape
  _, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  gradient_rows = output_gradient.reshape(-1, cout)
  taps = [padded[:, i:i + height, j:j + width, :].reshape(-1, cin).T @ gradient_rows
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kernel_shape)


def conv_hybrid(x: jax.Array, kernel: jax.Array, strides: int = 1,
                padding: Padding = None) -> jax.Array:
  """XLA's convolution for the forward pass and the input gradient, matrix products for the
  kernel gradient (stride 1 'SAME'; strided convolutions, only in ResNet stage openings, and
  other paddings use im2col)."""
  size = kernel.shape[0]
  if strides != 1 or padding_pair(size, padding) != padding_pair(size, None) or size % 2 == 0:
    return conv_im2col(x, kernel, strides, padding)
  return _conv_hybrid_stride1(x, kernel)


@jax.custom_vjp
def _conv_hybrid_stride1(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution: XLA's convolution for the forward pass and the input gradient,
  matrix products for the kernel gradient.

  On XLA's CPU backend the forward and input-gradient convolutions are fast (~20 ms for
  128x32x32, 16->32) but the kernel-gradient convolution is ~15x slower (~300 ms); per-tap
  matrix products compute it in ~70 ms without materialising im2col patches.
  """
  return conv_xla(x, kernel)


def _conv_hybrid_forward(x, kernel):
  return conv_xla(x, kernel), (x, kernel)


def _conv_hybrid_backward(residuals, output_gradient):
  x, kernel = residuals
  # The input gradient of a 'SAME' convolution is the 'SAME' convolution of the output
  # gradient with the kernel rotated by 180 degrees and its channel axes swapped.
  flipped = jnp.flip(kernel, axis=(0, 1)).transpose(0, 1, 3, 2)
  input_gradient = conv_xla(output_gradient, flipped)
  kernel_gradient = _kernel_gradient_by_shifts(x, output_gradient, kernel.shape)
  return input_gradient, kernel_gradient.astype(kernel.dtype)


_conv_hybrid_stride1.defvjp(_conv_hybrid_forward, _conv_hybrid_backward)


def conv_onednn(x: jax.Array, kernel: jax.Array, strides: int = 1,
                padding: Padding = None) -> jax.Array:
  """The convolution as oneDNN custom calls, in float32 or bfloat16 (other dtypes, or mixed
  ones, run `conv_im2col`).

  bfloat16 runs oneDNN's bfloat16 kernels (float32 sums) where the CPU has bfloat16 arithmetic
  (`onednn.Status.bf16_native`); elsewhere its float32 kernels on the bfloat16 values, rounded
  back to bfloat16: the same products (a bfloat16 value is exact in float32) and float32 sums,
  at float32 speed, where oneDNN has no bfloat16 kernels at all.

  Works under `jit`, `grad`, `lax.scan` and `vmap` (replicas: one call per replica, in
  sequence), and on a data-parallel mesh (`data_parallel.tracing_mesh`: each device convolves its
  part of the batch). Raises `ConvUnavailable` where the extension cannot load (see
  `choose_conv_implementation`, which falls back instead).
  """
  dtype = x.dtype
  if kernel.dtype != dtype or dtype not in (jnp.float32, jnp.bfloat16):
    return conv_im2col(x, kernel, strides, padding)
  status = onednn.load()  # registers the custom-call targets on first use
  if not status.available:
    raise ConvUnavailable(f"the oneDNN extension is not available: {status.detail}")
  padding = padding_pair(kernel.shape[0], padding)
  if dtype == jnp.bfloat16 and not status.bf16_native:
    return _conv_onednn(x.astype(jnp.float32), kernel.astype(jnp.float32), strides,
                        padding).astype(dtype)
  return _conv_onednn(x, kernel, strides, padding)


def _onednn_call(target: str, shape, *operands, strides: int,
                 padding: tuple[int, int]) -> jax.Array:
  # "sequential": under vmap (replicas), one call per replica; each has its own kernel.
  return jax.ffi.ffi_call(onednn.TARGETS[target], jax.ShapeDtypeStruct(shape, operands[0].dtype),
                          vmap_method="sequential")(
                              *operands, stride=np.int64(strides),
                              padding_low=np.int64(padding[0]),
                              padding_high=np.int64(padding[1]))


def split_mesh(batch: int):
  """The mesh in context (`jax.set_mesh`, as `steps` sets it for a data-parallel run) when a
  batch of this size is split over its data axis (`data_parallel.split_batch`'s rule), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or data_parallel.DATA_AXIS not in mesh.axis_names:
    return None
  devices = mesh.shape[data_parallel.DATA_AXIS]
  return mesh if devices > 1 and batch % devices == 0 else None


def _per_device(function, mesh, in_specs, out_specs):
  """`function` run by each data-parallel device on its part of the batch (shard_map), so the
  custom calls, which XLA cannot partition, see local arrays; as is without a mesh."""
  if mesh is None:
    return function
  return jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


_SPLIT, _WHOLE = P(data_parallel.DATA_AXIS), P()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_onednn(x: jax.Array, kernel: jax.Array, strides: int,
                 padding: tuple[int, int]) -> jax.Array:
  size = kernel.shape[0]

  def forward(x, kernel):
    batch, height, width, _ = x.shape
    output_shape = (batch, conv_output_size(height, strides, size, padding),
                    conv_output_size(width, strides, size, padding), kernel.shape[-1])
    return _onednn_call("forward", output_shape, x, kernel, strides=strides, padding=padding)

  return _per_device(forward, split_mesh(x.shape[0]), (_SPLIT, _WHOLE), _SPLIT)(x, kernel)


def _conv_onednn_forward(x, kernel, strides, padding):
  return _conv_onednn(x, kernel, strides, padding), (x, kernel)


def _conv_onednn_backward(strides, padding, residuals, output_gradient):
  x, kernel = residuals
  mesh = split_mesh(x.shape[0])

  # Two separate calls, so XLA drops the input gradient where nothing uses it (the stem's).
  def input_gradient(output_gradient, kernel):
    shape = (output_gradient.shape[0],) + x.shape[1:]
    return _onednn_call("backward_data", shape, output_gradient, kernel, strides=strides,
                        padding=padding)

  def kernel_gradient(x, output_gradient):
    gradient = _onednn_call("backward_weights", kernel.shape, x, output_gradient,
                            strides=strides, padding=padding)
    # Each device's part of the batch gives a partial sum; the kernel's gradient is their sum.
    return gradient if mesh is None else jax.lax.psum(gradient, data_parallel.DATA_AXIS)

  return (_per_device(input_gradient, mesh, (_SPLIT, _WHOLE), _SPLIT)(output_gradient, kernel),
          _per_device(kernel_gradient, mesh, (_SPLIT, _SPLIT), _WHOLE)(x, output_gradient))


_conv_onednn.defvjp(_conv_onednn_forward, _conv_onednn_backward)


CONV_IMPLEMENTATIONS = {"onednn": conv_onednn, "im2col": conv_im2col, "xla": conv_xla,
                        "hybrid": conv_hybrid}


@dataclasses.dataclass(frozen=True)
class ConvChoice:
  """The convolution path a run uses (a key of `CONV_IMPLEMENTATIONS`) and why."""
  implementation: str
  reason: str

  def describe(self) -> str:
    """The start-up line: "convolutions: onednn (auto: oneDNN 3.2.0 on an x86-64 CPU)"."""
    return f"convolutions: {self.implementation} ({self.reason})"

  def record(self) -> dict[str, str]:
    """As kept in a run's config.json."""
    return {"implementation": self.implementation, "reason": self.reason}


# The compute dtypes a config may name, besides "auto" (`choose_dtype`).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
  """The compute dtype a run uses (one of `DTYPES`) and why."""
  dtype: str
  reason: str

  def describe(self) -> str:
    """The start-up line: "dtype: float32 (auto: ...)"."""
    return f"dtype: {self.dtype} ({self.reason})"


def choose_dtype(requested: str, backend: str | None = None) -> DtypeChoice:
  """Resolves `config.model.dtype` for this process, or for `backend` ("cpu", "gpu", "tpu";
  default: JAX's backend here) when compiling for another platform.

  "auto" is bfloat16 where it is computed natively and so faster: GPUs and TPUs, and CPUs with
  bfloat16 arithmetic (AVX512_BF16 or AMX, as oneDNN finds them: its bfloat16 kernels).
  Elsewhere it is float32: without that arithmetic oneDNN runs bfloat16 on its float32 kernels
  at float32 speed (docs/speed.md), and without oneDNN XLA's bfloat16 path is slower still, so
  bfloat16 would only cost accuracy. Other values are returned as they are.
  """
  if requested != "auto":
    return DtypeChoice(requested, "as configured")
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return DtypeChoice("bfloat16", f"auto: {backend} computes bfloat16 natively")
  status = onednn.load()
  if not status.available:
    return DtypeChoice("float32", f"auto: no oneDNN bfloat16 kernels here ({status.detail})")
  if status.bf16_native:
    return DtypeChoice("bfloat16", "auto: the CPU has bfloat16 arithmetic (AVX512_BF16 or AMX)")
  return DtypeChoice("float32", "auto: the CPU has no bfloat16 arithmetic (AVX512_BF16 or AMX), "
                                "where bfloat16 runs float32 kernels no faster")


class ConvUnavailable(UserError):
  """`conv_implementation` names a path that cannot run here; the message says why."""

  def naming_the_key(self, requested: str, advice: str = "") -> UserError:
    """The same as an error naming `config.model.conv_implementation` (its value `requested`), with
    `advice` after the reason."""
    return UserError(f"config.model.conv_implementation={requested!r}: {self}{advice}")


def check_conv_implementation(requested: str) -> None:
  """Raises `ConvUnavailable` when `requested` is "onednn" and the extension cannot load here.
  Cheap and backend-free, for validating a config before any work."""
  if requested == "onednn":
    status = onednn.load()
    if not status.available:
      raise ConvUnavailable(f"the oneDNN extension is not available: {status.detail}")


def choose_conv_implementation(requested: str, dtype: str = "float32",
                               num_devices: int = 1, backend: str | None = None) -> ConvChoice:
  """Resolves `config.model.conv_implementation` for this process, or for `backend` ("cpu", "gpu",
  "tpu"; default: JAX's backend here) when compiling for another platform.

  "auto": oneDNN on a CPU backend when the extension loads (float32, or bfloat16 in bfloat16
  kernels where the CPU has bfloat16 arithmetic and in float32 ones elsewhere, see
  `conv_onednn`; on a data-parallel mesh each device convolves its part of the batch); im2col on
  other CPUs and for other dtypes; XLA's native convolution on GPU and TPU. "onednn" asked for
  explicitly falls back the same way for other dtypes, and raises `ConvUnavailable` where the
  extension cannot load or the backend is not a CPU. `num_devices` only goes into the reason.
  """
  backend = backend or jax.default_backend()
  if requested not in ("auto", "onednn"):
    return ConvChoice(requested, "as configured")
  prefix = "auto" if requested == "auto" else "onednn asked for"
  if backend != "cpu":
    if requested == "onednn":
      raise ConvUnavailable(f"oneDNN runs on the CPU backend only, and JAX's backend here is "
                            f"{backend}")
    return ConvChoice("xla", f"auto: native convolution on {backend}")
  check_conv_implementation(requested)
  status = onednn.load()
  if not status.available:
    return ConvChoice("im2col", f"auto: oneDNN extension unavailable ({status.detail})")
  if dtype not in ("float32", "bfloat16"):
    return ConvChoice("im2col", f"{prefix}, but the oneDNN path is float32 and bfloat16 only "
                                f"and the dtype is {dtype}")
  where = f" on an {platform.machine()} CPU"
  if dtype == "bfloat16":
    where += (", bfloat16 kernels (the CPU has bfloat16 arithmetic)" if status.bf16_native else
              ", float32 kernels for bfloat16: this CPU has no bfloat16 arithmetic "
              "(AVX512_BF16 or AMX)")
  if num_devices > 1:
    where += f", each of {num_devices} devices on its part of the batch"
  return ConvChoice("onednn", f"{prefix}: {status.detail}{where}")
