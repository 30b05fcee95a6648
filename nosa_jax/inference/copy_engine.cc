// Copy-engine block copies from pinned host memory, issued from inside a
// jitted computation (XLA FFI). Built and loaded by copy_engine.py; the
// design, its limits and what was measured are in that file's docstring.
//
// Two handlers:
//   nosa_dma_issue(dst, plan) -> dst   (dst aliased in place)
//     plan int32[n, 2]: (source row, destination row), rows of `row_bytes`
//     bytes; a negative source row is skipped. The plan is read back to the
//     host (the host must know the addresses), then the copies are enqueued
//     on a stream of our own and an event recorded after them, pushed on a
//     FIFO. The compute stream does not wait for the copies here.
//   nosa_dma_issue_from(plan, dst_0, src_0, dst_1, src_1, ...) -> dst_j
//     The same for several (destination, source) pairs under one plan, with
//     the sources operands (their addresses from XLA, rows bounds-checked)
//     instead of the src_base attribute; one event after all of them.
//   nosa_dma_wait(dst_j...) -> dst_j   (aliased in place)
//     Pops the oldest pending event and makes the compute stream wait for
//     it (cudaStreamWaitEvent): work enqueued after this sees the copies.
//
// CUDA is reached through the runtime library the Python side found
// (dlopen), so the extension builds without the CUDA toolkit.

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

struct MemLocation {
  int type;
  int id;
};
struct MemcpyAttributes {
  int srcAccessOrder;
  MemLocation srcLocHint;
  MemLocation dstLocHint;
  unsigned int flags;
};

constexpr int kMemcpyDefault = 4;
constexpr int kMemcpyDeviceToHost = 2;
constexpr unsigned kStreamNonBlocking = 1;
constexpr unsigned kEventDisableTiming = 2;
constexpr int kSrcAccessOrderStream = 1;

struct Cuda {
  int (*MemcpyAsync)(void*, const void*, size_t, int, cudaStream_t);
  int (*BatchAsync12)(void**, void**, size_t*, size_t, MemcpyAttributes*,
                      size_t*, size_t, size_t*, cudaStream_t);
  int (*BatchAsync13)(void**, void**, size_t*, size_t, MemcpyAttributes*,
                      size_t*, size_t, cudaStream_t);
  int (*StreamCreateWithFlags)(cudaStream_t*, unsigned);
  int (*EventCreateWithFlags)(cudaEvent_t*, unsigned);
  int (*EventRecord)(cudaEvent_t, cudaStream_t);
  int (*EventSynchronize)(cudaEvent_t);
  int (*EventDestroy)(cudaEvent_t);
  int (*StreamWaitEvent)(cudaStream_t, cudaEvent_t, unsigned);
  int (*HostAlloc)(void**, size_t, unsigned);
  int (*GetLastError)();
  const char* (*GetErrorString)(int);
  int (*RuntimeGetVersion)(int*);
};

struct State {
  std::mutex mu;
  bool ready = false;
  Cuda cuda{};
  int runtime = 0;
  int batch = 0;  // 1: one cudaMemcpyBatchAsync per issue; 0: a loop
  cudaStream_t stream = nullptr;
  cudaEvent_t plan_ready = nullptr;
  int32_t* plan_host = nullptr;  // pinned
  size_t plan_capacity = 0;      // int32 entries
  std::deque<cudaEvent_t> pending;
  std::vector<cudaEvent_t> free_events;
  // Counters since the last reset.
  int64_t issued_calls = 0, issued_copies = 0, issued_bytes = 0, waits = 0;
};

State& S() {
  static State s;
  return s;
}

