// 2-D convolutions for XLA:CPU through oneDNN, as one XLA FFI handler (jax_robust/onednn.py).
//
// kind 0, forward:          a = x [n, h, w, i], b = k [kh, kw, i, o]   -> c = y [n, ho, wo, o]
// kind 1, input gradient:   a = g [n, ho, wo, o], b = k [kh, kw, i, o] -> c = dx [n, h, w, i]
// kind 2, kernel gradient:  a = x [n, h, w, i], b = g [n, ho, wo, o]   -> c = dk [kh, kw, i, o]
// Activations NHWC and kernels HWIO (Flax's layouts); a and b float32 or bfloat16, c of a's
// dtype; strides and non-negative paddings as attributes. No dilation, no groups.
//
// A conv followed by a 2x2/2 max-pool (floor mode) as one call each way (JrOnednnConvPool*):
// kind 3, forward:          x, k -> p [n, ho/2, wo/2, o] and mask (uint8, same shape)
// kind 4, input gradient:   g (p's shape), mask, k, x -> dx [n, h, w, i]
// kind 5, kernel gradient:  x, g, mask -> dk
// With `relu_input` the conv reads relu(x) (made per chunk in cache) and dx is the gradient
// w.r.t. x, zero where x <= 0 (kind 4 reads x for that only; without relu_input, x may be
// empty): a ReLU before the conv never written out.
// mask bit j (0..3: corners (0,0), (0,1), (1,0), (1,1)) says the corner holds the window's
// maximum; ties 'split' keeps every such bit, 'first' only the lowest. A pooled gradient goes
// to the marked corners in equal shares (none where no bit is set: a NaN window). Each part
// of the batch is run a few images at a time (`chunk_bytes` of conv output), so the conv
// output or its gradient is pooled or un-pooled while in cache and never written whole.
//
// Threads: the batch is cut into one part per thread of XLA's intra-op pool, and each part is
// one single-threaded oneDNN call, on the calling thread or on a pool thread (whichever
// claims it first, so a call never waits on a part nobody runs). oneDNN's own OpenMP threads
// are never started: the OpenMP runtime is shared with PyTorch when both are loaded, and
// extra OpenMP thread pools (one per calling XLA thread) throttle PyTorch's own (GOMP's spin
// wait turns short once it manages more threads than there are CPUs): -35% on PyTorch's AT
// step, measured (docs/history.md, session 9).
//
// Every call is checked before anything is read or written: dtypes (one of float32 and
// bfloat16 for all), strides >= 1, pads >= 0, and that batch, channels, image sizes (given
// strides and pads) and kernel shape of all operands and the result make one convolution
// (kinds 3-5: its pooled output, and the mask of that shape). A misshapen call returns
// INVALID_ARGUMENT naming the first mismatch in the Python function's terms, e.g.
// "onednn kernel_grad: x batch 2 != gradient batch 64" (Mismatch below; onednn.py makes the
// same checks first). An empty batch computes nothing (kernel gradients of zeros).
//
// Activations are read and written in place (oneDNN's nhwc). Kernels are reordered to the
// blocked layout the chosen implementation wants, a few KB per call; kernel gradients are
// summed over the parts in float32, in part order. Primitives are built once per shape and
// cached; scratchpads are per call, so concurrent calls are safe.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" {
int omp_get_max_threads(void);
void omp_set_num_threads(int);
}

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

// One OpenMP thread for oneDNN on this thread while in scope (the caller's setting restored).
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) {
    if (saved_ != 1) omp_set_num_threads(1);
  }
  ~SingleThreaded() {
    if (saved_ != 1) omp_set_num_threads(saved_);
  }

 private:
  int saved_;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       std::array<int64_t, 6>, std::array<int, 3>>;

// A primitive for one part's shapes. Read-only once built: safe to run from several threads.
struct Entry {
  dnnl::primitive conv;
  std::string impl;
  memory::desc kernel_user, kernel_inner;  // HWIO as XLA holds it; the primitive's layout
  bool reorder = false;
  dnnl::reorder kernel_reorder;  // user -> inner (kinds 0, 1); inner -> f32 HWIO (kind 2)
  memory::desc scratch_md;
};

std::mutex cache_lock;
std::map<Key, std::unique_ptr<Entry>> cache;

memory::data_type DnnlType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

size_t Bytes(memory::data_type t) { return t == memory::data_type::f32 ? 4 : 2; }

// NHWC shape [n, h, w, c] -> oneDNN's logical {n, c, h, w} with the nhwc tag.
memory::desc Activation(const memory::dims& s, memory::data_type t) {
  return memory::desc({s[0], s[3], s[1], s[2]}, t, memory::format_tag::nhwc);
}

// HWIO shape [kh, kw, i, o] -> logical {o, i, kh, kw}.
memory::dims KernelDims(const memory::dims& s) { return {s[3], s[2], s[0], s[1]}; }

// x, y and kernel shapes and dtypes of a call, whatever its kind.
struct Shapes {
  memory::dims x, y, k;
  memory::data_type tx, ty, tk;
};

Shapes Roles(int64_t kind, const memory::dims& a, const memory::dims& b, const memory::dims& c,
             memory::data_type ta, memory::data_type tb, memory::data_type tc) {
  if (kind == 0) return {a, c, b, ta, tc, tb};
  if (kind == 1) return {c, a, b, tc, ta, tb};
  return {a, b, c, ta, tb, tc};
}

// Stores the primitive of `pd` and what running it needs: its kernel layout, its scratchpad.
template <typename Primitive, typename PrimitiveDesc>
void Keep(Entry& entry, const PrimitiveDesc& pd, const memory::desc& kernel) {
  entry.conv = Primitive(pd);
  entry.kernel_inner = kernel;
  entry.scratch_md = pd.scratchpad_desc();
  entry.impl = pd.impl_info_str();
}

