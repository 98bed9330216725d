"""The oneDNN convolution path (XLA FFI custom calls) against an independent numpy convolution
and against the pure-JAX im2col path: forward, input gradient and kernel gradient for every
convolution shape the seed net and the ResNets use; under jit, lax.scan and vmap; and the
choice of path with its fallbacks."""

import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from convnet_jax.ops import conv
from convnet_jax.ops import onednn

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("conv")

ONEDNN_SUPPORTED = sys.platform.startswith("linux") and platform.machine() == "x86_64"


@pytest.fixture(scope="module", autouse=True)
def extension_loaded():
  """Where the extension is meant to exist it must load: a missing build fails, never skips."""
  status = onednn.load()
  if ONEDNN_SUPPORTED:
    assert status.available, f"oneDNN extension not available on Linux x86-64: {status.detail}"
  else:
    pytest.fail(f"these tests run on Linux x86-64; here: {status.detail}")


# --- An independent reference: the definition, in float64 numpy. -------------------------------

def _pair(k, p):
  """(before, after) zeros: k // 2 each for None, p each for an int, a pair as it is."""
  p = k // 2 if p is None else p
  return tuple(p) if isinstance(p, tuple) else (p, p)


def _padded(x, p):
  return np.pad(x, ((0, 0), p, p, (0, 0)))


def numpy_conv(x, w, s, p=None):
  """y[n,i,j,o] = sum_{a,b,c} xpad[n, s*i+a, s*j+b, c] w[a,b,c,o], p zeros of padding on each
  side (None: k // 2) or a pair (before, after)."""
  k = w.shape[0]
  p = _pair(k, p)
  xp = _padded(x, p)
  oh, ow = (x.shape[1] + sum(p) - k) // s + 1, (x.shape[2] + sum(p) - k) // s + 1
  y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for a in range(k):
    for b in range(k):
      window = xp[:, a:a + s * (oh - 1) + 1:s, b:b + s * (ow - 1) + 1:s, :]
      y += np.einsum("nijc,co->nijo", window, w[a, b])
  return y


def numpy_conv_gradients(x, w, s, dy, p=None):
  """dL/dx and dL/dw of L = sum(conv(x, w) * dy), by scattering each tap back."""
  k = w.shape[0]
  p = _pair(k, p)
  xp = _padded(x, p)
  oh, ow = dy.shape[1:3]
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for a in range(k):
    for b in range(k):
      rows, cols = slice(a, a + s * (oh - 1) + 1, s), slice(b, b + s * (ow - 1) + 1, s)
      dw[a, b] = np.einsum("nijc,nijo->co", xp[:, rows, cols, :], dy)
      dxp[:, rows, cols, :] += np.einsum("nijo,co->nijc", dy, w[a, b])
  return dxp[:, p[0]:p[0] + x.shape[1], p[0]:p[0] + x.shape[2], :], dw


