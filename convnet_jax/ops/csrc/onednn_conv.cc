// XLA FFI custom calls into oneDNN for the trainer's convolutions and batch normalisations on
// x86-64 CPUs.
//
// Three handlers, one per pass of a convolution with NHWC activations and an HWIO kernel, square
// kernel, `padding_low` zeros before and `padding_high` after the rows and the columns, and the
// same stride on both axes (the trainer passes PyTorch's `padding=k // 2` on both sides for its
// odd kernels, 0 for airbench's 2x2 whitening, and (1, 0) for a 3x3 convolution whose odd-sized
// output a 2x2 max-pool would crop: that computes its first rows and columns only):
//   convnet_onednn_conv_forward           x[N,H,W,C], w[KH,KW,C,K]   -> y[N,OH,OW,K]
//   convnet_onednn_conv_backward_data     dy[N,OH,OW,K], w[KH,KW,C,K] -> dx[N,H,W,C]
//   convnet_onednn_conv_backward_weights  x[N,H,W,C], dy[N,OH,OW,K]  -> dw[KH,KW,C,K]
// XLA's row-major buffers are handed to oneDNN as they are (its `nhwc` and `hwio` tags); only the
// small kernels are reordered into the blocked layout oneDNN picks for each primitive. Each pass
// runs the implementation oneDNN lists first, except the kernel gradient of wide layers on AVX2
// CPUs (`prefers_gemm_backward_weights`) and the bfloat16 kernel gradient of wide layers on small
// maps on AMX CPUs, which runs as oneDNN's matrix product on the input's patches
// (`prefers_patches_backward_weights`).
// Every operand of a call is float32, or every one bfloat16 (oneDNN accumulates bfloat16 in
// float32); `convnet_onednn_bf16_native` says whether this CPU runs bfloat16 natively. The batch
// normalisations (below the convolutions) take float32 or bfloat16 maps, with float32
// statistics and offset.
//
// Primitives are built once per (pass, shape, stride, paddings) and kept in a mutex-guarded cache; each
// executing thread has its own stream and its own scratch buffers (scratchpad and reordered
// kernel), so XLA may run several of these calls at once.

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <cstring>
#include <string>
#include <unordered_map>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

enum class Pass : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// N, H, W, C (input), K (output channels), kernel size, stride, zeros of padding before and
// after (rows and columns alike), and the element type of every operand.
struct ConvShape {
  int64_t n, h, w, c, k, kernel, stride, padding_low, padding_high;
  memory::data_type type = memory::data_type::f32;
  int64_t out_h() const { return (h + padding_low + padding_high - kernel) / stride + 1; }
  int64_t out_w() const { return (w + padding_low + padding_high - kernel) / stride + 1; }
};

using CacheKey = std::array<int64_t, 11>;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One pass of one convolution, ready to run: the primitive, the activation layouts, the kernel
// layout it wants (and the reorder from or to the user's HWIO kernel when it differs) and its
// scratchpad size.
struct Prepared {
  dnnl::primitive primitive;
  memory::desc src, dst;
  memory::desc user_weights;
  memory::desc primitive_weights;
  bool needs_reorder = false;
  dnnl::reorder weights_reorder;
  size_t scratchpad_bytes = 0;
  std::string implementation;  // oneDNN's name for it ("brgconv:avx2"), for `onednn.conv_implementation`
  // The kernel gradient as one matrix product of the input's patches and the output gradient
  // (`prefers_patches_backward_weights`): `primitive` is then the matmul, and these lay out the
  // patches, a zero-padded copy of the input and, for each tap, its window copied into the
  // tap's columns (im2col by oneDNN reorders).
  bool patches = false;
  memory::desc padded_interior, tap_window, tap_columns;
  // The product's operands as matrices: patches^T (read transposed), dy, dw.
  memory::desc patches_matrix, output_gradient_matrix, kernel_matrix;
  dnnl::reorder pad_reorder, tap_reorder;
};