std::unique_ptr<Entry> Build(int64_t kind, const Shapes& s, const std::array<int64_t, 6>& geo) {
  SingleThreaded one;  // implementations pick their work split for the threads they will get
  auto& eng = Engine();
  memory::dims strides = {geo[0], geo[1]};
  memory::dims pad_l = {geo[2], geo[4]}, pad_r = {geo[3], geo[5]};
  // Kernel gradients are made in float32 whatever the operands (summed over parts after).
  memory::data_type tk = kind == 2 ? memory::data_type::f32 : s.tk;
  auto kernel_any = memory::desc(KernelDims(s.k), tk, memory::format_tag::any);
  // The forward descriptor the backward ones take as a hint, in the operands' dtype.
  auto hint = [&] {
    memory::data_type t = kind == 1 ? s.ty : s.tx;
    return dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        Activation(s.x, t), memory::desc(KernelDims(s.k), t, memory::format_tag::any),
        Activation(s.y, t), strides, pad_l, pad_r);
  };
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto entry = std::make_unique<Entry>();
  if (kind == 0) {
    auto pd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        Activation(s.x, s.tx), kernel_any, Activation(s.y, s.ty), strides, pad_l, pad_r, attr);
    Keep<dnnl::convolution_forward>(*entry, pd, pd.weights_desc());
  } else if (kind == 1) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, Activation(s.x, s.tx), kernel_any,
        Activation(s.y, s.ty), strides, pad_l, pad_r, hint(), attr);
    Keep<dnnl::convolution_backward_data>(*entry, pd, pd.weights_desc());
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, Activation(s.x, s.tx), kernel_any,
        Activation(s.y, s.ty), strides, pad_l, pad_r, hint(), attr);
    Keep<dnnl::convolution_backward_weights>(*entry, pd, pd.diff_weights_desc());
  }
  entry->kernel_user = memory::desc(KernelDims(s.k), tk, memory::format_tag::hwio);
  entry->reorder = entry->kernel_inner != entry->kernel_user;
  if (entry->reorder) {
    entry->kernel_reorder =
        kind == 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, entry->kernel_inner, eng,
                                                                 entry->kernel_user))
                  : dnnl::reorder(dnnl::reorder::primitive_desc(eng, entry->kernel_user, eng,
                                                                 entry->kernel_inner));
  }
  return entry;
}

const Entry* Lookup(int64_t kind, const Shapes& s, const std::array<int64_t, 6>& geo) {
  Key key{kind, s.x, s.y, s.k, geo, {int(s.tx), int(s.ty), int(s.tk)}};
  std::lock_guard<std::mutex> guard(cache_lock);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, Build(kind, s, geo)).first;
  return it->second.get();
}

// The calls' shared state: parts are claimed from `next`; the caller waits for `done`.
struct Job {
  int64_t kind, parts, n;
  Shapes whole;
  std::array<int64_t, 6> geo;
  char *x, *y, *k;           // the whole operands / result
  memory::desc inner_md;              // kinds 0, 1: part 0's kernel layout
  uint8_t* kernel_inner = nullptr;     // and the kernel reordered to it (the caller's buffer)
  std::vector<float*> kernel_partial;  // kinds 2, 5: each part's f32 HWIO gradient
  // kinds 3-5: the pooled array, its mask, the tie rule and images per chunk
  char* p = nullptr;
  uint8_t* mask = nullptr;
  bool ties_first = false, relu_input = false;
  char* relu_x = nullptr;  // kind 4 with relu_input: x, to zero dx where x <= 0
  int64_t chunk = 1;
  std::atomic<int64_t> next{0};
  std::mutex lock;
  std::condition_variable finished;
  int64_t done = 0;
  std::string error;
};

int64_t PartStart(const Job& job, int64_t p) { return job.n * p / job.parts; }

// Grow-only per-thread buffers for scratchpads and reordered kernels: after the first calls a
// conv allocates nothing (per-call heap churn moved glibc's mmap threshold and slowed the
// PyTorch steps timed beside it in one process; docs/history.md, session 9).
uint8_t* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::vector<uint8_t> buffers[5];
  std::vector<uint8_t>& b = buffers[slot];
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

// The kernel operand of a forward or input-gradient primitive: the caller's reordered copy
// when `e` wants the layout it was reordered to, else reordered here or used as it is.
memory KernelOperand(const Job& job, const Entry* e, dnnl::stream& stream) {
  auto& eng = Engine();
  memory user(e->kernel_user, eng, job.k);
  if (!e->reorder) return user;
  if (e->kernel_inner == job.inner_md) return memory(e->kernel_inner, eng, job.kernel_inner);
  memory inner(e->kernel_inner, eng, ThreadBuffer(1, e->kernel_inner.get_size()));
  e->kernel_reorder.execute(stream, user, inner);
  return inner;
}