template <typename F>
bool Sym(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

ffi::Error CudaErr(int code, const char* what) {
  State& s = S();
  s.cuda.GetLastError();  // left set, it fails XLA's next launch
  return ffi::Error::Internal(std::string(what) + ": CUDA error " +
                              std::to_string(code) + " (" +
                              s.cuda.GetErrorString(code) + ")");
}

#define CHECK_CUDA(call, what)                 \
  do {                                         \
    int code__ = (call);                       \
    if (code__ != 0) return CudaErr(code__, what); \
  } while (0)

ffi::Error TakeEvent(cudaEvent_t* ev) {
  State& s = S();
  if (!s.free_events.empty()) {
    *ev = s.free_events.back();
    s.free_events.pop_back();
    return ffi::Error::Success();
  }
  CHECK_CUDA(s.cuda.EventCreateWithFlags(ev, kEventDisableTiming),
             "cudaEventCreateWithFlags");
  return ffi::Error::Success();
}

struct Pair {
  char* dst;
  uint64_t dst_rows;
  uint64_t src;  // address
  uint64_t src_rows;  // 0 = unknown (no bounds check)
};

// Reads the plan back (the host must know the addresses), then enqueues
// every pair's planned rows on our stream and one event after them all.
ffi::Error DoIssue(cudaStream_t compute, ffi::Buffer<ffi::S32> plan,
                   const std::vector<Pair>& pairs, int64_t row_bytes) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.ready) return ffi::Error::Internal("nosa_dma: init() not called");
  if (row_bytes <= 0)
    return ffi::Error::InvalidArgument("nosa_dma_issue: row_bytes <= 0");
  auto dims = plan.dimensions();
  if (dims.size() != 2 || dims[1] != 2)
    return ffi::Error::InvalidArgument("nosa_dma_issue: plan must be [n, 2]");
  const size_t n = static_cast<size_t>(dims[0]);
  if (2 * n > s.plan_capacity) {
    // Grows once per new plan size (compile-time constant per call site).
    void* p = nullptr;
    CHECK_CUDA(s.cuda.HostAlloc(&p, 2 * n * sizeof(int32_t), 0),
               "cudaHostAlloc");
    s.plan_host = static_cast<int32_t*>(p);  // old one kept: may be in use
    s.plan_capacity = 2 * n;
  }
  CHECK_CUDA(s.cuda.MemcpyAsync(s.plan_host, plan.typed_data(),
                                2 * n * sizeof(int32_t), kMemcpyDeviceToHost,
                                compute),
             "cudaMemcpyAsync(plan)");
  CHECK_CUDA(s.cuda.EventRecord(s.plan_ready, compute), "cudaEventRecord");
  CHECK_CUDA(s.cuda.EventSynchronize(s.plan_ready), "cudaEventSynchronize");
  std::vector<void*> dsts, srcs;
  dsts.reserve(n * pairs.size());
  srcs.reserve(n * pairs.size());
  for (const Pair& pair : pairs) {
    for (size_t i = 0; i < n; ++i) {
      const int32_t src_row = s.plan_host[2 * i];
      const int32_t dst_row = s.plan_host[2 * i + 1];
      if (src_row < 0) continue;
      if (pair.src_rows != 0 && static_cast<uint64_t>(src_row) >= pair.src_rows)
        return ffi::Error::InvalidArgument(
            "nosa_dma_issue: source row " + std::to_string(src_row) +
            " outside [0, " + std::to_string(pair.src_rows) + ")");
      if (dst_row < 0 || static_cast<uint64_t>(dst_row) >= pair.dst_rows)
        return ffi::Error::InvalidArgument(
            "nosa_dma_issue: destination row " + std::to_string(dst_row) +
            " outside [0, " + std::to_string(pair.dst_rows) + ")");
      srcs.push_back(reinterpret_cast<void*>(
          pair.src + static_cast<uint64_t>(src_row) * row_bytes));
      dsts.push_back(pair.dst + static_cast<uint64_t>(dst_row) * row_bytes);
    }
  }
  const size_t m = dsts.size();
  if (m > 0 && s.batch) {
    std::vector<size_t> sizes(m, static_cast<size_t>(row_bytes));
    MemcpyAttributes attrs{};
    attrs.srcAccessOrder = kSrcAccessOrderStream;
    size_t attr_idx = 0;
    int code;
    if (s.runtime >= 13000) {
      code = s.cuda.BatchAsync13(dsts.data(), srcs.data(), sizes.data(), m,
                                 &attrs, &attr_idx, 1, s.stream);
    } else {
      size_t fail_idx = 0;
      code = s.cuda.BatchAsync12(dsts.data(), srcs.data(), sizes.data(), m,
                                 &attrs, &attr_idx, 1, &fail_idx, s.stream);
    }
    if (code != 0) return CudaErr(code, "cudaMemcpyBatchAsync");
  } else {
    for (size_t i = 0; i < m; ++i)
      CHECK_CUDA(s.cuda.MemcpyAsync(dsts[i], srcs[i], row_bytes,
                                    kMemcpyDefault, s.stream),
                 "cudaMemcpyAsync");
  }
  cudaEvent_t done;
  if (auto e = TakeEvent(&done); e.failure()) return e;
  CHECK_CUDA(s.cuda.EventRecord(done, s.stream), "cudaEventRecord");
  s.pending.push_back(done);
  s.issued_calls += 1;
  s.issued_copies += m;
  s.issued_bytes += m * row_bytes;
  return ffi::Error::Success();
}