struct Descs {
  memory::desc src, weights_user, weights_any, dst;
  memory::dims strides, padding_low, padding_high;
};

Descs make_descs(const ConvShape& s) {
  const auto type = s.type;
  Descs d;
  d.src = memory::desc({s.n, s.c, s.h, s.w}, type, tag::nhwc);
  d.weights_user = memory::desc({s.k, s.c, s.kernel, s.kernel}, type, tag::hwio);
  d.weights_any = memory::desc({s.k, s.c, s.kernel, s.kernel}, type, tag::any);
  d.dst = memory::desc({s.n, s.k, s.out_h(), s.out_w()}, type, tag::nhwc);
  d.strides = {s.stride, s.stride};
  d.padding_low = {s.padding_low, s.padding_low};
  d.padding_high = {s.padding_high, s.padding_high};
  return d;
}

dnnl::convolution_forward::primitive_desc forward_desc(const Descs& d, const dnnl::primitive_attr& attr) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
      d.weights_any, d.dst, d.strides, d.padding_low, d.padding_high, attr);
}

// Whether a 3x3 (or larger) kernel gradient should run oneDNN's im2col + GEMM implementation
// in place of `first`, the one oneDNN lists first. On AVX2 CPUs oneDNN's first is its direct
// "jit:avx2" kernel, which from 128 input channels up ran 1.15-1.66x slower than the GEMM one
// on airbench95/96's layers and 0.93-1.24x on the speedrun's 256-channel ones, and mostly faster
// below (0.29-0.93x for 3 to 64 channels, 1.03x on one 64->256 layer) (2-core Zen 3, float32;
// docs/speed.md). Other ISAs keep oneDNN's own order: their first is a brgemm kernel, not
// measured against GEMM.
bool prefers_gemm_backward_weights(const ConvShape& s, const char* first) {
  return s.kernel > 1 && s.c >= 128 && std::strcmp(first, "jit:avx2") == 0;
}

// Whether a kernel gradient should run as patches times output gradient (`prepare_patches`) in
// place of `first`, oneDNN's own: on AMX its direct kernel gradient (`brgconv_bwd_w`) ran
// airbench's 384- and 512-channel 3x3 layers on 7x7 and 3x3 maps at 0.2-0.7 TFLOP/s, the
// patches and oneDNN's AMX matrix product at 1.1-1.4 (1.6-7.5x faster; the speedrun's 256-channel
// layers 1.04-3.9x), where from 128 channels on 15x15 maps its own was as fast (2-core Xeon,
// model 207; docs/speed.md). Stride 1, bfloat16, from 256 input channels on output maps of at
// most 7x7.
bool prefers_patches_backward_weights(const ConvShape& s, const char* first) {
  return s.type == memory::data_type::bf16 && s.stride == 1 && s.kernel > 1 && s.c >= 256 &&
         s.out_h() * s.out_w() <= 49 && std::strstr(first, "amx") != nullptr;
}