// Runs the `conv_kind` (0, 1, 2) primitive on m images: x and y point at the first image's
// input and conv output (or their gradients); kind 2 writes its f32 HWIO gradient to dk.
void RunConv(const Job& job, int64_t conv_kind, int64_t m, char* x, char* y, float* dk,
             dnnl::stream& stream) {
  Shapes s = job.whole;
  s.x[0] = s.y[0] = m;
  const Entry* e = Lookup(conv_kind, s, job.geo);
  auto& eng = Engine();
  memory x_mem(Activation(s.x, s.tx), eng, x);
  memory y_mem(Activation(s.y, s.ty), eng, y);
  memory scratch_mem(e->scratch_md, eng, ThreadBuffer(0, e->scratch_md.get_size()));
  if (conv_kind == 2) {
    memory k_user(e->kernel_user, eng, dk);
    memory k_mem = e->reorder
                       ? memory(e->kernel_inner, eng, ThreadBuffer(1, e->kernel_inner.get_size()))
                       : k_user;
    e->conv.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_WEIGHTS, k_mem},
                             {DNNL_ARG_DIFF_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    if (e->reorder) e->kernel_reorder.execute(stream, k_mem, k_user);
  } else {
    memory k_mem = KernelOperand(job, e, stream);
    int src = conv_kind == 0 ? DNNL_ARG_SRC : DNNL_ARG_DIFF_SRC;
    int dst = conv_kind == 0 ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST;
    e->conv.execute(stream, {{src, x_mem}, {DNNL_ARG_WEIGHTS, k_mem}, {dst, y_mem},
                             {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  }
  stream.wait();
}

// ---------------------------------------------------------------- the 2x2/2 max-pool (kinds 3-5)

float Load(const float* p) { return *p; }
float Load(const uint16_t* p) {
  uint32_t bits = uint32_t(*p) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

uint16_t RoundBf16(float v) {  // to nearest even; a NaN stays a NaN
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (bits & 0x7FFFFFFF) > 0x7F800000 ? uint16_t((bits >> 16) | 0x40)
                                          : uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

void Store(float* p, float v) { *p = v; }
void Store(uint16_t* p, float v) { *p = RoundBf16(v); }

// The per-window work below runs on up to kLanes channels at a time in branch-free loops
// (selects, no early exits), so the compiler vectorises them.
constexpr int64_t kLanes = 64;

// y [m, ho, wo, o] -> p [m, ho/2, wo/2, o] (max of each window's four corners, NaN if any
// is NaN, as jnp.maximum) and its mask. 'first': only the lowest marked corner, and corner 3
// for a NaN window (as layers.max_pool_2x2_first's index).
template <typename T, bool kFirst>
void Pool(const T* y, int64_t m, const memory::dims& yd, T* p, uint8_t* mask) {
  int64_t ho = yd[1], wo = yd[2], o = yd[3], ph = ho / 2, pw = wo / 2;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < ph; ++r) {
      for (int64_t c = 0; c < pw; ++c) {
        for (int64_t c0 = 0; c0 < o; c0 += kLanes) {
          int64_t lanes = std::min(kLanes, o - c0);
          const T* a = y + ((i * ho + 2 * r) * wo + 2 * c) * o + c0;
          const T *b = a + o, *cc = a + wo * o, *d = cc + o;
          int64_t at = ((i * ph + r) * pw + c) * o + c0;
          float mx[kLanes];
          int32_t bits[kLanes];
          for (int64_t l = 0; l < lanes; ++l) {
            float va = Load(a + l), vb = Load(b + l), vc = Load(cc + l), vd = Load(d + l);
            float m1 = va < vb ? vb : va, m2 = vc < vd ? vd : vc;
            float v = m1 < m2 ? m2 : m1;
            bool nan = (va != va) | (vb != vb) | (vc != vc) | (vd != vd);
            v = nan ? va + vb + vc + vd : v;
            mx[l] = v;
            bits[l] = int32_t(va == v) | int32_t(vb == v) << 1 | int32_t(vc == v) << 2 |
                      int32_t(vd == v) << 3;
          }
          if (kFirst) {
            for (int64_t l = 0; l < lanes; ++l) {
              int32_t v = bits[l];
              bits[l] = v == 0 ? 8 : v & -v;
            }
          }
          for (int64_t l = 0; l < lanes; ++l) Store(p + at + l, mx[l]);
          for (int64_t l = 0; l < lanes; ++l) mask[at + l] = uint8_t(bits[l]);
        }
      }
    }
  }
}

// The pool's transpose: g [m, ho/2, wo/2, o] and mask -> y [m, ho, wo, o]; each marked
// corner gets g / (corners marked), the rest (an odd last row or column too) 0.
template <typename T>
void Unpool(const T* g, const uint8_t* mask, int64_t m, const memory::dims& yd, T* y) {
  int64_t ho = yd[1], wo = yd[2], o = yd[3], ph = ho / 2, pw = wo / 2;
  if (ho % 2 || wo % 2) std::memset(y, 0, size_t(m * ho * wo * o) * sizeof(T));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < ph; ++r) {
      for (int64_t c = 0; c < pw; ++c) {
        for (int64_t c0 = 0; c0 < o; c0 += kLanes) {
          int64_t lanes = std::min(kLanes, o - c0);
          T* a = y + ((i * ho + 2 * r) * wo + 2 * c) * o + c0;
          T *b = a + o, *cc = a + wo * o, *d = cc + o;
          int64_t at = ((i * ph + r) * pw + c) * o + c0;
          float share[kLanes];
          int32_t bits[kLanes];
          for (int64_t l = 0; l < lanes; ++l) {
            int32_t v = mask[at + l];
            int32_t count = (v & 1) + ((v >> 1) & 1) + ((v >> 2) & 1) + ((v >> 3) & 1);
            float s = Load(g + at + l) / float(count == 0 ? 1 : count);
            share[l] = count == 0 ? 0.0f : s;
            bits[l] = v;
          }
          for (int64_t l = 0; l < lanes; ++l) Store(a + l, bits[l] & 1 ? share[l] : 0.0f);
          for (int64_t l = 0; l < lanes; ++l) Store(b + l, bits[l] & 2 ? share[l] : 0.0f);
          for (int64_t l = 0; l < lanes; ++l) Store(cc + l, bits[l] & 4 ? share[l] : 0.0f);
          for (int64_t l = 0; l < lanes; ++l) Store(d + l, bits[l] & 8 ? share[l] : 0.0f);
        }
      }
    }
  }
}

// out = relu(x) (NaN stays NaN, as jnp.maximum(x, 0)), `count` elements.
template <typename T>
void Relu(const T* x, size_t count, T* out) {
  for (size_t i = 0; i < count; ++i) {
    float v = Load(x + i);
    Store(out + i, v < 0.0f ? 0.0f : v);
  }
}

// dx = 0 where x <= 0 (and where x is NaN: jax.nn.relu's gradient), `count` elements.
template <typename T>
void ReluGrad(const T* x, size_t count, T* dx) {
  for (size_t i = 0; i < count; ++i) {
    float v = Load(x + i), d = Load(dx + i);
    Store(dx + i, v > 0.0f ? d : 0.0f);
  }
}

// One part of a kind 3-5 call, `job.chunk` images at a time through a per-thread buffer of
// conv output (or its gradient).
void RunPooledPart(const Job& job, int64_t p, dnnl::stream& stream) {
  const Shapes& w = job.whole;
  int64_t lo = PartStart(job, p), hi = PartStart(job, p + 1), conv_kind = job.kind - 3;
  bool f32 = w.ty == memory::data_type::f32;
  size_t x_img = w.x[1] * w.x[2] * w.x[3] * Bytes(w.tx);
  size_t y_img = w.y[1] * w.y[2] * w.y[3] * Bytes(w.ty);
  size_t p_img = (w.y[1] / 2) * (w.y[2] / 2) * w.y[3];  // elements
  size_t k_count = w.k[0] * w.k[1] * w.k[2] * w.k[3];
  for (int64_t at = lo; at < hi; at += job.chunk) {
    int64_t m = std::min(job.chunk, hi - at);
    char* x = job.x + at * x_img;
    size_t x_count = m * x_img / Bytes(w.tx);
    if (job.relu_input && conv_kind != 1) {  // the conv reads relu(x), made here in cache
      char* r = reinterpret_cast<char*>(ThreadBuffer(4, m * x_img));
      if (f32) Relu(reinterpret_cast<float*>(x), x_count, reinterpret_cast<float*>(r));
      else Relu(reinterpret_cast<uint16_t*>(x), x_count, reinterpret_cast<uint16_t*>(r));
      x = r;
    }
    char* y = reinterpret_cast<char*>(ThreadBuffer(2, m * y_img));
    char* pooled = job.p + at * p_img * Bytes(w.ty);
    uint8_t* mask = job.mask + at * p_img;
    if (conv_kind == 0) {
      RunConv(job, 0, m, x, y, nullptr, stream);
      auto* fy = reinterpret_cast<float*>(y);
      auto* fp = reinterpret_cast<float*>(pooled);
      auto* hy = reinterpret_cast<uint16_t*>(y);
      auto* hp = reinterpret_cast<uint16_t*>(pooled);
      if (f32 && job.ties_first) Pool<float, true>(fy, m, w.y, fp, mask);
      if (f32 && !job.ties_first) Pool<float, false>(fy, m, w.y, fp, mask);
      if (!f32 && job.ties_first) Pool<uint16_t, true>(hy, m, w.y, hp, mask);
      if (!f32 && !job.ties_first) Pool<uint16_t, false>(hy, m, w.y, hp, mask);
      continue;
    }
    if (f32) {
      Unpool(reinterpret_cast<float*>(pooled), mask, m, w.y, reinterpret_cast<float*>(y));
    } else {
      Unpool(reinterpret_cast<uint16_t*>(pooled), mask, m, w.y, reinterpret_cast<uint16_t*>(y));
    }
    if (conv_kind == 1) {
      RunConv(job, 1, m, x, y, nullptr, stream);
      if (job.relu_input) {
        char* z = job.relu_x + at * x_img;
        if (f32) ReluGrad(reinterpret_cast<float*>(z), x_count, reinterpret_cast<float*>(x));
        else ReluGrad(reinterpret_cast<uint16_t*>(z), x_count, reinterpret_cast<uint16_t*>(x));
      }
    } else if (at == lo) {
      RunConv(job, 2, m, x, y, job.kernel_partial[p], stream);
    } else {  // later chunks: summed into the part's gradient in chunk order
      float* dk = reinterpret_cast<float*>(ThreadBuffer(3, k_count * sizeof(float)));
      RunConv(job, 2, m, x, y, dk, stream);
      float* sum = job.kernel_partial[p];
      for (size_t i = 0; i < k_count; ++i) sum[i] += dk[i];
    }
  }
}

void RunPart(Job& job, int64_t p) {
  SingleThreaded one;
  dnnl::stream stream(Engine());
  if (job.kind >= 3) {
    RunPooledPart(job, p, stream);
    return;
  }
  const Shapes& w = job.whole;
  int64_t lo = PartStart(job, p), hi = PartStart(job, p + 1);
  size_t x_img = w.x[1] * w.x[2] * w.x[3] * Bytes(w.tx);
  size_t y_img = w.y[1] * w.y[2] * w.y[3] * Bytes(w.ty);
  RunConv(job, job.kind, hi - lo, job.x + lo * x_img, job.y + lo * y_img,
          job.kind == 2 ? job.kernel_partial[p] : nullptr, stream);
}

// The calling thread's buffers, alive until it returns (parts on other threads read them);
// apart from ThreadBuffer's, which the caller also uses when it runs a part.
uint8_t* CallerBuffer(size_t bytes) {
  thread_local std::vector<uint8_t> b;
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

uint8_t* PartialBuffer(size_t bytes) {
  thread_local std::vector<uint8_t> b;
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

// Claims and runs parts until none is left; counts each finished part.
void Work(const std::shared_ptr<Job>& job) {
  for (int64_t p; (p = job->next.fetch_add(1)) < job->parts;) {
    std::string error;
    try {
      RunPart(*job, p);
    } catch (const std::exception& err) {  // oneDNN's errors, a failed allocation
      error = err.what();
    }
    std::lock_guard<std::mutex> guard(job->lock);
    if (!error.empty() && job->error.empty()) job->error = error;
    if (++job->done == job->parts) job->finished.notify_all();
  }
}

memory::dims Dims(ffi::AnyBuffer::Dimensions d) { return memory::dims(d.begin(), d.end()); }

// ---------------------------------------------------------------- refusing misshapen calls
//
// Every call's operands and result are checked against each other before anything is read or
// written: a shape XLA was told that is not the convolution's would otherwise be read or
// written out of bounds (oneDNN sees one part of the batch at a time and cannot tell). The
// messages name the kind by its Python function and the operands by its parameters, as
// jax_robust/onednn.py's own checks (the same rules, the same words) do.

// A kind's function and the names of its conv input, kernel and conv output (or pooled
// output) roles, whether operand or result.
struct Names {
  const char *call, *x, *k, *y;
};

const Names& NamesOf(int64_t kind) {
  static const Names names[6] = {{"conv", "x", "kernel", "output"},
                                 {"input_grad", "x_shape", "kernel", "gradient"},
                                 {"kernel_grad", "x", "k_shape", "gradient"},
                                 {"conv_pool", "x", "kernel", "output"},
                                 {"pool_input_grad", "x", "kernel", "gradient"},
                                 {"pool_kernel_grad", "x", "k_shape", "gradient"}};
  return names[kind];
}

ffi::Error Refuse(int64_t kind, const std::string& why) {
  return ffi::Error::InvalidArgument("onednn " + std::string(NamesOf(kind).call) + ": " + why);
}

// As Python prints a shape tuple: "(2, 6, 6, 3)".
std::string ShapeText(const memory::dims& d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

std::string TypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    default: return "XLA type " + std::to_string(int(t));
  }
}

// "" when the first role is float32 or bfloat16 and every other role is of its dtype.
std::string DtypeMismatch(
    std::initializer_list<std::pair<const char*, ffi::DataType>> roles) {
  const auto& first = *roles.begin();
  if (DnnlType(first.second) == memory::data_type::undef) {
    return std::string("float32 or bfloat16 only: ") + first.first + " is " +
           TypeName(first.second);
  }
  for (const auto& [name, type] : roles) {
    if (type != first.second) {
      return std::string(name) + " dtype " + TypeName(type) + " != " + first.first + " dtype " +
             TypeName(first.second);
    }
  }
  return "";
}

// "" when x [n, h, w, i], kernel [kh, kw, i, o] and y [n, ho, wo, o] make one convolution
// with strides geo[0:2] and pads geo[2:6] ((top, bottom, left, right)), else the first
// mismatch. With `pooled`, y is the shape of the conv output's 2x2/2 max-pool (floor mode):
// [n, ho / 2, wo / 2, o], ho and wo at least 2. An empty batch is a call with nothing to do.
std::string Mismatch(const Names& names, const memory::dims& x, const memory::dims& k,
                     const memory::dims& y, const std::array<int64_t, 6>& geo, bool pooled) {
  const std::pair<const char*, const memory::dims*> roles[3] = {
      {names.x, &x}, {names.k, &k}, {names.y, &y}};
  for (const auto& [name, d] : roles) {
    if (d->size() != 4) return std::string(name) + " shape " + ShapeText(*d) + " is not 4-D";
  }
  auto text = [](int64_t v) { return std::to_string(v); };
  if (geo[0] < 1 || geo[1] < 1) {
    return "strides (" + text(geo[0]) + ", " + text(geo[1]) + ") are not >= 1";
  }
  if (*std::min_element(geo.begin() + 2, geo.end()) < 0) {
    return "pads ((" + text(geo[2]) + ", " + text(geo[3]) + "), (" + text(geo[4]) + ", " +
           text(geo[5]) + ")) are not >= 0";
  }
  // Sizes of 0: x's image and channels, any of the kernel's (y's follow from them).
  if (*std::min_element(x.begin() + 1, x.end()) < 1) {
    return std::string(names.x) + " shape " + ShapeText(x) + " has an empty image or channels";
  }
  if (*std::min_element(k.begin(), k.end()) < 1) {
    return std::string(names.k) + " shape " + ShapeText(k) + " has a size of 0";
  }
  if (x[0] != y[0]) {
    return std::string(names.x) + " batch " + text(x[0]) + " != " + names.y + " batch " +
           text(y[0]);
  }
  if (x[3] != k[2]) {
    return std::string(names.x) + " channels " + text(x[3]) + " != " + names.k +
           " input channels " + text(k[2]);
  }
  if (y[3] != k[3]) {
    return std::string(names.y) + " channels " + text(y[3]) + " != " + names.k +
           " output channels " + text(k[3]);
  }
  const char* axes[2] = {"height", "width"};
  for (int a = 0; a < 2; ++a) {
    std::string axis = axes[a];
    int64_t size = x[1 + a], kernel = k[a], stride = geo[a];
    int64_t lo = geo[2 + 2 * a], hi = geo[3 + 2 * a];
    std::string pads = " + pads " + text(lo) + "+" + text(hi);
    if (size + lo + hi < kernel) {
      return std::string(names.k) + " " + axis + " " + text(kernel) + " > " + names.x + " " +
             axis + " " + text(size) + pads;
    }
    std::string how = std::string(names.x) + " " + axis + " " + text(size) + ", " + names.k +
                      " " + axis + " " + text(kernel) + ", stride " + text(stride) + ", pads " +
                      text(lo) + "+" + text(hi);
    int64_t conv = (size + lo + hi - kernel) / stride + 1;
    if (pooled && conv < 2) {
      return "the conv output's " + axis + " " + text(conv) + " has no 2x2 window (" + how + ")";
    }
    int64_t want = pooled ? conv / 2 : conv;
    if (y[1 + a] != want) {
      return std::string(names.y) + " " + axis + " " + text(y[1 + a]) + " != " + text(want) +
             " (the " + (pooled ? "pooled " : "") + "conv's " + axis + " for " + how + ")";
    }
  }
  return "";
}

// Runs `job` (kind, whole shapes, geometry and pointers set, every shape checked) over the
// intra-op pool; `dk`: the kernel gradient's output (kinds 2, 5) in dtype `tk`.
ffi::Error Launch(const std::shared_ptr<Job>& job, ffi::ThreadPool& pool, void* dk,
                  memory::data_type tk) {
  std::string name = std::string("onednn ") + NamesOf(job->kind).call + ": ";
  job->n = job->whole.x[0];
  job->parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), job->n));
  int64_t conv_kind = job->kind % 3;
  size_t k_count = job->whole.k[0] * job->whole.k[1] * job->whole.k[2] * job->whole.k[3];
  if (job->n == 0) {  // an empty batch: nothing to read, a kernel gradient of zeros
    if (conv_kind == 2) std::memset(dk, 0, k_count * Bytes(tk));
    return ffi::Error::Success();
  }
  try {
    SingleThreaded one;
    auto& eng = Engine();
    dnnl::stream stream(eng);
    Shapes first = job->whole;  // the first primitive part 0 runs
    first.x[0] = first.y[0] =
        job->kind >= 3 ? std::min(job->chunk, PartStart(*job, 1)) : PartStart(*job, 1);
    const Entry* e = Lookup(conv_kind, first, job->geo);
    if (conv_kind == 2) {
      float* partials = reinterpret_cast<float*>(
          PartialBuffer(k_count * job->parts * sizeof(float)));
      for (int64_t p = 0; p < job->parts; ++p) {
        job->kernel_partial.push_back(partials + p * k_count);
      }
    } else if (e->reorder) {
      job->inner_md = e->kernel_inner;
      job->kernel_inner = CallerBuffer(e->kernel_inner.get_size());
      memory user(e->kernel_user, eng, job->k), inner(e->kernel_inner, eng, job->kernel_inner);
      e->kernel_reorder.execute(stream, user, inner);
      stream.wait();
    }
  } catch (const std::exception& err) {
    return ffi::Error::Internal(name + err.what());
  }
  for (int64_t t = 1; t < job->parts; ++t) pool.Schedule([job] { Work(job); });
  Work(job);
  {
    std::unique_lock<std::mutex> guard(job->lock);
    job->finished.wait(guard, [&] { return job->done == job->parts; });
  }
  if (!job->error.empty()) return ffi::Error::Internal(name + job->error);
  if (conv_kind == 2) {  // sum the parts' float32 gradients in part order, then store
    float* sum = job->kernel_partial[0];
    for (int64_t p = 1; p < job->parts; ++p) {
      const float* part = job->kernel_partial[p];
      for (size_t i = 0; i < k_count; ++i) sum[i] += part[i];
    }
    if (tk == memory::data_type::f32) {
      std::memcpy(dk, sum, k_count * sizeof(float));
    } else {
      uint16_t* out = static_cast<uint16_t*>(dk);
      for (size_t i = 0; i < k_count; ++i) out[i] = RoundBf16(sum[i]);
    }
  }
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
                    ffi::ThreadPool pool, int64_t kind, int64_t stride_h, int64_t stride_w,
                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  if (kind < 0 || kind > 2) {
    return ffi::Error::InvalidArgument("onednn_conv: kind " + std::to_string(kind) +
                                       " is not 0, 1 or 2");
  }
  // The operands and result in their roles' order: (x, kernel, output), (gradient, kernel,
  // x_shape) or (x, gradient, k_shape), as the Python functions take them.
  const Names& names = NamesOf(kind);
  const char* role[3] = {kind == 1 ? names.y : names.x, kind == 2 ? names.y : names.k,
                         kind == 0 ? names.y : (kind == 1 ? names.x : names.k)};
  std::string why = DtypeMismatch({{role[0], a.element_type()}, {role[1], b.element_type()},
                                   {role[2], c->element_type()}});
  memory::data_type t = DnnlType(a.element_type());
  auto job = std::make_shared<Job>();
  job->kind = kind;
  job->geo = {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  job->whole = Roles(kind, Dims(a.dimensions()), Dims(b.dimensions()), Dims(c->dimensions()),
                     t, t, t);
  if (why.empty()) why = Mismatch(names, job->whole.x, job->whole.k, job->whole.y, job->geo, false);
  if (!why.empty()) return Refuse(kind, why);
  char* pa = static_cast<char*>(a.untyped_data());
  char* pb = static_cast<char*>(b.untyped_data());
  char* pc = static_cast<char*>(c->untyped_data());
  job->x = kind == 1 ? pc : pa;
  job->y = kind == 0 ? pc : (kind == 1 ? pa : pb);
  job->k = kind == 2 ? pc : pb;
  return Launch(job, pool, pc, t);
}