def assert_close(got, expected, rtol=1e-5):
  """Within rtol of the reference, relative to the reference's largest magnitude (float32 sums
  of up to 4,608 products, against exact float64)."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


# (in channels, out channels, kernel size, stride, input size): every convolution of the seed
# net (stem, 3x3 mains, 1x1 skips), of ResNet-18 (width 64: stem, stage convolutions, stride-2
# openings and 1x1 stride-2 shortcuts) and ResNet-50 (bottleneck 1x1 reduce/expand, 3x3 with the
# stride, 1x1 shortcuts), each at the resolution it runs at; plus an odd size at stride 2.
SHAPES = [
    (3, 16, 3, 1, 32), (16, 32, 3, 1, 32), (16, 32, 1, 1, 32), (32, 64, 3, 1, 16),
    (32, 64, 1, 1, 16), (64, 128, 3, 1, 8), (64, 128, 1, 1, 8),
    (3, 64, 3, 1, 32), (64, 64, 3, 1, 32), (64, 128, 3, 2, 32), (64, 128, 1, 2, 32),
    (128, 128, 3, 1, 16), (128, 256, 3, 2, 16), (128, 256, 1, 2, 16), (256, 256, 3, 1, 8),
    (256, 512, 3, 2, 8), (256, 512, 1, 2, 8), (512, 512, 3, 1, 4),
    (64, 64, 1, 1, 32), (64, 256, 1, 1, 32), (256, 64, 1, 1, 32), (128, 128, 3, 2, 32),
    (256, 512, 1, 2, 32), (512, 1024, 1, 2, 16), (1024, 2048, 1, 2, 8), (512, 512, 3, 2, 8),
    (5, 6, 3, 2, 7),
]


# airbench94's convolutions: the unpadded 2x2 whitening at 32x32, then each group's two 3x3s,
# the first padded (1, 0) on its odd map (its output's last row and column, which the max-pool
# would drop, left out), and the symmetric forms of those too.
AIRBENCH_SHAPES = [
    (3, 24, 2, 1, 32, 0), (24, 64, 3, 1, 31, 1), (64, 64, 3, 1, 15, 1), (64, 256, 3, 1, 15, 1),
    (256, 256, 3, 1, 7, 1), (256, 256, 3, 1, 3, 1), (5, 6, 2, 2, 9, 1),
    (24, 64, 3, 1, 31, (1, 0)), (64, 256, 3, 1, 15, (1, 0)), (256, 256, 3, 1, 7, (1, 0)),
    (5, 6, 3, 2, 9, (0, 2)),
]


def _case(cin, cout, k, s, size, batch=2, seed=0, p=None):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, cin))
  w = rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
  out = (size + sum(_pair(k, p)) - k) // s + 1
  dy = rng.standard_normal((batch, out, out, cout))
  return x, w, dy


def _forward_and_gradients(fn, x, w, s, dy, p=None):
  y, vjp = jax.vjp(lambda x, w: fn(x, w, s, p), jnp.asarray(x, jnp.float32),
                   jnp.asarray(w, jnp.float32))
  return (y,) + vjp(jnp.asarray(dy, jnp.float32))


@pytest.mark.parametrize("cin,cout,k,s,size", SHAPES)
def test_forward_and_gradients_match_numpy_and_im2col(cin, cout, k, s, size):
  x, w, dy = _case(cin, cout, k, s, size)
  got = jax.jit(_forward_and_gradients, static_argnums=(0, 3))(conv.conv_onednn, x, w, s, dy)
  expected = (numpy_conv(x, w, s),) + numpy_conv_gradients(x, w, s, dy)
  im2col = _forward_and_gradients(conv.conv_im2col, x, w, s, dy)
  for name, g, e, i in zip(("output", "input gradient", "kernel gradient"), got, expected,
                           im2col):
    assert_close(g, e), name
    assert_close(g, i), name


@pytest.mark.parametrize("cin,cout,k,s,size,p", AIRBENCH_SHAPES)
@pytest.mark.parametrize("implementation", ["onednn", "im2col", "xla", "hybrid"])
def test_airbench_convolutions_match_numpy(implementation, cin, cout, k, s, size, p):
  x, w, dy = _case(cin, cout, k, s, size, p=p)
  got = jax.jit(_forward_and_gradients, static_argnums=(0, 3, 5))(
      conv.CONV_IMPLEMENTATIONS[implementation], x, w, s, dy, p)
  expected = (numpy_conv(x, w, s, p),) + numpy_conv_gradients(x, w, s, dy, p)
  for name, g, e in zip(("output", "input gradient", "kernel gradient"), got, expected):
    assert_close(g, e), name


def test_the_gradient_of_a_sum_of_squares_is_twice_the_output_times_the_input():
  """d/dw sum(conv(x, w)^2) = 2 sum over pixels of x * conv(x, w) for a 1x1 convolution: a
  closed form that needs no convolution code."""
  rng = np.random.default_rng(3)
  x, w = rng.standard_normal((3, 4, 4, 5)), rng.standard_normal((1, 1, 5, 6))
  grad = jax.grad(lambda w: jnp.sum(conv.conv_onednn(jnp.asarray(x, jnp.float32), w) ** 2))(
      jnp.asarray(w, jnp.float32))
  y = np.einsum("nhwc,co->nhwo", x, w[0, 0])
  assert_close(grad[0, 0], 2 * np.einsum("nhwc,nhwo->co", x, y))


def test_inside_lax_scan():
  """A scan that applies the same kernel three times (as the epoch's scan does with steps)."""
  x, w, _ = _case(4, 4, 3, 1, 6, seed=1)

  def run(fn, x, w):
    def body(h, _):
      return fn(h, w, 1), jnp.sum(h)
    h, sums = jax.lax.scan(body, x, None, length=3)
    return jnp.sum(h ** 2) + jnp.sum(sums)

  args = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  got = jax.jit(jax.value_and_grad(lambda x, w: run(conv.conv_onednn, x, w), argnums=(0, 1)))(
      *args)
  expected = jax.value_and_grad(lambda x, w: run(conv.conv_im2col, x, w), argnums=(0, 1))(*args)
  for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    assert_close(g, e)


@pytest.mark.parametrize("s", [1, 2])
def test_under_vmap_each_replica_has_its_own_kernel(s):
  """vmap over inputs and kernels (replicas), forward and gradients, against each replica's own
  numpy convolution."""
  rng = np.random.default_rng(2)
  xs, ws = rng.standard_normal((3, 2, 8, 8, 4)), rng.standard_normal((3, 3, 3, 4, 5))
  out = (8 - 1) // s + 1
  dys = rng.standard_normal((3, 2, out, out, 5))
  got = jax.jit(jax.vmap(lambda x, w, dy: _forward_and_gradients(conv.conv_onednn, x, w, s, dy)))(
      jnp.asarray(xs, jnp.float32), jnp.asarray(ws, jnp.float32), jnp.asarray(dys, jnp.float32))
  for replica in range(3):
    expected = (numpy_conv(xs[replica], ws[replica], s),) + numpy_conv_gradients(
        xs[replica], ws[replica], s, dys[replica])
    for g, e in zip(got, expected):
      assert_close(g[replica], e)


def test_unused_input_gradient_is_not_computed():
  """The stem's input gradient is never used: XLA drops that custom call (a separate one)."""
  x, w, _ = _case(3, 8, 3, 1, 8)
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv.conv_onednn(x, w) ** 2)))
  text = grad.lower(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)).compile().as_text()
  assert onednn.TARGETS["backward_weights"] in text
  assert onednn.TARGETS["backward_data"] not in text