// The kernel gradient by patches: dw[KH*KW*C, K] = patches[M, KH*KW*C]^T dy[M, K], M = N*OH*OW,
// a patch's columns tap by tap (row-major over the kernel) and channel within (HWIO's order).
void prepare_patches(const ConvShape& s, Prepared* p) {
  const int64_t taps = s.kernel * s.kernel, columns = taps * s.c, m = s.n * s.out_h() * s.out_w();
  const int64_t padded_h = s.h + s.padding_low + s.padding_high;
  const int64_t padded_w = s.w + s.padding_low + s.padding_high;
  // Logical dims {N, C, H, W}; strides of an NHWC buffer of the padded size.
  const memory::dims padded_strides = {padded_h * padded_w * s.c, 1, padded_w * s.c, s.c};
  p->padded_interior = memory::desc({s.n, s.c, s.h, s.w}, s.type, padded_strides);
  p->tap_window = memory::desc({s.n, s.c, s.out_h(), s.out_w()}, s.type, padded_strides);
  p->tap_columns = memory::desc({s.n, s.c, s.out_h(), s.out_w()}, s.type,
                                {s.out_h() * s.out_w() * columns, 1, s.out_w() * columns, columns});
  p->pad_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), p->src, cpu_engine(),
                                                               p->padded_interior));
  p->tap_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), p->tap_window,
                                                               cpu_engine(), p->tap_columns));
  // The patches read transposed (strides {1, columns}); dy and dw as they lie, row-major.
  p->patches_matrix = memory::desc({columns, m}, s.type, {1, columns});
  p->output_gradient_matrix = memory::desc({m, s.k}, s.type, {s.k, 1});
  p->kernel_matrix = memory::desc({columns, s.k}, s.type, {s.k, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto pd = dnnl::matmul::primitive_desc(cpu_engine(), p->patches_matrix,
                                         p->output_gradient_matrix, p->kernel_matrix, attr);
  p->primitive = dnnl::matmul(pd);
  p->implementation = std::string("patches+") + pd.impl_info_str();
  p->scratchpad_bytes = pd.scratchpad_desc().get_size();
  p->patches = true;
}

Prepared prepare(Pass pass, const ConvShape& s) {
  Descs d = make_descs(s);
  dnnl::primitive_attr attr;
  // Scratch memory is passed at each call from a per-thread buffer, so one primitive can run on
  // several threads at once.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  Prepared p;
  p.src = d.src;
  p.dst = d.dst;
  p.user_weights = d.weights_user;
  auto hint = forward_desc(d, attr);
  if (pass == Pass::kForward) {
    p.primitive = dnnl::convolution_forward(hint);
    p.implementation = hint.impl_info_str();
    p.primitive_weights = hint.weights_desc();
    p.scratchpad_bytes = hint.scratchpad_desc().get_size();
  } else if (pass == Pass::kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.dst, d.strides,
        d.padding_low, d.padding_high, hint, attr);
    p.primitive = dnnl::convolution_backward_data(pd);
    p.implementation = pd.impl_info_str();
    p.primitive_weights = pd.weights_desc();
    p.scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    auto make = [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          cpu_engine(), dnnl::algorithm::convolution_direct, d.src, d.weights_any, d.dst,
          d.strides, d.padding_low, d.padding_high, hint, attr);
    };
    auto pd = make();
    if (prefers_patches_backward_weights(s, pd.impl_info_str())) {
      prepare_patches(s, &p);
      return p;
    }
    if (prefers_gemm_backward_weights(s, pd.impl_info_str())) {
      // oneDNN lists its implementations best first; step on to its im2col + GEMM one, or back
      // to the first where this build has none.
      while (std::strstr(pd.impl_info_str(), "gemm") == nullptr) {
        if (!pd.next_impl()) {
          pd = make();
          break;
        }
      }
    }
    p.primitive = dnnl::convolution_backward_weights(pd);
    p.implementation = pd.impl_info_str();
    p.primitive_weights = pd.diff_weights_desc();
    p.scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  p.needs_reorder = p.primitive_weights != p.user_weights;
  if (p.needs_reorder) {
    // Forward and backward-data read the kernel (user -> blocked); backward-weights writes it.
    p.weights_reorder = pass == Pass::kBackwardWeights
                            ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                  cpu_engine(), p.primitive_weights, cpu_engine(), p.user_weights))
                            : dnnl::reorder(dnnl::reorder::primitive_desc(
                                  cpu_engine(), p.user_weights, cpu_engine(), p.primitive_weights));
  }
  return p;
}

const Prepared& cached(Pass pass, const ConvShape& s) {
  static std::mutex mutex;
  static std::map<CacheKey, std::unique_ptr<Prepared>> cache;
  CacheKey key = {static_cast<int64_t>(pass), s.n, s.h, s.w, s.c, s.k, s.kernel, s.stride,
                  s.padding_low, s.padding_high, static_cast<int64_t>(s.type)};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    // Entries are never removed, so the reference stays valid after the lock is released.
    it = cache.emplace(key, std::make_unique<Prepared>(prepare(pass, s))).first;
  }
  return *it->second;
}