// Kinds 3-5, their dtypes checked. x: the conv input (kinds 3, 5) or its gradient (4); k: the
// kernel (3, 4) or its gradient (5); pooled: p (3) or its gradient (4, 5); mask written (3) or
// read (4, 5); relu_x (4): x, read with relu_input only.
ffi::Error PooledImpl(int64_t kind, ffi::AnyBuffer::Dimensions x_dims, memory::data_type t,
                      void* x, ffi::AnyBuffer::Dimensions k_dims, void* k,
                      ffi::AnyBuffer::Dimensions p_dims, void* pooled,
                      ffi::AnyBuffer::Dimensions mask_dims, uint8_t* mask, ffi::ThreadPool& pool,
                      const std::array<int64_t, 6>& geo, int64_t ties_first,
                      int64_t chunk_bytes, int64_t relu_input,
                      const ffi::AnyBuffer* relu_x = nullptr) {
  const Names& names = NamesOf(kind);
  memory::dims xd = Dims(x_dims), kd = Dims(k_dims), pd = Dims(p_dims), md = Dims(mask_dims);
  std::string why = Mismatch(names, xd, kd, pd, geo, true);
  if (why.empty() && md != pd) {
    why = "mask shape " + ShapeText(md) + " != " + names.y + " shape " + ShapeText(pd);
  }
  if (why.empty() && relu_input != 0 && relu_x != nullptr &&
      Dims(relu_x->dimensions()) != xd) {
    why = "the x operand's shape " + ShapeText(Dims(relu_x->dimensions())) +
          " != the result's " + ShapeText(xd);
  }
  if (why.empty() && chunk_bytes < 1) {
    why = "chunk_bytes " + std::to_string(chunk_bytes) + " is not >= 1";
  }
  if (!why.empty()) return Refuse(kind, why);
  int64_t ho = (xd[1] + geo[2] + geo[3] - kd[0]) / geo[0] + 1;
  int64_t wo = (xd[2] + geo[4] + geo[5] - kd[1]) / geo[1] + 1;
  auto job = std::make_shared<Job>();
  job->kind = kind;
  job->geo = geo;
  job->whole = {xd, {xd[0], ho, wo, kd[3]}, kd, t, t, t};
  job->x = static_cast<char*>(x);
  job->k = static_cast<char*>(k);
  job->p = static_cast<char*>(pooled);
  job->mask = mask;
  job->ties_first = ties_first != 0;
  job->relu_input = relu_input != 0;
  if (job->relu_input && relu_x != nullptr) {
    job->relu_x = static_cast<char*>(relu_x->untyped_data());
  }
  int64_t y_img = ho * wo * kd[3] * int64_t(Bytes(t));
  job->chunk = std::max<int64_t>(1, chunk_bytes / y_img);
  return Launch(job, pool, k, t);
}