ffi::Error IssueImpl(cudaStream_t compute, ffi::AnyBuffer dst,
                     ffi::Buffer<ffi::S32> plan,
                     ffi::Result<ffi::AnyBuffer> out, uint64_t src_base,
                     int64_t row_bytes) {
  if (out->untyped_data() != dst.untyped_data())
    return ffi::Error::Internal(
        "nosa_dma_issue: output not aliased to the destination");
  if (row_bytes <= 0)
    return ffi::Error::InvalidArgument("nosa_dma_issue: row_bytes <= 0");
  return DoIssue(compute, plan,
                 {Pair{static_cast<char*>(dst.untyped_data()),
                       dst.size_bytes() / row_bytes, src_base, 0}},
                 row_bytes);
}

// Operands (dst_0, src_0, dst_1, src_1, ...), results dst_j aliased: the
// sources are operands of the jit (pinned_host arrays), so XLA hands over
// their addresses and nothing outside the jit holds a raw pointer.
ffi::Error IssueFromImpl(cudaStream_t compute, ffi::Buffer<ffi::S32> plan,
                         ffi::RemainingArgs args, ffi::RemainingRets rets,
                         int64_t row_bytes) {
  if (row_bytes <= 0)
    return ffi::Error::InvalidArgument("nosa_dma_issue_from: row_bytes <= 0");
  if (args.size() % 2 || args.size() / 2 != rets.size())
    return ffi::Error::InvalidArgument(
        "nosa_dma_issue_from: operands must be (dst, src) pairs, one result "
        "per dst");
  std::vector<Pair> pairs;
  for (size_t j = 0; j < rets.size(); ++j) {
    auto dst = args.get<ffi::AnyBuffer>(2 * j);
    auto src = args.get<ffi::AnyBuffer>(2 * j + 1);
    auto out = rets.get<ffi::AnyBuffer>(j);
    if (dst.has_error()) return dst.error();
    if (src.has_error()) return src.error();
    if (out.has_error()) return out.error();
    if ((*out)->untyped_data() != dst->untyped_data())
      return ffi::Error::Internal(
          "nosa_dma_issue_from: output not aliased to its destination");
    if (src->size_bytes() % row_bytes || dst->size_bytes() % row_bytes)
      return ffi::Error::InvalidArgument(
          "nosa_dma_issue_from: row_bytes must divide every operand's bytes");
    pairs.push_back(Pair{static_cast<char*>(dst->untyped_data()),
                         dst->size_bytes() / row_bytes,
                         reinterpret_cast<uint64_t>(src->untyped_data()),
                         src->size_bytes() / row_bytes});
  }
  return DoIssue(compute, plan, pairs, row_bytes);
}