# bfloat16 keeps 8 significant bits: rounding to nearest is off by at most 2^-8 relative.
BF16_ROUNDING = 2.0 ** -8


def _bf16(values):
  return jnp.asarray(values, jnp.bfloat16)


def _as_float64(values):
  return np.asarray(jnp.asarray(values, jnp.float32), np.float64)


@pytest.mark.parametrize("cin,cout,k,s,size,p", [
    (3, 16, 3, 1, 32, None), (64, 128, 3, 2, 16, None), (64, 128, 1, 2, 16, None),
    (128, 128, 3, 1, 8, None), (3, 24, 2, 1, 32, 0), (5, 6, 3, 2, 7, None),
    (24, 64, 3, 1, 31, (1, 0)), (256, 256, 3, 1, 7, (1, 0)), (256, 320, 3, 1, 7, None),
    (320, 256, 3, 1, 3, None), (256, 256, 3, 1, 8, None)])
def test_bfloat16_matches_the_exact_convolution_of_its_values_rounded_once(cin, cout, k, s, size,
                                                                           p):
  """bfloat16 in, bfloat16 out, sums in float32: each output, input gradient and kernel
  gradient is the exact (float64) result on the bfloat16 inputs, rounded once to bfloat16.
  Runs whichever kernels this CPU gets: oneDNN's bfloat16 ones with AVX512_BF16 or AMX, its
  float32 ones elsewhere."""
  x, w, dy = _case(cin, cout, k, s, size, p=p)
  x, w, dy = _bf16(x), _bf16(w), _bf16(dy)
  got = jax.jit(lambda x, w, dy: (lambda y, vjp: (y,) + vjp(dy))(
      *jax.vjp(lambda x, w: conv.conv_onednn(x, w, s, p), x, w)))(x, w, dy)
  exact = (numpy_conv(_as_float64(x), _as_float64(w), s, p),) + numpy_conv_gradients(
      _as_float64(x), _as_float64(w), s, _as_float64(dy), p)
  for name, g, e in zip(("output", "input gradient", "kernel gradient"), got, exact):
    assert g.dtype == jnp.bfloat16, name
    # Rounding, plus float32 sums of up to 1,152 products (~1e-6 of the largest magnitude).
    np.testing.assert_allclose(_as_float64(g), e, rtol=BF16_ROUNDING * 1.01,
                               atol=1e-5 * np.max(np.abs(e)), err_msg=name)


def test_bfloat16_runs_through_onednn_not_im2col():
  x, w, _ = _case(4, 6, 3, 1, 6)
  text = jax.jit(conv.conv_onednn).lower(_bf16(x), _bf16(w)).as_text()
  assert onednn.TARGETS["forward"] in text


def test_other_dtypes_and_mixed_dtypes_run_im2col():
  x, w, _ = _case(4, 6, 3, 1, 6)
  for x_dtype, w_dtype in ((jnp.float16, jnp.float16), (jnp.bfloat16, jnp.float32)):
    lowered = jax.jit(conv.conv_onednn).lower(jnp.asarray(x, x_dtype), jnp.asarray(w, w_dtype))
    assert onednn.TARGETS["forward"] not in lowered.as_text()