ffi::Error ConvPoolImpl(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> p,
                        ffi::Result<ffi::Buffer<ffi::U8>> mask, ffi::ThreadPool pool,
                        int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                        int64_t pad_left, int64_t pad_right, int64_t ties_first,
                        int64_t chunk_bytes, int64_t relu_input) {
  std::string why = DtypeMismatch({{"x", x.element_type()}, {"kernel", k.element_type()},
                                   {"output", p->element_type()}});
  if (!why.empty()) return Refuse(3, why);
  return PooledImpl(3, x.dimensions(), DnnlType(x.element_type()), x.untyped_data(),
                    k.dimensions(), k.untyped_data(), p->dimensions(), p->untyped_data(),
                    mask->dimensions(), mask->typed_data(), pool,
                    {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right}, ties_first,
                    chunk_bytes, relu_input);
}

ffi::Error ConvPoolInputGradImpl(ffi::AnyBuffer g, ffi::Buffer<ffi::U8> mask, ffi::AnyBuffer k,
                                 ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> dx,
                                 ffi::ThreadPool pool, int64_t stride_h, int64_t stride_w,
                                 int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                                 int64_t pad_right, int64_t chunk_bytes, int64_t relu_input) {
  // x is read (for the ReLU's gradient) with relu_input only; without, it may be empty.
  std::string why = DtypeMismatch({{"gradient", g.element_type()},
                                   {"kernel", k.element_type()},
                                   {"x", relu_input ? x.element_type() : g.element_type()},
                                   {"the result", dx->element_type()}});
  if (!why.empty()) return Refuse(4, why);
  return PooledImpl(4, dx->dimensions(), DnnlType(dx->element_type()), dx->untyped_data(),
                    k.dimensions(), k.untyped_data(), g.dimensions(), g.untyped_data(),
                    mask.dimensions(), mask.typed_data(), pool,
                    {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right}, 0,
                    chunk_bytes, relu_input, &x);
}

