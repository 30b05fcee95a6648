// Copy-engine block copies from pinned host memory, issued from inside a
// jitted computation (XLA FFI). Built and loaded by copy_engine.py; the
// design, its limits and what was measured are in that file's docstring.
//
// Handlers (every destination is aliased in place to its result):
//   nosa_dma_issue(dst, plan; src_base, row_bytes) -> dst
//   nosa_dma_issue_from(plan, dst_0, src_0, dst_1, src_1, ...) -> dst_j
//     plan int32[n, 2]: (source row, destination row), rows of `row_bytes`
//     bytes; a negative source row is skipped. Enqueues, on the compute
//     stream, the plan's copy back to pinned host memory and an event after
//     it, and records a job (the pairs' addresses: src_base, or the sources
//     as operands) on a FIFO. Returns at once: nothing waits here.
//   nosa_dma_wait(dst_j...) -> dst_j
//     Takes the oldest job, waits on the host until the GPU has produced
//     its plan (by then the work enqueued between issue and wait is queued
//     behind it, so the GPU keeps busy), enqueues the copies on a stream of
//     our own (one cudaMemcpyBatchAsync, or a cudaMemcpyAsync loop) and an
//     event after them, and makes the compute stream wait for that event:
//     the copies overlap the work queued between issue and wait that the
//     GPU has not yet run, and what follows the wait sees them.
//
// CUDA is reached through the runtime library the Python side found
// (dlopen), so the extension builds without the CUDA toolkit.

#include <dlfcn.h>

#include <cstdint>
#include <algorithm>
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
constexpr unsigned kPreferOverlapWithCompute = 1;  // cudaMemcpyFlag...
constexpr int kErrorInvalidValue = 1;
constexpr int kMemoryTypeHost = 1;  // cudaMemoryTypeHost

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
  int (*PointerGetAttributes)(void*, const void*);
};

struct Pair {
  char* dst;
  uint64_t dst_rows;
  uint64_t src;       // address
  uint64_t src_rows;  // 0 = unknown (no bounds check)
};

struct PlanBuffer {
  int32_t* host = nullptr;  // pinned
  size_t capacity = 0;      // int32 entries
};

// One issue: where its plan lands on the host, when it has, and the pairs.
struct Job {
  PlanBuffer plan;
  size_t n = 0;
  cudaEvent_t plan_ready = nullptr;
  std::vector<Pair> pairs;
  int64_t row_bytes = 0;
};

struct State {
  std::mutex mu;
  bool ready = false;
  Cuda cuda{};
  int runtime = 0;
  int batch = 0;  // 1: one cudaMemcpyBatchAsync per job; 0: a loop
  bool overlap_hint = true;
  cudaStream_t stream = nullptr;
  std::deque<Job> pending;
  std::vector<PlanBuffer> free_plans;
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

#define CHECK_CUDA(call, what)                     \
  do {                                             \
    int code__ = (call);                           \
    if (code__ != 0) return CudaErr(code__, what); \
  } while (0)

// Under s.mu.
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

// Under s.mu: a pinned buffer of at least `entries` int32.
ffi::Error TakePlan(size_t entries, PlanBuffer* out) {
  State& s = S();
  for (size_t i = 0; i < s.free_plans.size(); ++i) {
    if (s.free_plans[i].capacity >= entries) {
      *out = s.free_plans[i];
      s.free_plans.erase(s.free_plans.begin() + i);
      return ffi::Error::Success();
    }
  }
  void* p = nullptr;
  CHECK_CUDA(s.cuda.HostAlloc(&p, entries * sizeof(int32_t), 0),
             "cudaHostAlloc");
  *out = PlanBuffer{static_cast<int32_t*>(p), entries};
  return ffi::Error::Success();
}

// Enqueues the plan's copy to the host and records the job; no waiting.
ffi::Error DoIssue(cudaStream_t compute, ffi::Buffer<ffi::S32> plan,
                   std::vector<Pair> pairs, int64_t row_bytes) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.ready) return ffi::Error::Internal("nosa_dma: init() not called");
  if (row_bytes <= 0)
    return ffi::Error::InvalidArgument("nosa_dma_issue: row_bytes <= 0");
  auto dims = plan.dimensions();
  if (dims.size() != 2 || dims[1] != 2)
    return ffi::Error::InvalidArgument("nosa_dma_issue: plan must be [n, 2]");
  Job job;
  job.n = static_cast<size_t>(dims[0]);
  job.pairs = std::move(pairs);
  job.row_bytes = row_bytes;
  if (auto e = TakePlan(std::max<size_t>(2 * job.n, 1), &job.plan);
      e.failure())
    return e;
  if (auto e = TakeEvent(&job.plan_ready); e.failure()) return e;
  if (job.n > 0)
    CHECK_CUDA(s.cuda.MemcpyAsync(job.plan.host, plan.typed_data(),
                                  2 * job.n * sizeof(int32_t),
                                  kMemcpyDeviceToHost, compute),
               "cudaMemcpyAsync(plan)");
  CHECK_CUDA(s.cuda.EventRecord(job.plan_ready, compute), "cudaEventRecord");
  s.pending.push_back(std::move(job));
  s.issued_calls += 1;
  return ffi::Error::Success();
}