# --- Which path runs, and why. ------------------------------------------------------------------

def test_auto_picks_onednn_on_a_cpu_with_the_extension():
  choice = conv.choose_conv_implementation("auto")
  assert choice.implementation == "onednn"
  assert choice.describe().startswith("convolutions: onednn (auto: oneDNN 3.")


@pytest.mark.parametrize("bf16_native", [True, False])
@pytest.mark.parametrize("requested", ["auto", "onednn"])
def test_bfloat16_keeps_onednn_and_says_which_kernels(monkeypatch, requested, bf16_native):
  monkeypatch.setattr(onednn, "load", lambda: onednn.Status(True, "oneDNN 3.2.0", bf16_native))
  choice = conv.choose_conv_implementation(requested, dtype="bfloat16")
  assert choice.implementation == "onednn"
  if bf16_native:
    assert choice.reason.endswith("bfloat16 kernels (the CPU has bfloat16 arithmetic)")
  else:
    assert choice.reason.endswith("float32 kernels for bfloat16: this CPU has no bfloat16 "
                                  "arithmetic (AVX512_BF16 or AMX)")


@pytest.mark.parametrize("bf16_native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_bfloat16_arithmetic(monkeypatch, bf16_native,
                                                                       expected):
  monkeypatch.setattr(onednn, "load", lambda: onednn.Status(True, "oneDNN 3.2.0", bf16_native))
  choice = conv.choose_dtype("auto", backend="cpu")
  assert choice.dtype == expected and choice.reason.startswith("auto: the CPU has")
  assert choice.describe() == f"dtype: {expected} ({choice.reason})"


def test_auto_dtype_without_onednn_is_float32_and_bfloat16_on_accelerators(monkeypatch):
  monkeypatch.setattr(onednn, "load", lambda: onednn.Status(False, "turned off"))
  assert conv.choose_dtype("auto", backend="cpu") == conv.DtypeChoice(
      "float32", "auto: no oneDNN bfloat16 kernels here (turned off)")
  for backend in ("gpu", "tpu"):
    assert conv.choose_dtype("auto", backend=backend).dtype == "bfloat16"
  for dtype in ("float32", "bfloat16"):
    assert conv.choose_dtype(dtype) == conv.DtypeChoice(dtype, "as configured")


def test_auto_dtype_here_follows_the_cpus_bfloat16_instructions():
  """Independent of oneDNN: the kernel's CPU flags (Linux)."""
  flags = set(open("/proc/cpuinfo").read().split())
  expected = "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
  assert conv.choose_dtype("auto").dtype == expected


