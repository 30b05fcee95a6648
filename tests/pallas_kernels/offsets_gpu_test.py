"""Kernels over arrays past 2^31 elements (the offload issue's 64-bit
offsets): a copy or read of the last tiles must land on the last tiles.

Triton computes `index * stride` in the type of the index. Pallas's Triton
lowering (jax 0.11.2, `_compute_offsets_from_indices`) switches a ref's
offsets to 64 bits when the whole array exceeds 2^32 bytes, which covers
bf16 and fp32 arrays of 2^31 elements and more (a 1-byte dtype between 2^31
and 2^32 elements would still wrap; none is used here). These cases hold it
to that on arrays just past 2^31 bf16 elements (about 4.3 GB each, the host
store of a 128k context at B = 64 with 2 KV heads), so they run on the GPU
only (`gpu`). Off the GPU they are skipped: the interpreter indexes with
XLA, which is not where the fault would be.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import absltest

import pallas_kernels

C, D = 64, 128
ROWS = (1 << 31) // (C * D) + 64  # tiles: just past 2^31 elements


def _store(rows, host):
  """[rows, C, D] bf16 zeros with tile r = r + 1 in the last 4 rows and in
  rows 0-3 (a wrapped index reads rows near 0 or garbage: never these)."""
  x = np.zeros((rows, C, D), ml_dtypes.bfloat16)
  marked = list(range(4)) + list(range(rows - 4, rows))
  for r in marked:
    x[r] = (r % 251) + 1
  kind = jax.memory.Space.Host if host else jax.memory.Space.Device
  return jax.device_put(x, kind), x


@pytest.mark.gpu
class LargeOffsetsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu":
      self.skipTest("compiled kernels on arrays of > 2^31 elements")

  def test_gather_reads_the_last_tiles_of_a_pinned_store(self):
    src, want = _store(ROWS, host=True)
    rows = jnp.asarray([ROWS - 1, ROWS - 3, 2, ROWS - 2], jnp.int32)
    dst = jnp.zeros((4, C, D), jnp.bfloat16)
    (got,) = pallas_kernels.gather_blocks(
        (src,), (dst,), rows, jnp.arange(4, dtype=jnp.int32), 4)
    np.testing.assert_array_equal(np.asarray(got), want[np.asarray(rows)])

  def test_decode_reads_the_last_block_through_the_table(self):
    # One sequence, one KV head: the cache [1, 1, ROWS * C, D].
    cache, want = _store(ROWS, host=False)
    k = v = cache.reshape(1, 1, ROWS * C, D)
    q = jax.random.normal(jax.random.key(0), (1, 16, D), jnp.bfloat16)
    table = jnp.asarray([[[ROWS - 1, 1]]], jnp.int32)
    lens = jnp.full((1, 1, 2), C, jnp.int32)
    got = pallas_kernels.sparse_decode(q, k, v, None, lens, C,
                                       block_idx_BKP=table)
    small = jnp.asarray(want[[ROWS - 1, 1]]).reshape(1, 1, 2 * C, D)
    ref = pallas_kernels.sparse_decode_reference(q, small, small, None, lens,
                                                 C)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(ref, np.float32), atol=2e-2)


if __name__ == "__main__":
  absltest.main()
