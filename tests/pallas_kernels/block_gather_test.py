"""Tests for pallas_kernels.block_gather (the offload engine's block copy)."""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

bg = importlib.import_module("pallas_kernels.block_gather")


def _case(seed, *, rows_src, rows_dst, f, tile, dtype):
  rng = np.random.default_rng(seed)
  srcs = tuple(jnp.asarray(rng.normal(size=(rows_src,) + tile), dtype)
               for _ in range(2))
  dsts = tuple(jnp.asarray(rng.normal(size=(rows_dst,) + tile), dtype)
               for _ in range(2))
  src_rows = jnp.asarray(rng.integers(0, rows_src, f), jnp.int32)
  dst_rows = jnp.asarray(rng.permutation(rows_dst)[:f], jnp.int32)
  return srcs, dsts, src_rows, dst_rows


class GatherBlocksTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas Triton kernels need a GPU")

  def _gather(self, *args, **kwargs):
    return bg.gather_blocks(*args, interpret=self.INTERPRET, **kwargs)

  @parameterized.product(count=(0, 5, 12), programs=(1, 4, 64),
                         dtype=("float32", "bfloat16"))
  def test_matches_reference(self, count, programs, dtype):
    srcs, dsts, sr, dr = _case(count + programs, rows_src=40, rows_dst=16,
                               f=12, tile=(16, 32), dtype=dtype)
    want = bg.gather_blocks_reference(srcs, dsts, sr, dr, count)
    got = self._gather(srcs, tuple(d.copy() for d in dsts), sr, dr,
                       jnp.int32(count), programs=programs)
    for g, w, d in zip(got, want, dsts, strict=True):
      np.testing.assert_array_equal(g, w)  # a copy: bit-exact
      # Rows not listed below `count` keep their contents.
      untouched = np.setdiff1d(np.arange(16), np.asarray(dr[:count]))
      np.testing.assert_array_equal(np.asarray(g)[untouched],
                                    np.asarray(d)[untouched])

  def test_reads_pinned_host_inside_jit(self):
    srcs, dsts, sr, dr = _case(7, rows_src=64, rows_dst=8, f=8,
                               tile=(64, 128), dtype="bfloat16")
    host = tuple(jax.device_put(s, jax.memory.Space.Host) for s in srcs)
    self.assertEqual(host[0].sharding.memory_kind, "pinned_host")
    want = bg.gather_blocks_reference(srcs, dsts, sr, dr, 6)

    @jax.jit
    def step(h, d):  # the store is reshaped and read inside the step
      return self._gather(tuple(x.reshape(64, 64, 128) for x in h), d, sr, dr,
                          jnp.int32(6), programs=3)

    got = step(host, tuple(d.copy() for d in dsts))
    for g, w in zip(got, want, strict=True):
      self.assertEqual(g.sharding.memory_kind, "device")
      np.testing.assert_array_equal(g, w)

  def test_bad_input(self):
    srcs, dsts, sr, dr = _case(0, rows_src=4, rows_dst=4, f=2, tile=(8, 8),
                               dtype="float32")
    with self.assertRaisesRegex(ValueError, "same tile"):
      bg.gather_blocks(srcs, (jnp.zeros((4, 8, 4)),) * 2, sr, dr, 1)
    with self.assertRaisesRegex(ValueError, "int32"):
      bg.gather_blocks(srcs, dsts, sr.astype(jnp.int16), dr, 1)
    with self.assertRaisesRegex(ValueError, "programs must be >= 1"):
      bg.gather_blocks(srcs, dsts, sr, dr, 1, programs=0)


class GatherBlocksInterpretTest(GatherBlocksTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