// Under s.mu: the job's copies on our stream (its plan has landed).
ffi::Error EnqueueCopies(const Job& job) {
  State& s = S();
  const int32_t* plan = job.plan.host;
  const uint64_t row_bytes = static_cast<uint64_t>(job.row_bytes);
  std::vector<void*> dsts, srcs;
  dsts.reserve(job.n * job.pairs.size());
  srcs.reserve(job.n * job.pairs.size());
  for (const Pair& pair : job.pairs) {
    for (size_t i = 0; i < job.n; ++i) {
      const int32_t src_row = plan[2 * i], dst_row = plan[2 * i + 1];
      if (src_row < 0) continue;
      if (pair.src_rows != 0 &&
          static_cast<uint64_t>(src_row) >= pair.src_rows)
        return ffi::Error::InvalidArgument(
            "nosa_dma: source row " + std::to_string(src_row) +
            " outside [0, " + std::to_string(pair.src_rows) + ")");
      if (dst_row < 0 || static_cast<uint64_t>(dst_row) >= pair.dst_rows)
        return ffi::Error::InvalidArgument(
            "nosa_dma: destination row " + std::to_string(dst_row) +
            " outside [0, " + std::to_string(pair.dst_rows) + ")");
      srcs.push_back(reinterpret_cast<void*>(pair.src + src_row * row_bytes));
      dsts.push_back(pair.dst + dst_row * row_bytes);
    }
  }
  const size_t m = dsts.size();
  if (m > 0 && s.batch) {
    std::vector<size_t> sizes(m, row_bytes);
    MemcpyAttributes attrs{};
    attrs.srcAccessOrder = kSrcAccessOrderStream;
    // A hint (CUDA >= 12.8); dropped for good if the runtime refuses it.
    attrs.flags = s.overlap_hint ? kPreferOverlapWithCompute : 0;
    size_t attr_idx = 0;
    auto batch = [&]() {
      if (s.runtime >= 13000)
        return s.cuda.BatchAsync13(dsts.data(), srcs.data(), sizes.data(), m,
                                   &attrs, &attr_idx, 1, s.stream);
      size_t fail_idx = 0;
      return s.cuda.BatchAsync12(dsts.data(), srcs.data(), sizes.data(), m,
                                 &attrs, &attr_idx, 1, &fail_idx, s.stream);
    };
    int code = batch();
    if (code == kErrorInvalidValue && attrs.flags != 0) {
      s.cuda.GetLastError();
      s.overlap_hint = false;
      attrs.flags = 0;
      code = batch();
    }
    if (code != 0) return CudaErr(code, "cudaMemcpyBatchAsync");
  } else {
    for (size_t i = 0; i < m; ++i)
      CHECK_CUDA(s.cuda.MemcpyAsync(dsts[i], srcs[i], row_bytes,
                                    kMemcpyDefault, s.stream),
                 "cudaMemcpyAsync");
  }
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
  if (row_bytes <= 0 || dst.size_bytes() % row_bytes)
    return ffi::Error::InvalidArgument(
        "nosa_dma_issue: row_bytes must be > 0 and divide dst's bytes");
  return DoIssue(compute, plan,
                 {Pair{static_cast<char*>(dst.untyped_data()),
                       dst.size_bytes() / row_bytes, src_base, 0}},
                 row_bytes);
}

// A source operand must still be host memory: had XLA copied the pinned
// store to the device before the call, the copies would be device to device
// (right values, none of the point).
ffi::Error CheckHost(const void* ptr, size_t j) {
  State& s = S();
  alignas(8) unsigned char attrs[64] = {};  // cudaPointerAttributes, type 1st
  int code = s.cuda.PointerGetAttributes(attrs, ptr);
  if (code != 0) return CudaErr(code, "cudaPointerGetAttributes");
  int type = 0;
  std::memcpy(&type, attrs, sizeof(type));
  if (type != kMemoryTypeHost)
    return ffi::Error::InvalidArgument(
        "nosa_dma_issue_from: source " + std::to_string(j) +
        " is not pinned host memory (cudaMemoryType " + std::to_string(type) +
        "): XLA moved the store to the device before the call");
  return ffi::Error::Success();
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
    if (auto e = CheckHost(src->untyped_data(), j); e.failure()) return e;
    pairs.push_back(Pair{static_cast<char*>(dst->untyped_data()),
                         dst->size_bytes() / row_bytes,
                         reinterpret_cast<uint64_t>(src->untyped_data()),
                         src->size_bytes() / row_bytes});
  }
  return DoIssue(compute, plan, std::move(pairs), row_bytes);
}

