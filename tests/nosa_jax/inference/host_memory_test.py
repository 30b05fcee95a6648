"""Pinned host memory: XLA's cap and the capacity check."""

import os
from unittest import mock

from absl.testing import absltest
import jax

from nosa_jax import testing
from nosa_jax.inference import host_memory


class HostMemoryTest(absltest.TestCase):

  def test_gpu_pinned_host_cap(self):
    # XLA's GPU client caps pinned_host at XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
    # (64 GB by default); the capacity check must count that cap.
    hm = host_memory
    env = hm.HOST_LIMIT_ENV
    phys = lambda kind: 137_000_000_000  # a 128 GiB machine
    cfg = testing.tiny_model_config("nosa")
    with mock.patch.dict(os.environ, {}, clear=False), \
        mock.patch.object(hm, "_physical_host_bytes", phys):
      # (need_bytes, cap in GB): need + max(8 GB, 10%), at most 0.75 of
      # RAM (BFC growth pins up to the cap), never below XLA's 64 GB.
      for need, want in ((68_700_000_000, "77"), (None, "103"),
                         (1_000_000_000, "64"), (500_000_000_000, "103")):
        os.environ.pop(env, None)
        hm.allow_pinned_host_memory(need)
        self.assertEqual(os.environ[env], want, need)
      hm.allow_pinned_host_memory(None, fraction=0.9)
      self.assertEqual(os.environ[env], "103")  # an explicit value is kept
      os.environ[env] = "100"  # 100 GB cap, 137 GB "free" RAM
      with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
          mock.patch.object(hm, "_pinned_high_water", [0]), \
          mock.patch.object(hm, "_live_pinned_bytes", lambda: 0):
        self.assertEqual(hm._available_host_bytes(), 100_000_000_000)
        need = hm.check_host_capacity(cfg, 2, 64)
        self.assertEqual(hm._pinned_high_water, [need])
      # A pool that held 70 GB keeps it: with 40 GB of free RAM left, a new
      # store may take the pool's 70 GB (nothing live) plus 30 GB of growth.
      phys40 = lambda kind: 40_000_000_000
      with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
          mock.patch.object(hm, "_physical_host_bytes", phys40), \
          mock.patch.object(hm, "_pinned_high_water", [70 * 10**9]):
        with mock.patch.object(hm, "_live_pinned_bytes", lambda: 0):
          self.assertEqual(hm._available_host_bytes(), 100 * 10**9)
        with mock.patch.object(hm, "_live_pinned_bytes",
                               lambda: 60 * 10**9):
          self.assertEqual(hm._available_host_bytes(), 40 * 10**9)
      os.environ[env] = "0.001"  # 1 MB
      with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
          mock.patch.object(hm, "_pinned_high_water", [0]), \
          mock.patch.object(hm, "_live_pinned_bytes", lambda: 0):
        self.assertEqual(hm._available_host_bytes(), 1_000_000)
        with self.assertRaisesRegex(ValueError, env):
          hm.check_host_capacity(cfg, 64, 4096)
      with mock.patch.object(jax, "default_backend", lambda: "cpu"):
        self.assertGreater(hm._available_host_bytes(), 1_000_000)
    with self.assertRaisesRegex(ValueError, "fraction"):
      hm.allow_pinned_host_memory(fraction=0.0)
    with self.assertRaisesRegex(ValueError, "need_bytes"):
      hm.allow_pinned_host_memory(-1)


if __name__ == "__main__":
  absltest.main()