def test_the_kernels_this_cpu_gets_follow_its_bfloat16_instructions():
  """oneDNN's own ISA test against the kernel's CPU flags (Linux)."""
  flags = set(open("/proc/cpuinfo").read().split())
  assert onednn.load().bf16_native == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_wide_kernel_gradients_run_onednns_gemm_implementation_on_avx2_cpus():
  """On an AVX2 CPU without AVX-512 (the kernel's CPU flags), a 3x3 kernel's gradient from 128
  input channels up runs oneDNN's im2col + GEMM implementation; 127 channels, a 1x1 kernel and
  the other passes keep the one oneDNN lists first (its direct AVX2 kernel for the gradient).
  Elsewhere oneDNN's first everywhere."""
  flags = set(open("/proc/cpuinfo").read().split())
  avx2_only = "avx2" in flags and "avx512f" not in flags

  def implementation(channels, kernel_size=3, pass_name="backward_weights"):
    padding = (kernel_size // 2,) * 2
    return onednn.conv_implementation(pass_name, (2, 8, 8, channels), kernel_size, 32,
                                      padding=padding)

  assert "gemm" not in implementation(127)
  if avx2_only:
    assert implementation(127) == "jit:avx2"
  assert "gemm" not in implementation(128, kernel_size=1)
  for pass_name in ("forward", "backward_data"):
    assert "gemm" not in implementation(384, pass_name=pass_name)
  for channels in (128, 384):
    assert ("gemm" in implementation(channels)) == avx2_only


def test_bfloat16_kernel_gradients_of_wide_layers_on_small_maps_run_on_patches_with_amx():
  """On a CPU with AMX (the kernel's CPU flags), the bfloat16 kernel gradient of a stride-1 3x3
  layer from 256 input channels with an output map of at most 7x7 runs as oneDNN's matrix
  product on the patches; 255 channels, an 8x8 output, stride 2, float32 and the other passes
  keep oneDNN's own convolution. Without AMX, oneDNN's own everywhere (or, without bfloat16
  arithmetic, no bfloat16 convolution at all). (The values:
  `test_bfloat16_matches_the_exact_convolution_of_its_values_rounded_once`.)"""
  flags = set(open("/proc/cpuinfo").read().split())
  amx = "amx_bf16" in flags

  def on_patches(channels, size, stride=1, bfloat16=True, pass_name="backward_weights",
                 padding=(1, 1)):
    try:
      name = onednn.conv_implementation(pass_name, (2, size, size, channels), 3, 32, stride,
                                        padding, bfloat16)
    except RuntimeError:
      # Only a bfloat16 convolution on a CPU without bfloat16 arithmetic may be refused.
      assert bfloat16 and not flags & {"avx512_bf16", "amx_bf16"}
      return False
    return name.startswith("patches+")

  for channels, size, padding in ((256, 7, (1, 1)), (256, 7, (1, 0)), (384, 3, (1, 1)),
                                  (512, 8, (1, 0))):
    assert on_patches(channels, size, padding=padding) == amx
  assert not on_patches(255, 7)
  assert not on_patches(256, 8)
  assert not on_patches(256, 7, stride=2)
  assert not on_patches(256, 7, bfloat16=False)
  for pass_name in ("forward", "backward_data"):
    assert not on_patches(256, 7, pass_name=pass_name)


def test_bfloat16_kernel_gradients_of_several_layers_and_replicas_share_the_patch_buffers():
  """Two layers of different sizes (7x7, then 3x3 reusing the larger buffers) under vmap over two
  replicas, in one program: each kernel gradient is still its replica's exact one, rounded once
  (on the patches path where the CPU has AMX, oneDNN's own elsewhere)."""
  cases = [_case(256, 32, 3, 1, size, batch=2, seed=size) for size in (7, 3)]

  def kernel_gradients(inputs):
    return [jax.vjp(lambda w: conv.conv_onednn(x, w), w)[1](dy)[0] for x, w, dy in inputs]

  replicated = [tuple(_bf16(np.stack([a, a[::-1] * 0.5])) for a in case) for case in cases]
  got = jax.jit(jax.vmap(kernel_gradients))(replicated)
  for (x, w, dy), g in zip(replicated, got):
    for replica in range(2):
      _, exact = numpy_conv_gradients(_as_float64(x[replica]), _as_float64(w[replica]), 1,
                                      _as_float64(dy[replica]))
      np.testing.assert_allclose(_as_float64(g[replica]), exact, rtol=BF16_ROUNDING * 1.01,
                                 atol=1e-5 * np.max(np.abs(exact)))


@pytest.mark.parametrize("requested", ["auto", "onednn"])
def test_float16_falls_back_to_im2col_and_data_parallel_keeps_onednn(requested):
  choice = conv.choose_conv_implementation(requested, dtype="float16")
  assert choice.implementation == "im2col" and "float32 and bfloat16 only" in choice.reason
  choice = conv.choose_conv_implementation(requested, num_devices=4)
  assert choice.implementation == "onednn"
  assert choice.reason.endswith("CPU, each of 4 devices on its part of the batch")


def test_other_names_are_taken_as_configured():
  for name in ("im2col", "xla", "hybrid"):
    assert conv.choose_conv_implementation(name) == conv.ConvChoice(name, "as configured")


FORCED_OFF = """
from convnet_jax.ops import conv, onednn
from convnet_jax.runs import validation
from configs import default

print(onednn.load())
print(conv.choose_conv_implementation("auto").describe())
config = default.get_config()
config.model.conv_implementation = "onednn"
try:
  validation.validate_config(config)
except Exception as error:
  print(type(error).__name__, error)
"""


def test_forcing_the_extension_off_falls_back_to_im2col():
  """With CONVNET_JAX_DISABLE_ONEDNN=1, auto runs im2col and says why; asking for onednn is a
  one-line config error."""
  result = subprocess.run([sys.executable, "-c", FORCED_OFF], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**__import__("os").environ, onednn.DISABLE_VARIABLE: "1"})
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert "available=False" in lines[0]
  assert lines[1] == ("convolutions: im2col (auto: oneDNN extension unavailable (turned off by "
                      "CONVNET_JAX_DISABLE_ONEDNN=1))")
  assert lines[2].startswith("UserError config.model.conv_implementation='onednn': the oneDNN "
                             "extension is not available: turned off by")
