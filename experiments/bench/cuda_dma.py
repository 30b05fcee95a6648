"""Copy-engine DMA from Python: the CUDA runtime through ctypes (a probe).

XLA runs a decode step's kernels on one stream, so the zero-copy gather
(SM loads from pinned host memory) cannot run beside the GEMMs. The copy
engines can: `cudaMemcpyAsync` / `cudaMemcpyBatchAsync` (CUDA >= 12.8) on a
stream of our own, into a device buffer XLA allocated, read back by the
next jitted call once the host has waited for the stream. This module is
that mechanism, no more; `experiments/dma_probe.py` measures whether it
overlaps and what bandwidth batches of small blocks reach.

Safety: the caller must not let XLA read or reuse a destination buffer
while a copy into it is in flight (wait for the stream first, keep the
array alive, never donate it).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

from nosa_jax.inference import copy_engine

_DEFAULT = 4  # cudaMemcpyDefault (unified addressing picks the direction)
_NON_BLOCKING = 1  # cudaStreamNonBlocking
_SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream


class CudaError(RuntimeError):
  pass


class _MemLocation(ctypes.Structure):
  _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
  _fields_ = [("srcAccessOrder", ctypes.c_int),
              ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
              ("flags", ctypes.c_uint)]


def load() -> Optional[ctypes.CDLL]:
  """The CUDA runtime library, or None where there is none (CPU CI)."""
  for path in copy_engine.cudart_paths():
    try:
      return ctypes.CDLL(path)
    except OSError:
      continue
  return None


class Dma:
  """Host <-> device copies on a non-blocking stream of our own."""

  def __init__(self, lib: ctypes.CDLL):
    self.lib = lib
    self.stream = ctypes.c_void_p()
    self._check(lib.cudaStreamCreateWithFlags(ctypes.byref(self.stream),
                                              _NON_BLOCKING),
                "cudaStreamCreateWithFlags")
    self.has_batch = hasattr(lib, "cudaMemcpyBatchAsync")
    self.runtime = self.versions()["runtime"]

  def _check(self, code: int, what: str) -> None:
    if code != 0:
      # Clear the runtime's last error: left set, it fails the next XLA
      # launch in this process ("error before calling cuModuleGetFunction").
      self.lib.cudaGetLastError()
      self.lib.cudaGetErrorString.restype = ctypes.c_char_p
      raise CudaError(f"{what}: CUDA error {code} "
                      f"({self.lib.cudaGetErrorString(code).decode()})")

  def versions(self) -> dict:
    rt, drv = ctypes.c_int(), ctypes.c_int()
    self.lib.cudaRuntimeGetVersion(ctypes.byref(rt))
    self.lib.cudaDriverGetVersion(ctypes.byref(drv))
    return {"runtime": rt.value, "driver": drv.value,
            "batch_api": self.has_batch}

  def host_alloc(self, nbytes: int) -> int:
    """Pinned host memory (cudaHostAlloc), as an address."""
    ptr = ctypes.c_void_p()
    self._check(self.lib.cudaHostAlloc(ctypes.byref(ptr),
                                       ctypes.c_size_t(nbytes), 0),
                "cudaHostAlloc")
    return ptr.value

  def host_free(self, ptr: int) -> None:
    self._check(self.lib.cudaFreeHost(ctypes.c_void_p(ptr)), "cudaFreeHost")

  def copy(self, dsts: Sequence[int], srcs: Sequence[int],
           sizes: Sequence[int], batch: bool = False) -> None:
    """Enqueues the copies (dst[i] <- src[i], sizes[i] bytes); returns at
    once. batch: one cudaMemcpyBatchAsync call instead of one
    cudaMemcpyAsync per copy."""
    n = len(sizes)
    if batch:
      if not self.has_batch:
        raise CudaError("cudaMemcpyBatchAsync needs CUDA runtime >= 12.8")
      ptrs = ctypes.c_void_p * n
      attrs = _MemcpyAttributes(srcAccessOrder=_SRC_ACCESS_ORDER_STREAM)
      idx = (ctypes.c_size_t * 1)(0)
      args = [ptrs(*dsts), ptrs(*srcs), (ctypes.c_size_t * n)(*sizes),
              ctypes.c_size_t(n), ctypes.byref(attrs), idx,
              ctypes.c_size_t(1)]
      # CUDA 13 dropped the failIdx argument (12.8-12.9 have it): passing
      # it there puts a pointer where the stream goes (error 400, invalid
      # resource handle, measured on runtime 13000, 2026-12-07).
      if self.runtime < 13000:
        args.append(ctypes.byref(ctypes.c_size_t()))
      self._check(self.lib.cudaMemcpyBatchAsync(*args, self.stream),
                  "cudaMemcpyBatchAsync")
      return
    fn = self.lib.cudaMemcpyAsync
    for d, s, z in zip(dsts, srcs, sizes, strict=True):
      self._check(fn(ctypes.c_void_p(d), ctypes.c_void_p(s),
                     ctypes.c_size_t(z), _DEFAULT, self.stream),
                  "cudaMemcpyAsync")

  def synchronize(self) -> None:
    self._check(self.lib.cudaStreamSynchronize(self.stream),
                "cudaStreamSynchronize")
