"""Test defaults: CPU, strict rank promotion, and the slow/gpu markers.

Two settings keep the CPU suite inside CI's budget (STYLE.md rule 10); they
change how fast programs compile, never what a test computes or checks:

* XLA's CPU backend compiles at optimization level 0: the programs here are
  tiny and compile-bound (compiling took most of the suite's time at the
  default level 3; level 0 halves it).
* One persistent compilation cache per test session, shared by the xdist
  workers and by the subprocesses the tests start (CLI, notebook and
  multi-device runs, which inherit the environment): a program that two
  processes, or two `jax.jit` of equal lambdas, compile is compiled once.
  It starts empty in every session and is removed at the end.

Both are environment variables, set before JAX starts; set them yourself to
override (e.g. `XLA_FLAGS=--xla_backend_optimization_level=3`). With
NOSA_TEST_GPU neither is set.
"""

import atexit
import os
import shutil
import tempfile

# Keep CPU tests on the CPU even where a GPU plugin is installed, unless a
# GPU run asks for the accelerator explicitly.
if not os.environ.get("NOSA_TEST_GPU"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (
        f"{_flags} --xla_backend_optimization_level=0".strip())
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set by the first process (the xdist controller); workers and
    # subprocesses inherit it.
    _cache = tempfile.mkdtemp(prefix="nosa_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Every program, however fast it compiles (the default keeps only
    # those over 1 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# fp32 tolerances assume fp32 matmuls; on the GPU XLA's default would use
# TF32 (10-bit mantissa) for fp32 dots.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 cores")
  config.addinivalue_line("markers", "gpu: needs a GPU (run on the device)")

from absl import flags  # noqa: E402

# absltest helpers (create_tempdir) read absl flags, which pytest never parses.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