// Operands dst_j, results dst_j aliased: the oldest job's copies, ordered
// before what follows on the compute stream.
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
  // Issue and wait pair in FIFO order; a wait on other buffers than the
  // oldest issue's destinations means the order broke: refuse.
  const Job& front = s.pending.front();
  bool same = front.pairs.size() == args.size();
  for (size_t j = 0; same && j < args.size(); ++j)
    same = static_cast<void*>(front.pairs[j].dst) ==
           args.get<ffi::AnyBuffer>(j)->untyped_data();
  if (!same)
    return ffi::Error::Internal(
        "nosa_dma_wait: its buffers are not the oldest issue's destinations "
        "(issue and wait must pair in FIFO order)");
  Job job = std::move(s.pending.front());
  s.pending.pop_front();
  // The GPU is past the issue point once its plan has landed; the work
  // enqueued after the issue is queued behind it.
  CHECK_CUDA(s.cuda.EventSynchronize(job.plan_ready), "cudaEventSynchronize");
  s.free_events.push_back(job.plan_ready);
  ffi::Error copied = EnqueueCopies(job);
  s.free_plans.push_back(job.plan);  // read: reusable
  if (copied.failure()) return copied;
  cudaEvent_t done;
  if (auto e = TakeEvent(&done); e.failure()) return e;
  CHECK_CUDA(s.cuda.EventRecord(done, s.stream), "cudaEventRecord");
  CHECK_CUDA(s.cuda.StreamWaitEvent(compute, done, 0), "cudaStreamWaitEvent");
  // Reusable at once: a wait already enqueued is not affected by a later
  // record of the same event (CUDA's cudaStreamWaitEvent semantics).
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

// The same handlers without a stream, registered for XLA's CPU platform by
// tests only, over a stand-in runtime (tests/.../fake_cudart.c) whose copies
// are plain memcpy: the address arithmetic, the FIFO pairing and the
// engine's use of issue / wait run in CPU CI.
ffi::Error IssueCpu(ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> plan,
                    ffi::Result<ffi::AnyBuffer> out, uint64_t src_base,
                    int64_t row_bytes) {
  return IssueImpl(nullptr, dst, plan, out, src_base, row_bytes);
}
ffi::Error IssueFromCpu(ffi::Buffer<ffi::S32> plan, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, int64_t row_bytes) {
  return IssueFromImpl(nullptr, plan, args, rets, row_bytes);
}
ffi::Error WaitCpu(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return WaitImpl(nullptr, args, rets);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaIssueCpu, IssueCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<uint64_t>("src_base")
                                  .Attr<int64_t>("row_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaIssueFromCpu, IssueFromCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("row_bytes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NosaDmaWaitCpu, WaitCpu,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());

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
            Sym(lib, "cudaRuntimeGetVersion", &c.RuntimeGetVersion) &&
            Sym(lib, "cudaPointerGetAttributes", &c.PointerGetAttributes);
  if (!ok) return -2;
  c.RuntimeGetVersion(&s.runtime);
  void* batch_fn = dlsym(lib, "cudaMemcpyBatchAsync");
  c.BatchAsync12 = reinterpret_cast<decltype(c.BatchAsync12)>(batch_fn);
  c.BatchAsync13 = reinterpret_cast<decltype(c.BatchAsync13)>(batch_fn);
  if (batch && batch_fn == nullptr) return -3;
  int code = c.StreamCreateWithFlags(&s.stream, kStreamNonBlocking);
  if (code != 0) return code;
  s.batch = batch;
  s.ready = true;
  return 0;
}

// Forgets the pending issues (after a computation failed between an issue
// and its wait: their waits will never come); returns how many.
int64_t nosa_dma_drop_pending() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  const int64_t n = static_cast<int64_t>(s.pending.size());
  for (Job& job : s.pending) {
    if (s.ready) s.cuda.EventSynchronize(job.plan_ready);
    s.free_events.push_back(job.plan_ready);
    s.free_plans.push_back(job.plan);
  }
  s.pending.clear();
  return n;
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
