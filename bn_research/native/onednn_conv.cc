// Stride-1 'SAME' NHWC x HWIO convolutions through oneDNN, as XLA FFI handlers:
//   BnConvForward(x[N,H,W,Ci], w[KH,KW,Ci,Co])        -> y[N,H,W,Co]
//   BnConvKernelGrad(x[N,H,W,Ci], dy[N,H,W,Co])       -> dw[KH,KW,Ci,Co] (KH, KW from dw)
// each also with leading replica axes on every operand (vmapped replicas: one call), and
//   BnOrderStatistics(a[..., N, U]; ranks[K]) -> low[..., K, U], next[..., K, U]
// the ranks[k]-th and (ranks[k] + 1)-th smallest values of every column, exactly (the
// order of the float32 bit patterns that drift.order_statistics bisects on), by
// std::nth_element, columns spread over the cores (up to 256 values per column: from every
// value's rank by pairwise comparison, the columns vectorized); it does not use oneDNN.
// Built and loaded by bn_research/onednn.py, which also holds the reasons for this file.
// Activations stay in the caller's NHWC layout; weights are reordered between HWIO and
// the layout oneDNN's implementation chooses (tiny). One plan (primitive and reorders)
// per shape, cached; scratch memory is per calling thread, so XLA may run several calls
// at once.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind { kForward = 0, kKernelGrad = 1 };  // as in onednn.py's CONV_KINDS
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Plan {
  dnnl::primitive prim;
  memory::desc act_a, act_b;  // the NHWC activations: (x, y) forward, (x, dy) kernel grad
  memory::desc wei_user, wei_prim;
  dnnl::reorder wei_reorder;  // HWIO -> primitive's layout (kernel grad: the other way)
  bool reorder = false;
  size_t scratch_bytes = 0;
  std::string info;
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct ThreadBuffer {  // grows, 64-byte aligned, one per thread and use
  void* p = nullptr;
  size_t n = 0;
  void* get(size_t bytes) {
    if (bytes > n) {
      std::free(p);
      n = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, n);
    }
    return p;
  }
  ~ThreadBuffer() { std::free(p); }
};
thread_local ThreadBuffer scratch_buffer, weight_buffer;

std::shared_ptr<Plan> make_plan(const Key& key) {
  auto [kind, n, h, w, ci, co, kh, kw] = key;
  auto& eng = engine();
  memory::dims strides{1, 1}, pad{kh / 2, kw / 2};
  auto src = memory::desc({n, ci, h, w}, dt::f32, tag::nhwc);
  auto dst = memory::desc({n, co, h, w}, dt::f32, tag::nhwc);
  auto wei_any = memory::desc({co, ci, kh, kw}, dt::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = dnnl::convolution_forward::primitive_desc(eng, dnnl::prop_kind::forward_training,
                                                       dnnl::algorithm::convolution_direct, src, wei_any, dst,
                                                       strides, pad, pad, attr);
  auto plan = std::make_shared<Plan>();
  plan->wei_user = memory::desc({co, ci, kh, kw}, dt::f32, tag::hwio);
  plan->act_a = src;
  plan->act_b = dst;
  auto finish = [&plan](const auto& pd, const memory::desc& weights) {
    plan->wei_prim = weights;
    plan->scratch_bytes = pd.scratchpad_desc().get_size();
    plan->info = pd.impl_info_str();
  };
  if (kind == kForward) {
    plan->prim = dnnl::convolution_forward(fwd);
    finish(fwd, fwd.weights_desc());
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(eng, dnnl::algorithm::convolution_direct, src,
                                                                 wei_any, dst, strides, pad, pad, fwd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    finish(pd, pd.diff_weights_desc());
  }
  plan->reorder = plan->wei_prim != plan->wei_user;
  if (plan->reorder) {
    plan->wei_reorder = kind == kKernelGrad
                            ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->wei_prim, eng, plan->wei_user))
                            : dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->wei_user, eng, plan->wei_prim));
    plan->info += " (weights reordered)";
  }
  return plan;
}

std::mutex plans_mutex;
std::map<Key, std::shared_ptr<Plan>> plans;