// A growable 64-byte-aligned buffer, one set per thread.
struct ScratchBuffer {
  void* data = nullptr;
  size_t size = 0;
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 63) / 64 * 64;
      data = std::aligned_alloc(64, size);
      if (data == nullptr) throw std::bad_alloc();
    }
    return data;
  }
  ~ScratchBuffer() { std::free(data); }
};

struct ThreadResources {
  dnnl::stream stream{cpu_engine()};
  ScratchBuffer scratchpad, weights, padded, patches;
};

ThreadResources& thread_resources() {
  thread_local ThreadResources resources;
  return resources;
}

// Wall time during which at least one call of a kind (convolutions, batch normalisations) ran,
// and the number of calls, since the library was loaded: the benchmark reads them around its
// timed calls to split a step into these calls and the rest. Overlapping calls of one kind
// count once (the union of their intervals).
enum class Clock : int { kConvolution = 0, kBatchNorm = 1 };

struct BusyClock {
  std::mutex mutex;
  int running = 0;
  std::chrono::steady_clock::time_point since;
  int64_t nanoseconds = 0;
  int64_t calls = 0;

  void start() {
    std::lock_guard<std::mutex> lock(mutex);
    if (running++ == 0) since = std::chrono::steady_clock::now();
  }
  void stop() {
    std::lock_guard<std::mutex> lock(mutex);
    ++calls;
    if (--running == 0) {
      nanoseconds += std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::steady_clock::now() - since).count();
    }
  }
};

BusyClock& busy_clock(Clock kind) {
  static BusyClock clocks[2];
  return clocks[static_cast<int>(kind)];
}

// Runs a clock for the life of one call, exceptions included.
struct BusyScope {
  BusyClock& clock;
  explicit BusyScope(Clock kind) : clock(busy_clock(kind)) { clock.start(); }
  ~BusyScope() { clock.stop(); }
};

