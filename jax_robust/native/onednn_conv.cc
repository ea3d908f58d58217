// 2-D convolutions for XLA:CPU through oneDNN, as one XLA FFI handler (jax_robust/onednn.py).
//
// kind 0, forward:          a = x [n, h, w, i], b = k [kh, kw, i, o]   -> c = y [n, ho, wo, o]
// kind 1, input gradient:   a = g [n, ho, wo, o], b = k [kh, kw, i, o] -> c = dx [n, h, w, i]
// kind 2, kernel gradient:  a = x [n, h, w, i], b = g [n, ho, wo, o]   -> c = dk [kh, kw, i, o]
// Activations NHWC and kernels HWIO (Flax's layouts); a and b float32 or bfloat16, c of a's
// dtype; strides and non-negative paddings as attributes. No dilation, no groups.
//
// Threads: the batch is cut into one part per thread of XLA's intra-op pool, and each part is
// one single-threaded oneDNN call, on the calling thread or on a pool thread (whichever
// claims it first, so a call never waits on a part nobody runs). oneDNN's own OpenMP threads
// are never started: the OpenMP runtime is shared with PyTorch when both are loaded, and
// extra OpenMP thread pools (one per calling XLA thread) throttle PyTorch's own (GOMP's spin
// wait turns short once it manages more threads than there are CPUs): -35% on PyTorch's AT
// step, measured (BUILD_NOTES.md).
//
// Activations are read and written in place (oneDNN's nhwc). Kernels are reordered to the
// blocked layout the chosen implementation wants, a few KB per call; kernel gradients are
// summed over the parts in float32, in part order. Primitives are built once per shape and
// cached; scratchpads are per call, so concurrent calls are safe.

#include <algorithm>
#include <exception>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
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
  std::vector<float*> kernel_partial;  // kind 2: each part's f32 HWIO gradient
  std::atomic<int64_t> next{0};
  std::mutex lock;
  std::condition_variable finished;
  int64_t done = 0;
  std::string error;
};

int64_t PartStart(const Job& job, int64_t p) { return job.n * p / job.parts; }

// Grow-only per-thread buffers for scratchpads and reordered kernels: after the first calls a
// conv allocates nothing (per-call heap churn moved glibc's mmap threshold and slowed the
// PyTorch steps timed beside it in one process; BUILD_NOTES.md).
uint8_t* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::vector<uint8_t> buffers[2];
  std::vector<uint8_t>& b = buffers[slot];
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