std::shared_ptr<Plan> plan_for(const Key& key) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto plan = make_plan(key);
  plans.emplace(key, plan);
  return plan;
}

ffi::Error run(const Key& key, void* a, void* b, void* out) {
  try {
    int kind = std::get<0>(key);
    auto plan = plan_for(key);
    auto& eng = engine();
    thread_local dnnl::stream stream(engine());
    memory scratch(memory::desc({static_cast<memory::dim>(plan->scratch_bytes)}, dt::u8, tag::a), eng,
                   scratch_buffer.get(plan->scratch_bytes + 64));
    memory wei_user(plan->wei_user, eng, kind == kKernelGrad ? out : b);
    memory wei = wei_user;
    if (plan->reorder) {
      wei = memory(plan->wei_prim, eng, weight_buffer.get(plan->wei_prim.get_size() + 64));
      if (kind != kKernelGrad) plan->wei_reorder.execute(stream, wei_user, wei);
    }
    if (kind == kForward) {
      memory x(plan->act_a, eng, a), y(plan->act_b, eng, out);
      plan->prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, y},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      memory x(plan->act_a, eng, a), dy(plan->act_b, eng, b);
      plan->prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, wei},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan->reorder) plan->wei_reorder.execute(stream, wei, wei_user);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

// Axes before the last four of every operand are replica axes (the same for all three
// operands): one convolution per replica, on its slice of each buffer.
ffi::Error per_replica(int kind, ffi::Span<const int64_t> a_dims, ffi::Span<const int64_t> w_dims, void* a,
                       void* b, void* out) {
  size_t r = a_dims.size() - 4;
  int64_t replicas = 1;
  for (size_t i = 0; i < r; ++i) replicas *= a_dims[i];
  int64_t n = a_dims[r], h = a_dims[r + 1], w = a_dims[r + 2], kh = w_dims[r], kw = w_dims[r + 1];
  int64_t ci = w_dims[r + 2], co = w_dims[r + 3];
  int64_t size_in = n * h * w * ci, size_out = n * h * w * co;
  int64_t size_w = kh * kw * ci * co;
  // (a, b, out): (x, w, y) forward, (x, dy, dw) kernel grad
  int64_t size_b = kind == kKernelGrad ? size_out : size_w, size_o = kind == kKernelGrad ? size_w : size_out;
  auto* pa = static_cast<float*>(a);
  auto* pb = static_cast<float*>(b);
  auto* po = static_cast<float*>(out);
  for (int64_t i = 0; i < replicas; ++i) {
    auto err = run({kind, n, h, w, ci, co, kh, kw}, pa + i * size_in, pb + i * size_b, po + i * size_o);
    if (!err.success()) return err;
  }
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y) {
  return per_replica(kForward, x.dimensions(), w.dimensions(), x.untyped_data(), w.untyped_data(),
                     y->untyped_data());
}

ffi::Error KernelGrad(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw) {
  return per_replica(kKernelGrad, x.dimensions(), dw->dimensions(), x.untyped_data(), dy.untyped_data(),
                     dw->untyped_data());
}

// ---- order statistics ------------------------------------------------------------------

inline uint32_t sort_key(float v) {
  uint32_t i;
  std::memcpy(&i, &v, 4);
  return (i >> 31) ? ~i : (i | 0x80000000u);
}

inline float from_key(uint32_t k) {
  uint32_t i = (k >> 31) ? (k & 0x7FFFFFFFu) : ~k;
  float v;
  std::memcpy(&v, &i, 4);
  return v;
}

constexpr int64_t kParallelMinElements = 1 << 14;
constexpr int64_t kPairwiseMaxN = 256;

