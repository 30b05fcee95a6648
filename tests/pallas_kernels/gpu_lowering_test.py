"""Every Pallas kernel lowers to Triton IR for CUDA, checked on the CPU.

The interpret-mode twins run the kernels' semantics on the CPU but never
the Triton lowering, so a kernel can pass CI and still fail to lower on
the GPU (session 5 found one: a `fori_loop` body returning a literal
makes `scf.yield` reject a non-Value). Here each kernel is lowered with
`lowering_platforms=("cuda",)` against an sm_90 target. This lowers the
Pallas jaxpr to Triton IR; it does not run Triton's own compiler (ptxas),
so it catches lowering errors, not register or shared-memory limits.

The target is given by replacing the GPU-info query of JAX's private
Pallas Triton registration (`gpu_info_lib.get_gpu_info`), which fails
without a GPU. If a JAX upgrade moves it, the tests skip with that reason.
"""

import importlib
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

import pallas_kernels

_bs = importlib.import_module("pallas_kernels.block_scores")

try:
  from jax._src.pallas.triton import pallas_call_registration as _reg
  _HAVE_HOOK = hasattr(_reg, "gpu_info_lib") and hasattr(
      _reg.gpu_info_lib, "get_gpu_info")
except ImportError:  # pragma: no cover - depends on the JAX version
  _reg, _HAVE_HOOK = None, False

_C = 64  # block size


def _lower_for_cuda(fn, *args):
  """StableHLO text of `fn(*args)` lowered for CUDA (raises on failure)."""
  fake = types.SimpleNamespace(compute_capability="9.0")
  with mock.patch.object(_reg.gpu_info_lib, "get_gpu_info", lambda: fake):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


def _rand(key, shape, dtype):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(
      dtype)


class GpuLoweringTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not _HAVE_HOOK:
      self.skipTest("JAX's Pallas Triton registration has no gpu_info_lib "
                    "hook in this version")

  def assertLowersToTriton(self, fn, *args):
    text = _lower_for_cuda(fn, *args)
    # The Pallas calls become Triton custom calls in the module.
    self.assertIn("__gpu$xla.gpu.triton", text)

  @parameterized.product(dtype=("bfloat16", "float32"), bias=(True, False),
                         fused_dq=(False, True), transpose_bwd=(True, False))
  def test_block_sparse_attention_fwd_bwd(self, dtype, bias, fused_dq,
                                          transpose_bwd):
    b, t, h, k, d = 1, 200, 8, 2, 64
    n = -(-t // _C)
    q = _rand(0, (b, t, h, d), dtype)
    kk = _rand(1, (b, t, k, d), dtype)
    v = _rand(2, (b, t, k, d), dtype)
    bias_ = _rand(3, (b, t, k), jnp.float32) if bias else None
    mask = jnp.ones((b, k, t, n), bool)

    def loss(q, kk, v, bias_):
      out = pallas_kernels.block_sparse_attention(
          q, kk, v, bias_, mask, _C, fused_dq=fused_dq,
          transpose_bwd=transpose_bwd)
      return jnp.sum(out.astype(jnp.float32))

    argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
    self.assertLowersToTriton(jax.grad(loss, argnums=argnums), q, kk, v,
                              bias_)

  @parameterized.product(precision=("highest", "tf32", "bf16"), g=(1, 4))
  def test_block_scores(self, precision, g):
    t, k, d = 512, 2, 64
    q = _rand(0, (1, t, k * g, d), jnp.bfloat16)
    w = (t - 32) // 16 + 1
    kbar = _rand(1, (1, w, k, d), jnp.float32)
    pos = jnp.arange(t)
    self.assertLowersToTriton(
        lambda q, kbar, pos: _bs.block_scores(
            q, kbar, pos, t // _C, _C, 32, 16, precision=precision),
        q, kbar, pos)

  @parameterized.product(dtype=("bfloat16", "float32"), bias=(True, False),
                         table=(False, True))
  def test_sparse_decode(self, dtype, bias, table):
    b, k, g, d, p = 2, 2, 4, 64, 4
    n = 6 if table else p
    q = _rand(0, (b, k * g, d), dtype)
    kc = _rand(1, (b, k, n * _C, d), dtype)
    vc = _rand(2, (b, k, n * _C, d), dtype)
    bias_ = _rand(3, (b, k, n * _C), jnp.float32) if bias else None
    slot_len = jnp.full((b, k, p), _C, jnp.int32)
    idx = (jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, k, p))
           if table else None)
    self.assertLowersToTriton(
        lambda q, kc, vc, bias_, sl, idx: pallas_kernels.sparse_decode(
            q, kc, vc, bias_, sl, _C, block_idx_BKP=idx),
        q, kc, vc, bias_, slot_len, idx)

  def test_sparse_decode_fetch(self):
    b, k, g, d, p, n = 2, 2, 4, 64, 4, 8
    dtype = jnp.bfloat16
    q = _rand(0, (b, k * g, d), dtype)
    ks = _rand(1, (b, k, p, _C, d), dtype)
    vs = _rand(2, (b, k, p, _C, d), dtype)
    bias_ = _rand(3, (b, k, p * _C), jnp.float32)
    slot_len = jnp.full((b, k, p), _C, jnp.int32)
    kh = _rand(4, (b, k, n, _C, d), dtype)
    vh = _rand(5, (b, k, n, _C, d), dtype)
    fetch = jnp.full((b, k, p), -1, jnp.int32).at[:, :, 0].set(5)
    self.assertLowersToTriton(pallas_kernels.sparse_decode_fetch, q, ks, vs,
                              bias_, slot_len, kh, vh, fetch)

  def test_gather_blocks(self):
    src = _rand(0, (16, _C, 64), jnp.bfloat16)
    dst = jnp.zeros((8, _C, 64), jnp.bfloat16)
    rows = jnp.arange(8, dtype=jnp.int32)
    self.assertLowersToTriton(
        lambda s, d_, r: pallas_kernels.gather_blocks(
            (s,), (d_,), r, r, jnp.int32(5)),
        src, dst, rows)


if __name__ == "__main__":
  absltest.main()