void RunPart(Job& job, int64_t p) {
  SingleThreaded one;
  int64_t lo = PartStart(job, p), hi = PartStart(job, p + 1);
  Shapes s = job.whole;
  s.x[0] = s.y[0] = hi - lo;
  const Entry* e = Lookup(job.kind, s, job.geo);
  auto& eng = Engine();
  dnnl::stream stream(eng);
  size_t x_row = s.x[1] * s.x[2] * s.x[3] * Bytes(s.tx);
  size_t y_row = s.y[1] * s.y[2] * s.y[3] * Bytes(s.ty);
  memory x_mem(Activation(s.x, s.tx), eng, job.x + lo * x_row);
  memory y_mem(Activation(s.y, s.ty), eng, job.y + lo * y_row);
  memory scratch_mem(e->scratch_md, eng, ThreadBuffer(0, e->scratch_md.get_size()));
  if (job.kind == 2) {
    float* out = job.kernel_partial[p];
    memory k_user(e->kernel_user, eng, out);
    memory k_mem = e->reorder
                       ? memory(e->kernel_inner, eng, ThreadBuffer(1, e->kernel_inner.get_size()))
                       : k_user;
    e->conv.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_WEIGHTS, k_mem},
                             {DNNL_ARG_DIFF_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    if (e->reorder) e->kernel_reorder.execute(stream, k_mem, k_user);
  } else {
    memory k_mem(e->kernel_user, eng, job.k);
    if (e->reorder && e->kernel_inner == job.inner_md) {
      k_mem = memory(e->kernel_inner, eng, job.kernel_inner);
    } else if (e->reorder) {  // this part's implementation wants another layout than part 0's
      memory inner(e->kernel_inner, eng, ThreadBuffer(1, e->kernel_inner.get_size()));
      e->kernel_reorder.execute(stream, k_mem, inner);
      k_mem = inner;
    }
    int src = job.kind == 0 ? DNNL_ARG_SRC : DNNL_ARG_DIFF_SRC;
    int dst = job.kind == 0 ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST;
    e->conv.execute(stream, {{src, x_mem}, {DNNL_ARG_WEIGHTS, k_mem}, {dst, y_mem},
                             {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  }
  stream.wait();
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

ffi::Error ConvImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
                    ffi::ThreadPool pool, int64_t kind, int64_t stride_h, int64_t stride_w,
                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  memory::data_type ta = DnnlType(a.element_type()), tb = DnnlType(b.element_type()),
                    tc = DnnlType(c->element_type());
  if (ta == memory::data_type::undef || tb == memory::data_type::undef ||
      tc == memory::data_type::undef) {
    return ffi::Error::InvalidArgument("onednn_conv: float32 or bfloat16 buffers only");
  }
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || c->dimensions().size() != 4 ||
      kind < 0 || kind > 2) {
    return ffi::Error::InvalidArgument("onednn_conv: rank-4 operands and kind 0, 1 or 2");
  }
  auto dims = [](ffi::AnyBuffer::Dimensions d) { return memory::dims(d.begin(), d.end()); };
  auto job = std::make_shared<Job>();
  job->kind = kind;
  job->geo = {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  job->whole = Roles(kind, dims(a.dimensions()), dims(b.dimensions()), dims(c->dimensions()),
                     ta, tb, tc);
  job->n = job->whole.x[0];
  job->parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), job->n));
  char* pa = static_cast<char*>(a.untyped_data());
  char* pb = static_cast<char*>(b.untyped_data());
  char* pc = static_cast<char*>(c->untyped_data());
  job->x = kind == 1 ? pc : pa;
  job->y = kind == 0 ? pc : (kind == 1 ? pa : pb);
  job->k = kind == 2 ? pc : pb;
  try {
    SingleThreaded one;
    auto& eng = Engine();
    dnnl::stream stream(eng);
    Shapes first = job->whole;
    first.x[0] = first.y[0] = PartStart(*job, 1);
    const Entry* e = Lookup(kind, first, job->geo);
    if (kind == 2) {
      size_t count = c->element_count();
      float* partials = reinterpret_cast<float*>(
          PartialBuffer(count * job->parts * sizeof(float)));
      for (int64_t p = 0; p < job->parts; ++p) job->kernel_partial.push_back(partials + p * count);
    } else if (e->reorder) {
      job->inner_md = e->kernel_inner;
      job->kernel_inner = CallerBuffer(e->kernel_inner.get_size());
      memory user(e->kernel_user, eng, job->k), inner(e->kernel_inner, eng, job->kernel_inner);
      e->kernel_reorder.execute(stream, user, inner);
      stream.wait();
    }
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + err.what());
  }
  for (int64_t t = 1; t < job->parts; ++t) pool.Schedule([job] { Work(job); });
  Work(job);
  {
    std::unique_lock<std::mutex> guard(job->lock);
    job->finished.wait(guard, [&] { return job->done == job->parts; });
  }
  if (!job->error.empty()) return ffi::Error::Internal("onednn_conv: " + job->error);
  if (kind == 2) {  // sum the parts' float32 gradients in part order, then store in c's dtype
    size_t count = c->element_count();
    float* sum = job->kernel_partial[0];
    for (int64_t p = 1; p < job->parts; ++p) {
      const float* part = job->kernel_partial[p];
      for (size_t i = 0; i < count; ++i) sum[i] += part[i];
    }
    if (tc == memory::data_type::f32) {
      std::memcpy(pc, sum, count * sizeof(float));
    } else {
      uint16_t* out = reinterpret_cast<uint16_t*>(pc);
      for (size_t i = 0; i < count; ++i) {  // round to nearest even; a NaN stays a NaN
        uint32_t bits;
        std::memcpy(&bits, &sum[i], 4);
        out[i] = (bits & 0x7FFFFFFF) > 0x7F800000
                     ? uint16_t((bits >> 16) | 0x40)
                     : uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

#define JR_EXPORT __attribute__((visibility("default")))
extern "C" JR_EXPORT XLA_FFI_Error* JrOnednnConv(XLA_FFI_CallFrame* call_frame);

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

// The implementation oneDNN chose for each cached shape (benchmarks and tests): writes up to
// `size` bytes of "kind:impl;" records into `out`; returns the bytes needed.
extern "C" JR_EXPORT int64_t JrOnednnConvImpls(char* out, int64_t size) {
  std::string all;
  std::lock_guard<std::mutex> guard(cache_lock);
  for (auto& [key, entry] : cache) {
    all += std::to_string(std::get<0>(key)) + ":" + entry->impl + ";";
  }
  for (int64_t i = 0; i < size && i < int64_t(all.size()); ++i) out[i] = all[i];
  return int64_t(all.size());
}