ffi::Error ConvPoolKernelGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Buffer<ffi::U8> mask,
                                  ffi::Result<ffi::AnyBuffer> dk, ffi::ThreadPool pool,
                                  int64_t stride_h, int64_t stride_w, int64_t pad_top,
                                  int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                                  int64_t chunk_bytes, int64_t relu_input) {
  std::string why = DtypeMismatch({{"x", x.element_type()}, {"gradient", g.element_type()},
                                   {"k_shape", dk->element_type()}});
  if (!why.empty()) return Refuse(5, why);
  return PooledImpl(5, x.dimensions(), DnnlType(x.element_type()), x.untyped_data(),
                    dk->dimensions(), dk->untyped_data(), g.dimensions(), g.untyped_data(),
                    mask.dimensions(), mask.typed_data(), pool,
                    {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right}, 0,
                    chunk_bytes, relu_input);
}

}  // namespace

#define JR_EXPORT __attribute__((visibility("default")))
extern "C" JR_EXPORT XLA_FFI_Error* JrOnednnConv(XLA_FFI_CallFrame* call_frame);
extern "C" JR_EXPORT XLA_FFI_Error* JrOnednnConvPool(XLA_FFI_CallFrame* call_frame);
extern "C" JR_EXPORT XLA_FFI_Error* JrOnednnConvPoolInputGrad(XLA_FFI_CallFrame* call_frame);
extern "C" JR_EXPORT XLA_FFI_Error* JrOnednnConvPoolKernelGrad(XLA_FFI_CallFrame* call_frame);

