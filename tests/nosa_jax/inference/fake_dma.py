"""The copy-engine extension on the CPU, over a stand-in CUDA runtime.

`engine(batch)` compiles `fake_cudart.c` (copies are memcpy, streams and
events do nothing) and loads `copy_engine` with it for XLA's CPU platform,
once per process; afterwards `copy_engine.current()` is that engine, so a
HostStore with prefetch_copy="dma" issues and waits through the extension
on the CPU. None where there is no C / C++ compiler.
"""

import ctypes
import os
import shutil
import subprocess
import tempfile

from nosa_jax.inference import copy_engine

_DIR = tempfile.mkdtemp(prefix="nosa_fake_cudart_")
_LIB = os.path.join(_DIR, "libfake_cudart.so")


def compilers_present() -> bool:
  return (shutil.which("cc") or shutil.which("gcc")) is not None and (
      shutil.which("g++") or shutil.which("c++")) is not None


def runtime() -> str:
  """Path of the compiled stand-in runtime."""
  if not os.path.exists(_LIB):
    src = os.path.join(os.path.dirname(__file__), "fake_cudart.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O1", "-shared", "-fPIC", src, "-o", _LIB],
                   check=True, capture_output=True)
  return _LIB


def engine(batch: bool = True):
  eng, why = copy_engine.load(batch, cudart=runtime(), platform="cpu")
  if eng is None:
    raise RuntimeError(why)
  return eng


def set_memory_type(memory_type: int) -> None:
  """What the stand-in says every pointer is (cudaMemoryType: 1 host,
  2 device)."""
  ctypes.CDLL(runtime()).fake_set_memory_type(memory_type)


def copies_made() -> int:
  """Copies the stand-in runtime has made in this process."""
  lib = ctypes.CDLL(runtime())
  lib.fake_copies.restype = ctypes.c_long
  return lib.fake_copies()