// The kernel gradient by patches (`prepare_patches`) into `dw`: the input `x` into a zeroed
// padded copy, each tap's window of that into the tap's columns of the patches, then the matrix
// product with the output gradient `dy`.
void run_patches(const Prepared& p, const ConvShape& s, ThreadResources& r, void* x, void* dy,
                 void* dw, memory& scratchpad) {
  dnnl::engine& eng = cpu_engine();
  const size_t element = memory::data_type_size(s.type);
  const int64_t padded_w = s.w + s.padding_low + s.padding_high;
  // The padded copy's size is that of its interior's descriptor (the strides span the padding).
  const size_t padded_bytes = p.padded_interior.get_size();
  char* padded = static_cast<char*>(r.padded.get(padded_bytes));
  char* patches = static_cast<char*>(r.patches.get(p.patches_matrix.get_size()));
  std::memset(padded, 0, padded_bytes);
  memory input(p.src, eng, x);
  memory interior(p.padded_interior, eng,
                  padded + (s.padding_low * padded_w + s.padding_low) * s.c * element);
  p.pad_reorder.execute(r.stream, input, interior);
  for (int64_t i = 0; i < s.kernel; ++i) {
    for (int64_t j = 0; j < s.kernel; ++j) {
      memory window(p.tap_window, eng, padded + (i * padded_w + j) * s.c * element);
      memory columns(p.tap_columns, eng, patches + (i * s.kernel + j) * s.c * element);
      p.tap_reorder.execute(r.stream, window, columns);
    }
  }
  p.primitive.execute(r.stream, {{DNNL_ARG_SRC, memory(p.patches_matrix, eng, patches)},
                                 {DNNL_ARG_WEIGHTS, memory(p.output_gradient_matrix, eng, dy)},
                                 {DNNL_ARG_DST, memory(p.kernel_matrix, eng, dw)},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
}

// Runs one pass. `x`, `w`, `y` are the (possibly unused) src, user-layout weights and dst
// pointers: dy/dx take the place of y/x in the backward passes.
void run(Pass pass, const ConvShape& s, void* x, void* w, void* y) {
  BusyScope busy(Clock::kConvolution);
  const Prepared& p = cached(pass, s);
  ThreadResources& r = thread_resources();
  dnnl::engine& eng = cpu_engine();
  memory src(p.src, eng, x), dst(p.dst, eng, y), user_weights(p.user_weights, eng, w);
  memory weights = p.needs_reorder
                       ? memory(p.primitive_weights, eng, r.weights.get(p.primitive_weights.get_size()))
                       : user_weights;
  memory scratchpad(memory::desc({static_cast<int64_t>(p.scratchpad_bytes)}, memory::data_type::u8,
                                 tag::x),
                    eng, r.scratchpad.get(p.scratchpad_bytes ? p.scratchpad_bytes : 1));
  if (pass == Pass::kForward) {
    if (p.needs_reorder) p.weights_reorder.execute(r.stream, user_weights, weights);
    p.primitive.execute(r.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (pass == Pass::kBackwardData) {
    if (p.needs_reorder) p.weights_reorder.execute(r.stream, user_weights, weights);
    p.primitive.execute(r.stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (p.patches) {
    run_patches(p, s, r, x, y, w, scratchpad);
  } else {
    p.primitive.execute(r.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst},
                                   {DNNL_ARG_DIFF_WEIGHTS, weights},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (p.needs_reorder) p.weights_reorder.execute(r.stream, weights, user_weights);
  }
  r.stream.wait();
}

ffi::Error check_shape(const ConvShape& s) {
  if (s.kernel < 1 || s.stride < 1 || s.padding_low < 0 || s.padding_low >= s.kernel ||
      s.padding_high < 0 || s.padding_high >= s.kernel || s.n < 1 ||
      s.h < 1 || s.w < 1 || s.c < 1 || s.k < 1 || s.out_h() < 1 || s.out_w() < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "convnet_onednn_conv: expected a square kernel, stride >= 1, paddings in "
                      "[0, kernel) and non-empty NHWC/HWIO shapes");
  }
  return ffi::Error::Success();
}

// Runs a handler's body, turning oneDNN's and other C++ exceptions into an XLA error whose
// message starts with `name` (the handler family).
template <typename F>
ffi::Error guarded(const char* name, F&& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(name) + ": " + e.what());
  }
  return ffi::Error::Success();
}

// A convolution pass: its shape checked, then run.
template <typename F>
ffi::Error guarded_conv(const ConvShape& s, F&& body) {
  if (ffi::Error error = check_shape(s); error.failure()) return error;
  return guarded("convnet_onednn_conv", body);
}

// The oneDNN element type of an XLA buffer: float32 or bfloat16, else an error whose message
// starts with `name` (the handler family).
ffi::Error element_type(ffi::DataType type, const char* name, memory::data_type* out) {
  if (type == ffi::DataType::F32) {
    *out = memory::data_type::f32;
  } else if (type == ffi::DataType::BF16) {
    *out = memory::data_type::bf16;
  } else {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string(name) + ": expected float32 or bfloat16 operands");
  }
  return ffi::Error::Success();
}

// The shape of a call from its activation (NHWC) and kernel (HWIO) buffers; every operand must
// be 4-D and of one element type.
ffi::Error call_shape(const ffi::AnyBuffer& activations, const ffi::AnyBuffer& kernel,
                      std::initializer_list<ffi::DataType> others, int64_t stride,
                      int64_t padding_low, int64_t padding_high, ConvShape* s) {
  auto xd = activations.dimensions(), wd = kernel.dimensions();
  if (xd.size() != 4 || wd.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "convnet_onednn_conv: expected 4-D NHWC activations and HWIO kernels");
  }
  for (ffi::DataType other : others) {
    if (other != activations.element_type()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "convnet_onednn_conv: every operand must have the same element type");
    }
  }
  *s = ConvShape{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], stride, padding_low, padding_high};
  return element_type(activations.element_type(), "convnet_onednn_conv", &s->type);
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t padding_low, int64_t padding_high) {
  ConvShape s;
  if (ffi::Error e = call_shape(x, w, {w.element_type(), y->element_type()}, stride, padding_low,
                                padding_high, &s);
      e.failure()) {
    return e;
  }
  return guarded_conv(s, [&] { run(Pass::kForward, s, x.untyped_data(), w.untyped_data(), y->untyped_data()); });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                            int64_t stride, int64_t padding_low, int64_t padding_high) {
  ConvShape s;
  if (ffi::Error e = call_shape(*dx, w, {w.element_type(), dy.element_type()}, stride, padding_low,
                                padding_high, &s);
      e.failure()) {
    return e;
  }
  return guarded_conv(s, [&] {
    run(Pass::kBackwardData, s, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
  });
}

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                               int64_t stride, int64_t padding_low, int64_t padding_high) {
  ConvShape s;
  if (ffi::Error e = call_shape(x, *dw, {dw->element_type(), dy.element_type()}, stride, padding_low,
                                padding_high, &s);
      e.failure()) {
    return e;
  }
  return guarded_conv(s, [&] {
    run(Pass::kBackwardWeights, s, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
  });
}

// ---------------------------------------------------------------------------------------------
// Batch normalisation with the statistics of the batch, optionally plus a per-channel offset
// (oneDNN's use_shift: airbench's learnt offset, added before the single rounding of a bfloat16
// map; a scale the trainer multiplies in XLA) and a ReLU after it all in the same pass
// (fuse_norm_relu):
//   convnet_onednn_batch_norm_forward   x[N,H,W,C], offset[C] -> y[N,H,W,C], mean[C],
//                                       variance[C], workspace[bytes] (the ReLU's mask; 1 byte
//                                       unused without)
//   convnet_onednn_batch_norm_backward  x, mean, variance, dy, workspace -> dx, doffset[C]
// x, y, dy and dx are all float32 or all bfloat16 (computed in float32, rounded once); the
// statistics and the offset are float32, the offset read (and its gradient written) only with
// `offset` set; the variance is the biased one (divided by N*H*W), as the trainer's own.

struct NormShape {
  int64_t n, h, w, c;
  float epsilon;
  bool relu;
  bool offset;
  memory::data_type type = memory::data_type::f32;
};

struct PreparedNorm {
  dnnl::batch_normalization_forward forward;
  dnnl::batch_normalization_backward backward;
  memory::desc data, statistics, workspace;
  size_t forward_scratchpad = 0, backward_scratchpad = 0;
};

PreparedNorm prepare_norm(const NormShape& s) {
  PreparedNorm p;
  p.data = memory::desc({s.n, s.c, s.h, s.w}, s.type, tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto flags = dnnl::normalization_flags::none;
  if (s.relu) flags |= dnnl::normalization_flags::fuse_norm_relu;
  if (s.offset) flags |= dnnl::normalization_flags::use_shift;
  auto forward = dnnl::batch_normalization_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, p.data, p.data, s.epsilon, flags, attr);
  // With an offset, `backward` also gives its gradient; `backward_data` gives dx alone.
  auto backward = dnnl::batch_normalization_backward::primitive_desc(
      cpu_engine(), s.offset ? dnnl::prop_kind::backward : dnnl::prop_kind::backward_data,
      p.data, p.data, p.data, s.epsilon, flags, forward, attr);
  p.forward = dnnl::batch_normalization_forward(forward);
  p.backward = dnnl::batch_normalization_backward(backward);
  p.statistics = forward.mean_desc();
  p.workspace = forward.workspace_desc();
  p.forward_scratchpad = forward.scratchpad_desc().get_size();
  p.backward_scratchpad = backward.scratchpad_desc().get_size();
  return p;
}

const PreparedNorm& cached_norm(const NormShape& s) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 8>, std::unique_ptr<PreparedNorm>> cache;
  int32_t epsilon_bits;
  std::memcpy(&epsilon_bits, &s.epsilon, sizeof(epsilon_bits));
  std::array<int64_t, 8> key = {s.n, s.h, s.w, s.c, epsilon_bits, s.relu, s.offset,
                                static_cast<int64_t>(s.type)};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, std::make_unique<PreparedNorm>(prepare_norm(s))).first;
  }
  return *it->second;
}

