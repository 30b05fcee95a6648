"""Copy-engine block copies issued from inside a jit (an XLA FFI extension).

The offload issue's third transfer candidate: XLA runs a decode step's
kernels on one stream, so an SM copy kernel (the zero-copy gather) cannot run
beside the GEMMs; the copy engines can, on a stream of their own. This module
builds and loads `copy_engine.cc`, a small C++ XLA FFI extension with two
custom calls, and wraps them:

  issue(dst, plan) -> dst   enqueues the int32 plan [n, 2] = (source row,
                            destination row)'s copy back to the host and
                            records a job; returns at once (nothing waits)
  issue_from(pairs, plan)   the same for (dst, src) pairs (K and V) under
                            one plan, the sources operands of the jit
                            (pinned_host arrays; XLA gives their addresses)
  wait(*dsts) -> dsts       takes the oldest job: waits on the host until
                            the GPU has produced its plan, enqueues one copy
                            of `row_bytes` per planned row on a stream of
                            its own (one cudaMemcpyBatchAsync, or a loop of
                            cudaMemcpyAsync), and makes the compute stream
                            wait for them

Every dst comes back aliased in place, so the data dependence dst -> issue
-> wait -> consumer orders them. The host must know the addresses, and the
plan is computed on the GPU: so the copies start only once the host, in
`wait`, has seen the plan, and they overlap the work placed between issue and
wait that the GPU has not run by then. Because the host waits in `wait` and
not in `issue`, the GPU queue never drains at the issue (the work after the
issue is already enqueued behind the plan); the host runs at most one
issue-to-wait span ahead of the GPU.

Limits (honest): the source is addressed by a raw pointer (`src_address`,
from `jax.Array.unsafe_buffer_pointer()` outside the jit), so the caller
keeps that array alive and unmoved while copies may be in flight; issue and
wait pair in FIFO order per process (one decode loop at a time); CUDA only.
Off the GPU, or without a compiler or CUDA runtime, `load()` says why and
returns None; `issue_reference` is the same copy in jnp (tests compare the
two on the GPU).

Build: `python -m nosa_jax.inference.copy_engine` (g++ with C++17 and the
FFI headers jaxlib ships; no CUDA toolkit: CUDA is reached through the
runtime library JAX's CUDA plugin installed, by dlopen). The library is
cached by source hash under $NOSA_DMA_BUILD_DIR or ~/.cache/nosa_jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from typing import Optional

import jax
from jax.experimental import xla_metadata
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(__file__), "copy_engine.cc")
# Set to "1": issue_from marks its sources with the operands_memory_spaces
# frontend attribute (host, 5) for XLA:GPU's buffer colorer (a fallback,
# not needed unless the host check fires).
HOST_OPERANDS_ENV = "NOSA_DMA_HOST_OPERANDS_ATTR"
_ISSUE, _ISSUE_FROM, _WAIT = ("nosa_dma_issue", "nosa_dma_issue_from",
                              "nosa_dma_wait")


def cudart_paths() -> list[str]:
  """Candidate CUDA runtime libraries: JAX's pip CUDA first, then the
  system's."""
  paths = []
  try:
    import nvidia  # pylint: disable=g-import-not-at-top
    for root in nvidia.__path__:
      paths += sorted(glob.glob(os.path.join(root, "*", "lib",
                                             "libcudart.so*")))
  except ImportError:
    pass
  found = ctypes.util.find_library("cudart")
  return paths + ([found] if found else []) + ["libcudart.so.13",
                                              "libcudart.so.12",
                                              "libcudart.so"]


def build(build_dir: Optional[str] = None) -> str:
  """Compiles copy_engine.cc (cached by source hash); returns the .so path.

  Raises RuntimeError with the compiler's message if it fails.
  """
  with open(_SOURCE, "rb") as f:
    digest = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()
  build_dir = build_dir or os.environ.get(
      "NOSA_DMA_BUILD_DIR", os.path.expanduser("~/.cache/nosa_jax"))
  os.makedirs(build_dir, exist_ok=True)
  lib = os.path.join(build_dir, f"copy_engine_{digest[:16]}.so")
  if os.path.exists(lib):
    return lib
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise RuntimeError("copy_engine.build: no C++ compiler (set CXX or "
                       "install g++)")
  tmp = f"{lib}.{os.getpid()}.tmp"
  # libstdc++ linked in and its symbols hidden: the library loads beside
  # whatever libstdc++ jaxlib brought, on machines older than the builder.
  cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-static-libstdc++",
         "-static-libgcc", "-Wl,--exclude-libs,ALL",
         f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp, "-ldl"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"copy_engine.build: {' '.join(cmd)} failed:\n"
                       f"{proc.stderr[-4000:]}")
  os.replace(tmp, lib)  # atomic: a concurrent build never sees half a file
  return lib