// The geometry attributes every handler takes, after its buffers and the thread pool.
#define JR_GEOMETRY(bind)       \
  bind.Ctx<ffi::ThreadPool>()   \
      .Attr<int64_t>("stride_h") \
      .Attr<int64_t>("stride_w") \
      .Attr<int64_t>("pad_top")  \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left") \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrOnednnConvPool, ConvPoolImpl,
                              JR_GEOMETRY(ffi::Ffi::Bind()
                                              .Arg<ffi::AnyBuffer>()
                                              .Arg<ffi::AnyBuffer>()
                                              .Ret<ffi::AnyBuffer>()
                                              .Ret<ffi::Buffer<ffi::U8>>())
                                  .Attr<int64_t>("ties_first")
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<int64_t>("relu_input"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrOnednnConvPoolInputGrad, ConvPoolInputGradImpl,
                              JR_GEOMETRY(ffi::Ffi::Bind()
                                              .Arg<ffi::AnyBuffer>()
                                              .Arg<ffi::Buffer<ffi::U8>>()
                                              .Arg<ffi::AnyBuffer>()
                                              .Arg<ffi::AnyBuffer>()
                                              .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<int64_t>("relu_input"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrOnednnConvPoolKernelGrad, ConvPoolKernelGradImpl,
                              JR_GEOMETRY(ffi::Ffi::Bind()
                                              .Arg<ffi::AnyBuffer>()
                                              .Arg<ffi::AnyBuffer>()
                                              .Arg<ffi::Buffer<ffi::U8>>()
                                              .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<int64_t>("relu_input"));

// Whether this CPU has oneDNN convolutions (forward and both gradients) for `dtype`: 0
// float32, 1 bfloat16 (oneDNN 3.2 has no bf16 convolution on CPUs without AVX-512).
extern "C" JR_EXPORT int64_t JrOnednnConvSupports(int64_t dtype) {
  memory::data_type t = dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32;
  Shapes s{{2, 6, 6, 4}, {2, 4, 4, 8}, {3, 3, 4, 8}, t, t, t};
  try {
    for (int64_t kind = 0; kind < 3; ++kind) Build(kind, s, {1, 1, 0, 0, 0, 0});
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}

namespace {

// Copies `text` into `out` (up to `size` bytes, no terminator); returns the bytes it needs.
int64_t CopyOut(const std::string& text, char* out, int64_t size) {
  for (int64_t i = 0; i < size && i < int64_t(text.size()); ++i) out[i] = text[i];
  return int64_t(text.size());
}

// oneDNN's version as onednn.py writes it: "3.2.0 (git hash)".
std::string VersionText(int major, int minor, int patch, const char* hash) {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch) +
         " (" + (hash ? hash : "") + ")";
}

}  // namespace

// The oneDNN version this library was compiled against (its headers' DNNL_VERSION_*), and the
// one it runs with (dnnl_version()): onednn.py uses the library only when they agree.
extern "C" JR_EXPORT int64_t JrOnednnConvBuiltVersion(char* out, int64_t size) {
  return CopyOut(VersionText(DNNL_VERSION_MAJOR, DNNL_VERSION_MINOR, DNNL_VERSION_PATCH,
                             DNNL_VERSION_HASH),
                 out, size);
}

extern "C" JR_EXPORT int64_t JrOnednnConvRuntimeVersion(char* out, int64_t size) {
  const dnnl_version_t* v = dnnl_version();
  return CopyOut(VersionText(v->major, v->minor, v->patch, v->hash), out, size);
}

// The instruction set oneDNN's kernels dispatch to on this CPU (dnnl_get_effective_cpu_isa:
// the CPU's best, or less under DNNL_MAX_CPU_ISA).
extern "C" JR_EXPORT int64_t JrOnednnConvIsa(char* out, int64_t size) {
  std::string name;
  switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_default: name = "default (no JIT kernels)"; break;
    case dnnl_cpu_isa_sse41: name = "sse41"; break;
    case dnnl_cpu_isa_avx: name = "avx"; break;
    case dnnl_cpu_isa_avx2: name = "avx2"; break;
    case dnnl_cpu_isa_avx2_vnni: name = "avx2_vnni"; break;
    case dnnl_cpu_isa_avx2_vnni_2: name = "avx2_vnni_2"; break;
    case dnnl_cpu_isa_avx512_core: name = "avx512_core"; break;
    case dnnl_cpu_isa_avx512_core_vnni: name = "avx512_core_vnni"; break;
    case dnnl_cpu_isa_avx512_core_bf16: name = "avx512_core_bf16"; break;
    case dnnl_cpu_isa_avx512_core_fp16: name = "avx512_core_fp16"; break;
    case dnnl_cpu_isa_avx512_core_amx: name = "avx512_core_amx"; break;
    case dnnl_cpu_isa_avx512_core_amx_fp16: name = "avx512_core_amx_fp16"; break;
    default: name = "isa " + std::to_string(int(dnnl_get_effective_cpu_isa())); break;
  }
  return CopyOut(name, out, size);
}

// The implementation oneDNN chose for each cached shape (benchmarks and tests): writes up to
// `size` bytes of "kind:impl;" records into `out`; returns the bytes needed.
extern "C" JR_EXPORT int64_t JrOnednnConvImpls(char* out, int64_t size) {
  std::string all;
  std::lock_guard<std::mutex> guard(cache_lock);
  for (auto& [key, entry] : cache) {
    all += std::to_string(std::get<0>(key)) + ":" + entry->impl + ";";
  }
  return CopyOut(all, out, size);
}