memory scratchpad_memory(ScratchBuffer& buffer, size_t bytes) {
  return memory(memory::desc({static_cast<int64_t>(bytes)}, memory::data_type::u8, tag::x),
                cpu_engine(), buffer.get(bytes ? bytes : 1));
}

ffi::Error norm_shape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& other, float epsilon,
                      int64_t relu, int64_t offset, NormShape* s) {
  auto d = x.dimensions();
  if (d.size() != 4 || other.element_type() != x.element_type()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "convnet_onednn_batch_norm: expected 4-D NHWC activations and gradients "
                      "of one element type");
  }
  *s = NormShape{d[0], d[1], d[2], d[3], epsilon, relu != 0, offset != 0};
  if (ffi::Error e = element_type(x.element_type(), "convnet_onednn_batch_norm", &s->type);
      e.failure()) {
    return e;
  }
  if (s->n < 1 || s->h < 1 || s->w < 1 || s->c < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "convnet_onednn_batch_norm: expected non-empty NHWC activations");
  }
  return ffi::Error::Success();
}

ffi::Error BatchNormForward(ffi::AnyBuffer x, ffi::AnyBuffer offset,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                            ffi::Result<ffi::AnyBuffer> variance,
                            ffi::Result<ffi::AnyBuffer> workspace, float epsilon, int64_t relu,
                            int64_t use_offset) {
  NormShape s;
  if (ffi::Error e = norm_shape(x, *y, epsilon, relu, use_offset, &s); e.failure()) return e;
  return guarded("convnet_onednn_batch_norm", [&] {
    BusyScope busy(Clock::kBatchNorm);
    const PreparedNorm& p = cached_norm(s);
    ThreadResources& r = thread_resources();
    dnnl::engine& eng = cpu_engine();
    memory src(p.data, eng, x.untyped_data()), dst(p.data, eng, y->untyped_data());
    memory m(p.statistics, eng, mean->untyped_data()), v(p.statistics, eng, variance->untyped_data());
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, m}, {DNNL_ARG_VARIANCE, v},
        {DNNL_ARG_SCRATCHPAD, scratchpad_memory(r.scratchpad, p.forward_scratchpad)}};
    if (s.relu) args.emplace(DNNL_ARG_WORKSPACE, memory(p.workspace, eng, workspace->untyped_data()));
    if (s.offset) args.emplace(DNNL_ARG_SHIFT, memory(p.statistics, eng, offset.untyped_data()));
    p.forward.execute(r.stream, args);
    r.stream.wait();
  });
}