@dataclasses.dataclass(frozen=True)
class CopyEngine:
  """The loaded extension: issue / wait wrappers and its counters."""

  lib: ctypes.CDLL
  batch: bool

  def issue(self, dst: jax.Array, plan_N2: jax.Array, *, src_address: int,
            row_bytes: int) -> jax.Array:
    """Enqueues dst rows <- source rows (plan [n, 2] int32; a negative
    source row is skipped); returns dst (aliased)."""
    _check_plan(dst, plan_N2, row_bytes)
    return jax.ffi.ffi_call(
        _ISSUE, jax.ShapeDtypeStruct(dst.shape, dst.dtype),
        input_output_aliases={0: 0}, has_side_effect=True)(
            dst, plan_N2.astype(jnp.int32), src_base=np.uint64(src_address),
            row_bytes=np.int64(row_bytes))

  def issue_from(self, pairs, plan_N2: jax.Array, *,
                 row_bytes: int) -> tuple[jax.Array, ...]:
    """`issue` for several (dst, src) pairs under one plan, the sources
    operands of the jit (pinned_host arrays: no raw address outside the
    jit; source rows are bounds-checked); returns the dsts (aliased)."""
    pairs = tuple(pairs)
    for dst, src in pairs:
      _check_plan(dst, plan_N2, row_bytes)
      if (src.size * src.dtype.itemsize) % row_bytes:
        raise ValueError(f"row_bytes={row_bytes} must divide the source's "
                         f"{src.size * src.dtype.itemsize} bytes")
    dsts = [d for d, _ in pairs]
    call = jax.ffi.ffi_call(
        _ISSUE_FROM, [jax.ShapeDtypeStruct(d.shape, d.dtype) for d in dsts],
        input_output_aliases={1 + 2 * j: j for j in range(len(pairs))},
        has_side_effect=True)
    args = (plan_N2.astype(jnp.int32), *[x for pair in pairs for x in pair])
    if os.environ.get(HOST_OPERANDS_ENV) != "1":
      return tuple(call(*args, row_bytes=np.int64(row_bytes)))
    # Opt-in: ask XLA's buffer colorer to keep the sources in host memory
    # (memory space 5), should XLA:GPU move them to the device otherwise
    # (issue_from's host check then refuses them).
    spaces = ",".join(f"{2 + 2 * j}:5" for j in range(len(pairs)))
    with xla_metadata.set_xla_metadata(operands_memory_spaces=f"{{{spaces}}}"):
      return tuple(call(*args, row_bytes=np.int64(row_bytes)))

  def wait(self, *dsts: jax.Array):
    """Orders the oldest pending issue's copies before what uses the
    results; returns the dsts (aliased; one array if one was given)."""
    out = jax.ffi.ffi_call(
        _WAIT, [jax.ShapeDtypeStruct(d.shape, d.dtype) for d in dsts],
        input_output_aliases={j: j for j in range(len(dsts))},
        has_side_effect=True)(*dsts)
    return out[0] if len(dsts) == 1 else tuple(out)

  def drop_pending(self) -> int:
    """Forgets issues whose waits will never run (a computation failed
    between them); returns how many. Without it the next wait refuses."""
    self.lib.nosa_dma_drop_pending.restype = ctypes.c_int64
    return int(self.lib.nosa_dma_drop_pending())

  def counters(self, reset: bool = False) -> dict:
    """Issue calls, copies, bytes and waits since the last reset; pending
    issues not yet waited for."""
    out = (ctypes.c_int64 * 5)()
    self.lib.nosa_dma_counters(out, int(reset))
    return dict(zip(("calls", "copies", "bytes", "waits", "pending"),
                    list(out), strict=True))


