"""Loads the optional oneDNN convolution extension and registers its XLA FFI targets.

The extension (`convnet_jax/ops/csrc/onednn_conv.cc`, built by `pip install` where a C++
compiler and the PyPI oneDNN wheels are available) holds three XLA FFI handlers: a
convolution's forward pass, input gradient and kernel gradient on NHWC activations and HWIO
kernels. `load()` says whether it
can be used here and, if not, why; the pure-JAX convolutions stay the fallback.

Threads: nothing is set. oneDNN's OpenMP team (one thread per core) runs beside XLA's own pool;
measured on the 2-core machine, ms per step of the scanned seed-net epoch: 88-90 as is, 125 with
OMP_NUM_THREADS=1, 94 with OMP_WAIT_POLICY=passive, 92 with GOMP_SPINCOUNT=20000, 91 with XLA's
Eigen pool single-threaded (the calls run one at a time on XLA's thread, each using both cores).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys

import jax

# Setting this to 1 forces the pure-JAX convolutions, as if the extension had not been built.
DISABLE_VARIABLE = "CONVNET_JAX_DISABLE_ONEDNN"
EXTENSION_MODULE = "convnet_jax.ops._onednn_conv"
RUNTIME_DISTRIBUTION = "onednn-cpu-gomp"
TARGETS = {
    "forward": "convnet_onednn_conv_forward",
    "backward_data": "convnet_onednn_conv_backward_data",
    "backward_weights": "convnet_onednn_conv_backward_weights",
    "batch_norm_forward": "convnet_onednn_batch_norm_forward",
    "batch_norm_backward": "convnet_onednn_batch_norm_backward",
}


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the oneDNN convolutions can run in this process; `detail` is the oneDNN version
  when they can and the reason when they cannot; `bf16_native`: whether oneDNN runs bfloat16
  convolutions with this CPU's own bfloat16 instructions (AVX512_BF16 or AMX)."""
  available: bool
  detail: str
  bf16_native: bool = False
  # The loaded extension (None where it is not available), for `convolution_clock`.
  library: ctypes.CDLL | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class CallClock:
  """Wall time during which at least one call of the extension's convolutions, and of its
  batch normalisations, ran (overlapping calls of one kind count once), and the number of
  calls of each, since the extension was loaded."""
  convolution_seconds: float
  convolution_calls: int
  batch_norm_seconds: float
  batch_norm_calls: int


def _runtime_library() -> str:
  """Path of libdnnl.so.3 as installed by the onednn-cpu-gomp wheel (into the environment's
  lib/ folder, outside site-packages)."""
  try:
    files = importlib.metadata.files(RUNTIME_DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError:
    raise OSError(f"the {RUNTIME_DISTRIBUTION} package is not installed") from None
  for file in files:
    if file.name == "libdnnl.so.3":
      return str(file.locate())
  raise OSError(f"the {RUNTIME_DISTRIBUTION} package holds no libdnnl.so.3")


def extension_path() -> str | None:
  """The built extension's file, or None where it was not built."""
  spec = importlib.util.find_spec(EXTENSION_MODULE)
  return spec.origin if spec is not None and spec.origin else None


@functools.cache
def load() -> Status:
  """Loads the extension once per process and registers its targets for the CPU platform."""
  if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
    return Status(False, f"turned off by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}")
  if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
    return Status(False, f"built only for Linux x86-64, not {sys.platform} {platform.machine()}")
  origin = extension_path()
  if origin is None:
    return Status(False, "the extension was not built at install time (it needs a C++ compiler "
                         "and the onednn-devel-cpu-gomp wheel); reinstall with `pip install -e .`")
  try:
    # RTLD_GLOBAL: the extension names libdnnl.so.3 without a path, and the dynamic loader then
    # finds the copy already loaded here instead of searching the library path.
    # (ctypes never unloads a library, so it stays loaded for the extension.)
    ctypes.CDLL(_runtime_library(), mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(origin)
  except OSError as error:
    return Status(False, f"could not load the extension: {error}")
  for symbol in TARGETS.values():
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  library.convnet_onednn_version.restype = ctypes.c_char_p
  for counter in (library.convnet_onednn_busy_nanoseconds, library.convnet_onednn_calls):
    counter.restype, counter.argtypes = ctypes.c_int64, [ctypes.c_int]
  library.convnet_onednn_conv_implementation.restype = ctypes.c_char_p
  library.convnet_onednn_conv_implementation.argtypes = [ctypes.c_int64] * 11
  library.convnet_onednn_batch_norm_workspace_bytes.restype = ctypes.c_int64
  library.convnet_onednn_batch_norm_workspace_bytes.argtypes = (
      [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_int64] * 3)
  return Status(True, f"oneDNN {library.convnet_onednn_version().decode()}",
                bool(library.convnet_onednn_bf16_native()), library)


def batch_norm_workspace_bytes(shape: tuple[int, int, int, int], epsilon: float, relu: bool,
                               offset: bool = False, bfloat16: bool = False) -> int:
  """Bytes of the workspace oneDNN's batch normalisation of an NHWC `shape` (bfloat16 maps where
  `bfloat16`, else float32; with a learnt `offset` or not) keeps for its backward pass (the fused
  ReLU's mask; 0 without it). Raises RuntimeError where the extension is not loaded or oneDNN
  refuses the shape."""
  status = load()
  if status.library is None:
    raise RuntimeError(f"the oneDNN extension is not available: {status.detail}")
  size = status.library.convnet_onednn_batch_norm_workspace_bytes(
      *shape, epsilon, int(relu), int(offset), int(bfloat16))
  if size < 0:
    dtype = "bfloat16" if bfloat16 else "float32"
    raise RuntimeError(f"oneDNN has no batch normalisation for {dtype} NHWC {shape}")
  return size


PASSES = ("forward", "backward_data", "backward_weights")


def conv_implementation(pass_name: str, input_shape: tuple[int, int, int, int],
                        kernel_size: int, out_channels: int, stride: int = 1,
                        padding: tuple[int, int] = (1, 1), bfloat16: bool = False) -> str:
  """oneDNN's name for the implementation that runs `pass_name` (one of `PASSES`) of a
  convolution of an NHWC `input_shape` (bfloat16 operands where `bfloat16`, else float32) in
  this process ("brgconv:avx2"; "patches+" and the matrix product's name where the kernel
  gradient runs on the patches, see `onednn_conv.cc`). Raises RuntimeError where the extension
  is not loaded or oneDNN refuses the shape."""
  status = load()
  if status.library is None:
    raise RuntimeError(f"the oneDNN extension is not available: {status.detail}")
  name = status.library.convnet_onednn_conv_implementation(
      PASSES.index(pass_name), *input_shape, out_channels, kernel_size, stride, *padding,
      int(bfloat16))
  if name is None:
    dtype = "bfloat16" if bfloat16 else "float32"
    raise RuntimeError(f"oneDNN has no {pass_name} convolution for {dtype} NHWC {input_shape}, "
                       f"kernel {kernel_size}, {out_channels} outputs")
  return name.decode()


def call_clock() -> CallClock | None:
  """The extension's clocks now (None where the extension is not loaded): two readings around
  some calls give the time those calls spent in oneDNN's convolutions and batch
  normalisations."""
  library = load().library
  if library is None:
    return None
  busy, calls = library.convnet_onednn_busy_nanoseconds, library.convnet_onednn_calls
  return CallClock(busy(0) / 1e9, calls(0), busy(1) / 1e9, calls(1))
