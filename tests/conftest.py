"""Test defaults: CPU, strict rank promotion, and the slow/gpu markers."""

import os

# Keep CPU tests on the CPU even where a GPU plugin is installed, unless a
# GPU run asks for the accelerator explicitly.
if not os.environ.get("NOSA_TEST_GPU"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
