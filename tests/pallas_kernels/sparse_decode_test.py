"""Tests for pallas_kernels.sparse_decode (NOSA_SPEC.md §4.1, §4.3, §4.6)."""

import functools
import importlib
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from tests import tolerances

# The package re-exports the function `sparse_decode`, which shadows the
# submodule attribute; take the module itself.
sd = importlib.import_module("pallas_kernels.sparse_decode")

_K = 2  # KV heads in the grid cases.


def _inputs(seed, *, b, k, g, p, c, d, dtype, bias=True):
  """Random decode inputs; every (b, k) ends in a partial tail slot."""
  rng = np.random.default_rng(seed)
  s = p * c
  q = rng.normal(size=(b, k * g, d))
  kk, v = rng.normal(size=(2, b, k, s, d))
  # Empty, full and partial slots; the last slot is the partial tail block.
  partial = rng.integers(1, c, size=(b, k, p))
  kind = rng.choice(3, size=(b, k, p), p=(0.25, 0.35, 0.4))
  slot_len = np.choose(kind, [np.zeros_like(partial), np.full_like(partial, c),
                              partial])
  slot_len[..., -1] = partial[..., -1]
  cast = lambda x: jnp.asarray(x, dtype)
  bias_BKS = (jnp.asarray(rng.normal(size=(b, k, s)), jnp.float32)
              if bias else None)
  return (cast(q), cast(kk), cast(v), bias_BKS,
          jnp.asarray(slot_len, jnp.int32))


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _grid():
  for g in (1, 4, 16):
    for p in (1, 3, 8):
      for dtype in ("float32", "bfloat16"):
        yield dict(testcase_name=f"g{g}_p{p}_{dtype}", g=g, p=p, dtype=dtype)


class SparseDecodeTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas Triton kernels need a GPU")

  def _decode(self, *args, **kwargs):
    return sd.sparse_decode(*args, interpret=self.INTERPRET, **kwargs)

  def _check(self, args, block_size, **kwargs):
    """Kernel vs reference on `args`; returns the kernel output."""
    out = self._decode(*args, block_size, **kwargs)
    ref = sd.sparse_decode_reference(*args, block_size)
    self.assertEqual(out.shape, ref.shape)
    self.assertEqual(out.dtype, args[0].dtype)
    np.testing.assert_allclose(_f32(out), _f32(ref),
                               **tolerances.tol(args[0].dtype))
    return out

  @parameterized.named_parameters(_grid())
  def test_matches_reference(self, g, p, dtype):
    args = _inputs(g * 10 + p, b=2, k=_K, g=g, p=p, c=16, d=32, dtype=dtype)
    self._check(args, 16)

  @parameterized.parameters(
      dict(g=1, p=3, dtype="float32"),
      dict(g=4, p=8, dtype="bfloat16"),
      dict(g=16, p=1, dtype="float32"),
  )
  def test_no_bias(self, g, p, dtype):
    args = _inputs(7, b=2, k=_K, g=g, p=p, c=16, d=32, dtype=dtype,
                   bias=False)
    self._check(args, 16)

  def test_empty_row_is_zero(self):
    q, k, v, bias, slot_len = _inputs(1, b=2, k=_K, g=4, p=3, c=16, d=32,
                                      dtype="float32")
    slot_len = slot_len.at[1, 0].set(0)  # sequence 1, KV head 0: nothing
    out = self._check((q, k, v, bias, slot_len), 16)
    np.testing.assert_array_equal(_f32(out[1, :4]), 0.0)
    self.assertTrue(np.isfinite(_f32(out)).all())

  @parameterized.parameters("float32", "bfloat16")
  def test_num_splits_agree(self, dtype):
    # B * K = 2 so the default splits every slot into its own program.
    args = _inputs(2, b=1, k=_K, g=4, p=8, c=16, d=32, dtype=dtype)
    self.assertEqual(sd.num_decode_splits(1, _K, 8), (8, 1))
    outs = [self._check(args, 16, block_sizes=sd.DecodeBlockSizes(num_splits=n))
            for n in (1, 3, None)]
    for out in outs[1:]:
      np.testing.assert_allclose(_f32(out), _f32(outs[0]),
                                 **tolerances.tol(dtype))

  def test_invalid_positions_ignored(self):
    q, k, v, bias, slot_len = _inputs(3, b=2, k=_K, g=4, p=3, c=16, d=32,
                                      dtype="float32")
    token_C = jnp.arange(16)
    valid_BKS = (token_C[None, None, None, :] < slot_len[..., None]).reshape(
        bias.shape)
    nan = lambda x, vd: jnp.where(vd, x, jnp.nan)
    dirty = (q, nan(k, valid_BKS[..., None]), nan(v, valid_BKS[..., None]),
             nan(bias, valid_BKS), slot_len)
    out = self._check(dirty, 16)
    clean = self._decode(q, k, v, bias, slot_len, 16)
    np.testing.assert_array_equal(_f32(out), _f32(clean))

  @parameterized.parameters(("float32", True), ("bfloat16", False))
  def test_block_table_reads_cache_in_place(self, dtype, bias):
    # A cache of N = 7 blocks; slots read blocks through the table (with a
    # repeat and an empty slot whose table entry is out of range garbage).
    q, k, v, bias_BKS, slot_len = _inputs(5, b=2, k=_K, g=4, p=7, c=16, d=32,
                                          dtype=dtype, bias=bias)
    table = jnp.asarray([[[6, 0, 3, 3], [1, 2, 5, 999]],
                         [[4, 4, 0, 6], [2, 0, 1, 3]]], jnp.int32)
    lens = jnp.asarray([[[16, 9, 16, 3], [16, 16, 4, 0]],
                        [[16, 2, 16, 11], [5, 16, 16, 16]]], jnp.int32)
    out = self._decode(q, k, v, bias_BKS, lens, 16, block_idx_BKP=table)
    ref = sd.sparse_decode_reference(q, k, v, bias_BKS, lens, 16,
                                     block_idx_BKP=table)
    # The same as slot-major attention over an explicit gathered copy.
    gather = lambda x: None if x is None else sd.gather_blocks_by_index(
        x, table, 16)
    slots = sd.sparse_decode_reference(q, gather(k), gather(v),
                                       gather(bias_BKS), lens, 16)
    tol = tolerances.tol(dtype)
    np.testing.assert_allclose(_f32(out), _f32(ref), **tol)
    np.testing.assert_allclose(_f32(ref), _f32(slots), **tol)
    with self.assertRaisesRegex(ValueError, "block_idx_BKP must be int32"):
      self._decode(q, k, v, bias_BKS, lens, 16,
                   block_idx_BKP=table.astype(jnp.int16))

  def _fetch_inputs(self, seed, dtype, bias=True, n=6):
    """Slots [B, K, P, C, D], a host store of n blocks, and a fetch list.

    Fetched slots hold NaN (the kernel must neither read nor keep it); one
    fetched slot is partial, to pin down that only rows < slot_len copy.
    """
    b, p, c, d = 2, 4, 16, 32
    q, k, v, bias_BKS, slot_len = _inputs(seed, b=b, k=_K, g=4, p=p, c=c,
                                          d=d, dtype=dtype, bias=bias)
    slot = lambda x: x.reshape(b, _K, p, c, d)
    rng = np.random.default_rng(seed + 100)
    k_host, v_host = (jnp.asarray(rng.normal(size=(b, _K, n, c, d)), dtype)
                      for _ in range(2))
    fetch = jnp.asarray([[[3, -1, 0, -1], [-1, 5, -1, -1]],
                         [[-1, -1, -1, 2], [1, 4, -1, -1]]], jnp.int32)
    slot_len = jnp.where(fetch >= 0, c, slot_len).at[1, 0, 3].set(7)
    nan = lambda x: jnp.where((fetch >= 0)[..., None, None], jnp.nan, x)
    return (q, nan(slot(k)), nan(slot(v)), bias_BKS, slot_len, k_host,
            v_host, fetch)

  @parameterized.parameters(("float32", True), ("bfloat16", True),
                            ("bfloat16", False))
  def test_fetch_matches_reference(self, dtype, bias):
    args = self._fetch_inputs(11, dtype, bias)
    ref_out, ref_k, ref_v = sd.sparse_decode_fetch_reference(*args)
    host = jax.memory.Space.Host  # the engine's store is pinned_host
    args = args[:5] + tuple(jax.device_put(x, host) for x in args[5:7]) + (
        args[7],)
    self.assertEqual(args[5].sharding.memory_kind, "pinned_host")
    out, k_slot, v_slot = sd.sparse_decode_fetch(
        *args, interpret=self.INTERPRET)
    np.testing.assert_allclose(_f32(out), _f32(ref_out),
                               **tolerances.tol(dtype))
    self.assertTrue(np.isfinite(_f32(out)).all())
    # Copies are exact: rows [0, slot_len) of fetched slots now hold the
    # store's block, every other row is untouched (NaN stays NaN).
    np.testing.assert_array_equal(_f32(k_slot), _f32(ref_k))
    np.testing.assert_array_equal(_f32(v_slot), _f32(ref_v))
    self.assertEqual(k_slot.sharding.memory_kind, "device")

  def test_fetch_without_misses_is_sparse_decode(self):
    q, k, v, bias, slot_len, k_host, v_host, fetch = self._fetch_inputs(
        12, "float32")
    k, v = (jnp.nan_to_num(x) for x in (k, v))
    flat = lambda x: x.reshape(2, _K, -1, 32)
    want = self._decode(q, flat(k), flat(v), bias, slot_len, 16)
    k_before = _f32(k)  # k and v are donated
    out, k2, _ = sd.sparse_decode_fetch(
        q, k, v, bias, slot_len, k_host, v_host, jnp.full_like(fetch, -1),
        interpret=self.INTERPRET)
    np.testing.assert_allclose(_f32(out), _f32(want),
                               **tolerances.tol("float32"))
    np.testing.assert_array_equal(_f32(k2), k_before)

  def test_fetch_rejects_bad_arguments(self):
    args = list(self._fetch_inputs(13, "float32"))
    with self.assertRaisesRegex(ValueError, "fetch_BKP must be int32"):
      sd.sparse_decode_fetch(*args[:7], args[7].astype(jnp.int16))
    with self.assertRaisesRegex(ValueError, "k_host_BKNCD must be"):
      sd.sparse_decode_fetch(*args[:5], args[5][..., :8, :], *args[6:])

  def test_large_bf16(self):
    """The paper's decode shape: C = 64, P = 64 slots, D = 128 (GPU only)."""
    if self.INTERPRET:
      self.skipTest("too slow for the interpreter")
    args = _inputs(4, b=16, k=2, g=16, p=64, c=64, d=128, dtype="bfloat16")
    self._check(args, 64)