def issue_reference(dst: jax.Array, src_rows: jax.Array,
                    plan_N2: jax.Array) -> jax.Array:
  """`issue` then `wait` in jnp: dst viewed as rows of src_rows' row
  shape, rows plan[:, 1] <- src_rows[plan[:, 0]] where plan[:, 0] >= 0."""
  rows = dst.reshape((-1,) + src_rows.shape[1:])
  src_N, dst_N = plan_N2[:, 0], plan_N2[:, 1]
  take_N = src_N >= 0
  got = jnp.take(src_rows, jnp.where(take_N, src_N, 0), axis=0)
  dst_N = jnp.where(take_N, dst_N, rows.shape[0])  # out of range: dropped
  return rows.at[dst_N].set(got, mode="drop").reshape(dst.shape)


def _check_plan(dst, plan_N2, row_bytes):
  if plan_N2.ndim != 2 or plan_N2.shape[1] != 2:
    raise ValueError(f"plan must be [n, 2] (source row, destination row), "
                     f"got shape {plan_N2.shape}")
  nbytes = dst.size * dst.dtype.itemsize
  if row_bytes <= 0 or nbytes % row_bytes:
    raise ValueError(f"row_bytes={row_bytes} must be > 0 and divide the "
                     f"destination's {nbytes} bytes")


_LIBS: dict[str, ctypes.CDLL] = {}  # built library path -> loaded
_REGISTERED: set[str] = set()  # XLA platforms with the targets registered
_ENGINES: dict[str, CopyEngine] = {}  # "gpu" / "cpu" -> the loaded engine


def load(batch: bool = True, *, cudart: Optional[str] = None,
         platform: Optional[str] = None
         ) -> tuple[Optional[CopyEngine], str]:
  """(the engine, "") on a CUDA GPU with a compiler, else (None, why).

  Args:
    batch: one cudaMemcpyBatchAsync per wait (CUDA >= 12.8) instead of one
      cudaMemcpyAsync per row. The mode is per process: the last load()
      sets it for every engine.
    cudart, platform: tests only. A stand-in runtime library, and "cpu":
      the handlers without a stream, registered for XLA's CPU platform, so
      that issue / wait run in CPU CI over that stand-in (its copies are
      memcpy). One runtime per process: the first load() chooses it.
  """
  if platform is None and jax.default_backend() != "gpu":
    return None, f"needs a CUDA GPU (backend {jax.default_backend()!r})"
  platform = platform or "CUDA"
  try:
    path = build()
  except RuntimeError as e:
    return None, str(e).splitlines()[0]
  lib = _LIBS.get(path) or ctypes.CDLL(path)
  lib.nosa_dma_init.argtypes = [ctypes.c_char_p, ctypes.c_int]
  code, tried = None, []
  for candidate in [cudart] if cudart else cudart_paths():
    code = lib.nosa_dma_init(candidate.encode(), int(batch))
    tried.append(f"{candidate}: {code}")
    if code != -1:  # -1: dlopen failed, try the next
      break
  if code != 0:
    return None, f"nosa_dma_init failed ({'; '.join(tried)})"
  _LIBS[path] = lib
  if platform not in _REGISTERED:
    suffix = "Cpu" if platform == "cpu" else ""
    for name, symbol in ((_ISSUE, "NosaDmaIssue"),
                         (_ISSUE_FROM, "NosaDmaIssueFrom"),
                         (_WAIT, "NosaDmaWait")):
      jax.ffi.register_ffi_target(
          name, jax.ffi.pycapsule(getattr(lib, symbol + suffix)),
          platform=platform)
    _REGISTERED.add(platform)
  engine = CopyEngine(lib, batch)
  _ENGINES["cpu" if platform == "cpu" else "gpu"] = engine
  return engine, ""


def current() -> tuple[Optional[CopyEngine], str]:
  """The engine for this backend: on the GPU `load()`'s (batched copies);
  elsewhere the one a test loaded for the CPU, if any."""
  if jax.default_backend() == "gpu":
    return (_ENGINES["gpu"], "") if "gpu" in _ENGINES else load()
  if "cpu" in _ENGINES:
    return _ENGINES["cpu"], ""
  return None, f"needs a CUDA GPU (backend {jax.default_backend()!r})"


def main() -> int:
  path = build()
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