ffi::Error BatchNormBackward(ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                             ffi::AnyBuffer dy, ffi::AnyBuffer workspace,
                             ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> doffset,
                             float epsilon, int64_t relu, int64_t use_offset) {
  NormShape s;
  if (ffi::Error e = norm_shape(x, dy, epsilon, relu, use_offset, &s); e.failure()) return e;
  return guarded("convnet_onednn_batch_norm", [&] {
    BusyScope busy(Clock::kBatchNorm);
    const PreparedNorm& p = cached_norm(s);
    ThreadResources& r = thread_resources();
    dnnl::engine& eng = cpu_engine();
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(p.data, eng, x.untyped_data())},
        {DNNL_ARG_MEAN, memory(p.statistics, eng, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, memory(p.statistics, eng, variance.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(p.data, eng, dy.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(p.data, eng, dx->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, scratchpad_memory(r.scratchpad, p.backward_scratchpad)}};
    if (s.relu) args.emplace(DNNL_ARG_WORKSPACE, memory(p.workspace, eng, workspace.untyped_data()));
    if (s.offset) {
      args.emplace(DNNL_ARG_DIFF_SHIFT, memory(p.statistics, eng, doffset->untyped_data()));
    }
    p.backward.execute(r.stream, args);
    r.stream.wait();
  });
}

}  // namespace

#define CONVNET_ONEDNN_BINDING                                                               \
  ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()        \
      .Attr<int64_t>("stride").Attr<int64_t>("padding_low").Attr<int64_t>("padding_high")
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnet_onednn_conv_forward, ConvForward, CONVNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnet_onednn_conv_backward_data, ConvBackwardData,
                              CONVNET_ONEDNN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnet_onednn_conv_backward_weights, ConvBackwardWeights,
                              CONVNET_ONEDNN_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(convnet_onednn_batch_norm_forward, BatchNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("offset"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnet_onednn_batch_norm_backward, BatchNormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("offset"));

// Bytes of the workspace a batch normalisation of this NHWC shape (`bfloat16` maps, else
// float32) keeps for its backward pass (the fused ReLU's mask), 0 without the ReLU, or -1 where
// oneDNN refuses it.
extern "C" int64_t convnet_onednn_batch_norm_workspace_bytes(int64_t n, int64_t h, int64_t w,
                                                             int64_t c, float epsilon,
                                                             int64_t relu, int64_t offset,
                                                             int64_t bfloat16) {
  try {
    const auto type = bfloat16 ? memory::data_type::bf16 : memory::data_type::f32;
    return static_cast<int64_t>(
        cached_norm(NormShape{n, h, w, c, epsilon, relu != 0, offset != 0, type})
            .workspace.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

// 1 when oneDNN runs bfloat16 convolutions with native instructions on this CPU (its effective
// ISA has AVX512_BF16 or AMX), 0 when it would emulate them or has none (AVX2 and older).
extern "C" int convnet_onednn_bf16_native() {
  using isa = dnnl::cpu_isa;
  switch (dnnl::get_effective_cpu_isa()) {
    case isa::avx512_core_bf16:
    case isa::avx512_core_fp16:
    case isa::avx512_core_amx:
    case isa::avx512_core_amx_fp16:
      return 1;
    default:
      return 0;
  }
}

// Nanoseconds during which at least one call of `kind` ran (0: convolutions, 1: batch
// normalisations), and the calls, since loading; -1 for another kind.
extern "C" int64_t convnet_onednn_busy_nanoseconds(int kind) {
  if (kind != 0 && kind != 1) return -1;
  BusyClock& clock = busy_clock(static_cast<Clock>(kind));
  std::lock_guard<std::mutex> lock(clock.mutex);
  return clock.nanoseconds;
}
extern "C" int64_t convnet_onednn_calls(int kind) {
  if (kind != 0 && kind != 1) return -1;
  BusyClock& clock = busy_clock(static_cast<Clock>(kind));
  std::lock_guard<std::mutex> lock(clock.mutex);
  return clock.calls;
}

// The oneDNN version this library runs with, for the start-up line ("3.2.0").
extern "C" const char* convnet_onednn_version() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  }();
  return version.c_str();
}

// oneDNN's name for the implementation that runs a pass (0: forward, 1: input gradient, 2:
// kernel gradient) of a convolution of this shape (bfloat16 operands where `bfloat16`, else
// float32), as the handlers would run it ("brgconv:avx2", "x64:gemm:jit", or "patches+" and the
// matrix product's name); null where oneDNN refuses the shape.
extern "C" const char* convnet_onednn_conv_implementation(int64_t pass, int64_t n, int64_t h,
                                                          int64_t w, int64_t c, int64_t k,
                                                          int64_t kernel, int64_t stride,
                                                          int64_t padding_low,
                                                          int64_t padding_high, int64_t bfloat16) {
  if (pass < 0 || pass > 2) return nullptr;
  ConvShape s{n, h, w, c, k, kernel, stride, padding_low, padding_high,
              bfloat16 ? memory::data_type::bf16 : memory::data_type::f32};
  if (check_shape(s).failure()) return nullptr;
  try {
    return cached(static_cast<Pass>(pass), s).implementation.c_str();
  } catch (const std::exception&) {
    return nullptr;
  }
}
