/* A stand-in CUDA runtime for CPU tests of nosa_jax/inference/copy_engine:
   the functions copy_engine.cc looks up, with CUDA 13 signatures, where a
   copy is a memcpy done at once and streams and events do nothing (every
   "asynchronous" copy has landed when its call returns). It checks what it
   can: a copy's pointers are non-null and the batch's attribute index is
   in range. Counts the copies it made (fake_copies). */
#include <stdlib.h>
#include <string.h>

static long copies = 0;

long fake_copies(void) { return copies; }

int cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind,
                    void* stream) {
  (void)kind; (void)stream;
  if (dst == NULL || src == NULL) return 1;
  memcpy(dst, src, n);
  copies += 1;
  return 0;
}

int cudaMemcpyBatchAsync(void** dsts, void** srcs, size_t* sizes,
                         size_t count, void* attrs, size_t* attr_idxs,
                         size_t num_attrs, void* stream) {
  (void)stream;
  if (attrs == NULL || num_attrs < 1 || attr_idxs[0] != 0) return 1;
  for (size_t i = 0; i < count; ++i) {
    if (dsts[i] == NULL || srcs[i] == NULL) return 1;
    memcpy(dsts[i], srcs[i], sizes[i]);
    copies += 1;
  }
  return 0;
}

int cudaStreamCreateWithFlags(void** stream, unsigned flags) {
  (void)flags; *stream = malloc(1); return 0;
}
int cudaEventCreateWithFlags(void** event, unsigned flags) {
  (void)flags; *event = malloc(1); return 0;
}
int cudaEventRecord(void* event, void* stream) {
  (void)event; (void)stream; return 0;
}
int cudaEventSynchronize(void* event) { (void)event; return 0; }
int cudaEventDestroy(void* event) { free(event); return 0; }
int cudaStreamWaitEvent(void* stream, void* event, unsigned flags) {
  (void)stream; (void)event; (void)flags; return 0;
}
int cudaHostAlloc(void** ptr, size_t n, unsigned flags) {
  (void)flags; *ptr = malloc(n); return *ptr == NULL;
}
int cudaGetLastError(void) { return 0; }
const char* cudaGetErrorString(int code) { (void)code; return "fake error"; }
int cudaRuntimeGetVersion(int* version) { *version = 13000; return 0; }
/* Every pointer is host memory here (cudaMemoryTypeHost = 1, the first
   field of cudaPointerAttributes), unless a test says otherwise. */
static int memory_type = 1;
void fake_set_memory_type(int type) { memory_type = type; }
int cudaPointerGetAttributes(void* attrs, const void* ptr) {
  (void)ptr; *(int*)attrs = memory_type; return 0;
}