class SparseDecodeInterpretTest(SparseDecodeTest):
  INTERPRET = True


class SparseDecodeReferenceTest(parameterized.TestCase):
  """The reference itself, the lowering and the wrapper's checks (on CPU)."""

  def test_reference_matches_numpy_loop(self):
    b, k, g, p, c, d = 1, 2, 2, 2, 16, 16
    q, kk, v, bias, slot_len = map(np.asarray, _inputs(
        5, b=b, k=k, g=g, p=p, c=c, d=d, dtype="float32"))
    out = np.asarray(sd.sparse_decode_reference(q, kk, v, bias, slot_len, c))
    for kh in range(k):
      keys = [j * c + t for j in range(p) for t in range(slot_len[0, kh, j])]
      for gi in range(g):
        # Full-strength bias: q.k / sqrt(D) + b (not NOSI's b / sqrt(D)).
        logits = np.array([q[0, kh * g + gi] @ kk[0, kh, s] / math.sqrt(d)
                           + bias[0, kh, s] for s in keys])
        w = np.exp(logits - logits.max())
        want = (w / w.sum()) @ v[0, kh, keys]
        np.testing.assert_allclose(out[0, kh * g + gi], want,
                                   **tolerances.tol(np.float32))

  @parameterized.parameters(
      dict(g=1, c=16, d=16, dtype="float32", bias=False),
      dict(g=16, c=64, d=128, dtype="bfloat16", bias=True),
  )
  def test_lowers_to_triton(self, g, c, d, dtype, bias):
    """Triton lowering for an abstract H100 (compiles nothing, needs no GPU)."""
    args = _inputs(0, b=2, k=_K, g=g, p=3, c=c, d=d, dtype=dtype, bias=bias)
    dev = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    fn = jax.jit(functools.partial(sd.sparse_decode, block_size=c))
    with jax.sharding.use_abstract_mesh(mesh):
      text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("triton", text)

  @parameterized.named_parameters(
      ("q_rank", dict(q=(2, 8)), "q_BHD"),
      ("v_shape", dict(v=(2, 2, 32, 32)), "v_BKSD"),
      ("heads", dict(q=(2, 6, 32), k=(2, 4, 48, 32), v=(2, 4, 48, 32),
                     bias=(2, 4, 48), slot_len=(2, 4, 3)), "q_BHD heads"),
      ("slot_axis", dict(k=(2, 2, 40, 32), v=(2, 2, 40, 32),
                         bias=(2, 2, 40)), "k_BKSD slot axis"),
      ("bias_shape", dict(bias=(2, 2, 32)), "bias_BKS"),
      ("slot_len_shape", dict(slot_len=(2, 3)), "slot_len_BKP"),
      ("block_size", dict(block=12), "block_size"),
  )
  def test_bad_shapes_raise(self, shapes, msg):
    shape = dict(q=(2, 8, 32), k=(2, 2, 48, 32), v=(2, 2, 48, 32),
                 bias=(2, 2, 48), slot_len=(2, 2, 3), block=16)
    shape.update(shapes)
    args = (jnp.zeros(shape["q"]), jnp.zeros(shape["k"]),
            jnp.zeros(shape["v"]), jnp.zeros(shape["bias"]),
            jnp.zeros(shape["slot_len"], jnp.int32))
    with self.assertRaisesRegex(ValueError, msg):
      sd.sparse_decode(*args, shape["block"], interpret=True)

  def test_num_decode_splits(self):
    # 264 programs wanted: B * K = 32 -> 9 splits of 64 slots -> 8 of 8.
    self.assertEqual(sd.num_decode_splits(16, 2, 64), (8, 8))
    self.assertEqual(sd.num_decode_splits(512, 2, 64), (1, 64))
    self.assertEqual(sd.num_decode_splits(1, 1, 3), (3, 1))
    self.assertEqual(sd.num_decode_splits(
        1, 1, 8, sd.DecodeBlockSizes(num_splits=5)), (4, 2))

  def test_decode_bytes_read(self):
    q, k, v, bias, _ = _inputs(0, b=1, k=2, g=4, p=2, c=16, d=32,
                               dtype="bfloat16")
    slot_len = jnp.array([[[16, 3], [0, 5]]], jnp.int32)  # 24 valid tokens
    want = 24 * (32 * 4 + 4) + 2 * 8 * 32 * 2 + 4 * 4
    got = sd.decode_bytes_read(q, k, v, bias, slot_len, 16)
    self.assertEqual(float(got), want)


if __name__ == "__main__":
  absltest.main()