// Few values per column (the MLP's [60, 100] layers): every value's rank from pairwise
// comparisons, rows against rows with the columns innermost (contiguous, vectorized), a
// stable rank (ties in row order) so that the ranks are a permutation.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
void PairwiseRanks(const int32_t* keys, int64_t n, int64_t u, int32_t* rank) {
  for (int64_t i = 0; i < n * u; ++i) rank[i] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* ki = keys + i * u;
    int32_t* ri = rank + i * u;
    for (int64_t j = 0; j < i; ++j) {
      const int32_t* kj = keys + j * u;
      for (int64_t c = 0; c < u; ++c) ri[c] += kj[c] <= ki[c];
    }
    for (int64_t j = i + 1; j < n; ++j) {
      const int32_t* kj = keys + j * u;
      for (int64_t c = 0; c < u; ++c) ri[c] += kj[c] < ki[c];
    }
  }
}

void ByPairwiseRanks(const float* src, int64_t n, int64_t u, ffi::Span<const int32_t> ranks, float* lo, float* nx) {
  const int64_t k = ranks.size();
  std::vector<int32_t> keys(n * u), rank(n * u);
  // the unsigned sort keys with the top bit flipped: signed order is their order
  for (int64_t i = 0; i < n * u; ++i) keys[i] = static_cast<int32_t>(sort_key(src[i]) ^ 0x80000000u);
  PairwiseRanks(keys.data(), n, u, rank.data());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < u; ++c) {
      const int32_t at = rank[i * u + c];
      for (int64_t r = 0; r < k; ++r) {
        if (at == ranks[r]) lo[r * u + c] = src[i * u + c];
        if (at == ranks[r] + 1 || (at == ranks[r] && ranks[r] + 1 == n)) nx[r * u + c] = src[i * u + c];
      }
    }
}

ffi::Error OrderStatistics(F32 a, ffi::Span<const int32_t> ranks, ffi::ResultBuffer<ffi::F32> low,
                           ffi::ResultBuffer<ffi::F32> next) {
  auto d = a.dimensions();
  if (d.size() < 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "order statistics of a [..., N, U] array");
  int64_t n = d[d.size() - 2], u = d[d.size() - 1], k = ranks.size();
  int64_t batches = n * u ? a.element_count() / (n * u) : 0;
  for (int64_t r = 0; r < k; ++r)
    if (ranks[r] < 0 || ranks[r] >= n || (r && ranks[r] <= ranks[r - 1]))
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ranks must increase within [0, N)");
  const float* src = a.typed_data();
  float* lo = low->typed_data();
  float* nx = next->typed_data();
  if (n <= kPairwiseMaxN) {  // on the calling thread: OpenMP's threads, which share the
    for (int64_t b = 0; b < batches; ++b)  // cores with XLA's, cost more to wake than this
      ByPairwiseRanks(src + b * n * u, n, u, ranks, lo + b * k * u, nx + b * k * u);
    return ffi::Error::Success();
  }
#pragma omp parallel if (batches * u * n >= kParallelMinElements)
  {
    std::vector<uint32_t> keys(n);
#pragma omp for schedule(static)
    for (int64_t col = 0; col < batches * u; ++col) {
      int64_t b = col / u, j = col % u;
      const float* column = src + b * n * u + j;
      for (int64_t i = 0; i < n; ++i) keys[i] = sort_key(column[i * u]);
      int64_t start = 0;
      for (int64_t r = 0; r < k; ++r) {
        auto at = keys.begin() + ranks[r];
        std::nth_element(keys.begin() + start, at, keys.end());
        uint32_t after = ranks[r] + 1 < n ? *std::min_element(at + 1, keys.end()) : *at;
        lo[(b * k + r) * u + j] = from_key(*at);
        nx[(b * k + r) * u + j] = from_key(after);
        start = ranks[r] + 1;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnOrderStatistics, OrderStatistics,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Attr<ffi::Span<const int32_t>>("ranks")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The implementation oneDNN chose for one call (kind 0 forward, 1 kernel gradient).
extern "C" const char* bn_conv_impl(int kind, int64_t n, int64_t h, int64_t w, int64_t ci, int64_t co, int64_t kh,
                                    int64_t kw) {
  thread_local std::string info;
  try {
    info = plan_for({kind, n, h, w, ci, co, kh, kw})->info;
  } catch (const dnnl::error& e) {
    info = std::string("error: ") + e.what();
  }
  return info.c_str();
}