// Operands dst_j, results dst_j aliased: one wait for the oldest issue.
ffi::Error WaitImpl(cudaStream_t compute, ffi::RemainingArgs args,
                    ffi::RemainingRets rets) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (args.size() != rets.size())
    return ffi::Error::InvalidArgument("nosa_dma_wait: one result per operand");
  for (size_t j = 0; j < rets.size(); ++j) {
    auto dst = args.get<ffi::AnyBuffer>(j);
    auto out = rets.get<ffi::AnyBuffer>(j);
    if (dst.has_error()) return dst.error();
    if (out.has_error()) return out.error();
    if ((*out)->untyped_data() != dst->untyped_data())
      return ffi::Error::Internal(
          "nosa_dma_wait: output not aliased to its operand");
  }
  if (s.pending.empty()) return ffi::Error::Success();
  cudaEvent_t done = s.pending.front();
  s.pending.pop_front();
  CHECK_CUDA(s.cuda.StreamWaitEvent(compute, done, 0), "cudaStreamWaitEvent");
  // Safe to reuse once re-recorded: a later record supersedes this one only
  // for waits enqueued after it, and this wait is already enqueued.
  s.free_events.push_back(done);
  s.waits += 1;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaIssue, IssueImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<uint64_t>("src_base")
                                  .Attr<int64_t>("row_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaIssueFrom, IssueFromImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("row_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaWait, WaitImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()
                                  .RemainingRets());

extern "C" {

// 0 on success, else a negative step number or a CUDA error code. batch:
// 1 = one cudaMemcpyBatchAsync per issue (CUDA >= 12.8), 0 = a loop of
// cudaMemcpyAsync.
int nosa_dma_init(const char* cudart_path, int batch) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.ready) {
    s.batch = batch;
    return 0;
  }
  void* lib = dlopen(cudart_path, RTLD_NOW | RTLD_GLOBAL);
  if (lib == nullptr) return -1;
  Cuda& c = s.cuda;
  bool ok = Sym(lib, "cudaMemcpyAsync", &c.MemcpyAsync) &&
            Sym(lib, "cudaStreamCreateWithFlags", &c.StreamCreateWithFlags) &&
            Sym(lib, "cudaEventCreateWithFlags", &c.EventCreateWithFlags) &&
            Sym(lib, "cudaEventRecord", &c.EventRecord) &&
            Sym(lib, "cudaEventSynchronize", &c.EventSynchronize) &&
            Sym(lib, "cudaEventDestroy", &c.EventDestroy) &&
            Sym(lib, "cudaStreamWaitEvent", &c.StreamWaitEvent) &&
            Sym(lib, "cudaHostAlloc", &c.HostAlloc) &&
            Sym(lib, "cudaGetLastError", &c.GetLastError) &&
            Sym(lib, "cudaGetErrorString", &c.GetErrorString) &&
            Sym(lib, "cudaRuntimeGetVersion", &c.RuntimeGetVersion);
  if (!ok) return -2;
  c.RuntimeGetVersion(&s.runtime);
  void* batch_fn = dlsym(lib, "cudaMemcpyBatchAsync");
  c.BatchAsync12 = reinterpret_cast<decltype(c.BatchAsync12)>(batch_fn);
  c.BatchAsync13 = reinterpret_cast<decltype(c.BatchAsync13)>(batch_fn);
  if (batch && batch_fn == nullptr) return -3;
  int code = c.StreamCreateWithFlags(&s.stream, kStreamNonBlocking);
  if (code != 0) return code;
  code = c.EventCreateWithFlags(&s.plan_ready, kEventDisableTiming);
  if (code != 0) return code;
  s.batch = batch;
  s.ready = true;
  return 0;
}

// Counters: calls, copies, bytes, waits, pending; reset when reset != 0.
void nosa_dma_counters(int64_t* out5, int reset) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  out5[0] = s.issued_calls;
  out5[1] = s.issued_copies;
  out5[2] = s.issued_bytes;
  out5[3] = s.waits;
  out5[4] = static_cast<int64_t>(s.pending.size());
  if (reset) s.issued_calls = s.issued_copies = s.issued_bytes = s.waits = 0;
}

}  // extern "C"
