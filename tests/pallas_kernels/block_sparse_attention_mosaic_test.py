"""Tests for pallas_kernels.block_sparse_attention_mosaic: kernel vs reference.

`BlockSparseAttentionMosaicInterpretTest` runs the kernel in Mosaic GPU's
interpreter on the CPU (`plgpu.InterpretGPUParams()`), one warpgroup per
program (the wrapper's interpret default; see `warp_specialized` there);
`test_warp_specialized_interpret` runs the producer/consumer variant in a
subprocess with more XLA CPU threads. `BlockSparseAttentionMosaicTest`
(marked `gpu`) runs the same grid compiled. `MosaicLoweringTest` lowers the
kernel for CUDA (sm_90a) without a GPU. On the GPU machine:

  NOSA_TEST_GPU=1 python -m pytest -q -m gpu \
      tests/pallas_kernels/block_sparse_attention_mosaic_test.py

Tolerances. Inputs are bf16 (or fp16) and the kernel, like the Triton one
and FlashAttention, rounds the softmax probabilities to the input dtype
before P V and the output once at the end; the fp32 reference rounds only
the output. Small cases use the per-dtype element-wise `tolerances.tol`
(the criterion the Triton kernel's bf16 cases meet: a bf16 ulp at |out| ~ 3
is 0.016, within 2e-2 + 2e-2 |out|); the large case, where a few outputs
are long sums near zero, the whole-array criterion
`tolerances.assert_close_to_reference` against the reference run in bf16.

Gradients (the backward kernels of `block_sparse_attention_mosaic_bwd.py`)
are compared with `jax.vjp` of the reference on a random cotangent: the same
element-wise `tol`, except where G = 16 query heads (and a long NOSA-like
case) sum many bf16-rounded probabilities into dk / dv, a few of which land
near zero with a rounding error that is not: there the whole-array
criterion, as in the Triton kernel's large cases.
"""

import functools
import importlib
import math
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels
from tests import tolerances
# Its input and mask helpers (a module, so its test classes are not
# collected here again).
from tests.pallas_kernels import block_sparse_attention_test as bsa_test

bsm = importlib.import_module("pallas_kernels.block_sparse_attention_mosaic")

_BF16 = ml_dtypes.bfloat16
_C = 64  # the kernel's only block size


def _inputs(seed, b, t, h, kh, d, dtype, with_bias):
  """q, k, v, bias (the Triton test's inputs, without the cotangent)."""
  return bsa_test._inputs(seed, b, t, h, kh, d, dtype, with_bias)[:4]


def _grad_inputs(seed, b, t, h, kh, d, dtype, with_bias):
  """q, k, v, bias and a cotangent of the output."""
  return bsa_test._inputs(seed, b, t, h, kh, d, dtype, with_bias)


def _mask(seed, b, kh, t, density):
  return bsa_test._mask(seed, b, kh, t, _C, density)


def _nosa_like_mask(seed, b, kh, t, sink, window, extra):
  return bsa_test._nosa_like_mask(seed, b, kh, t, _C, sink, window, extra)


def _f32(x):
  return np.asarray(x, np.float32)


def _lse_reference(q, k, bias, mask):
  """[B, T, H] fp32 natural log-sum-exp of each row's attended logits."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  q_BTKGD = _f32(q).reshape(b, t, kh, h // kh, d)
  logits = np.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, _f32(k)) / math.sqrt(d)
  if bias is not None:
    logits = logits + _f32(bias).transpose(0, 2, 1)[:, :, None, None, :]
  sel = np.take(np.asarray(mask), np.arange(t) // _C, axis=3)  # [B,K,T,S]
  sel = sel & np.tril(np.ones((t, t), bool))
  logits = np.where(sel[:, :, None], logits, -np.inf)
  lse = np.logaddexp.reduce(logits, axis=-1)  # [B, K, G, T]
  return lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def _out_and_lse_jnp(q, k, v, bias, mask):
  """The reference's out and [B, T, H] natural lse, differentiable (jnp)."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  out = pallas_kernels.block_sparse_attention_reference(q, k, v, bias, mask,
                                                        _C)
  f32 = lambda x: x.astype(jnp.float32)
  q_BTKGD = f32(q).reshape(b, t, kh, h // kh, d)
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, f32(k),
                      precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
  logits = logits + bias.transpose(0, 2, 1)[:, :, None, None, :]
  sel = jnp.take(mask, jnp.arange(t) // _C, axis=3)  # [B, K, T, S]
  sel = sel & jnp.tril(jnp.ones((t, t), bool))[None, None]
  logits = jnp.where(sel[:, :, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
  return out, lse.transpose(0, 3, 1, 2).reshape(b, t, h)


# name, B, T, K, G, D, mask density, bias, dtype. T is never a multiple of
# C = 64 or of a program's tokens (ragged); G = 1 packs each warpgroup's 64
# tokens into two selection words; G = 3 is padded to 4 heads; density 1.0
# is a budget >= the block count.
_GRID = (
    ("g4_sparse_bias", 1, 100, 2, 4, 64, 0.5, True, _BF16),
    ("g1_two_words_nobias", 1, 150, 1, 1, 64, 0.4, False, _BF16),
    ("g8_dense_bias", 2, 90, 1, 8, 64, 1.0, True, _BF16),
    ("g16_sparse_bias", 1, 130, 1, 16, 64, 0.4, True, _BF16),
    ("g2_d128_fp16", 1, 77, 2, 2, 128, 0.6, True, np.float16),
    ("g3_padded_heads", 1, 70, 2, 3, 64, 0.5, True, _BF16),
)


class _MosaicCases(parameterized.TestCase):
  """The kernel-vs-reference cases; subclasses say how the kernel runs."""
  __test__ = False  # collected through the subclasses only
  INTERPRET = False

  def _kernel(self, *args, **options):
    return bsm.block_sparse_attention_mosaic(*args, interpret=self.INTERPRET,
                                             **options)

  def _compare(self, q, k, v, bias, mask, **options):
    """Kernel vs reference (out, and the lse where a row attends a key)."""
    out, lse = self._kernel(q, k, v, bias, mask, _C, return_lse=True,
                            **options)
    want = pallas_kernels.block_sparse_attention_reference(q, k, v, bias,
                                                           mask, _C)
    self.assertEqual(out.dtype, q.dtype)
    self.assertTrue(np.all(np.isfinite(_f32(out))))
    np.testing.assert_allclose(_f32(out), _f32(want), err_msg="out",
                               **tolerances.tol(q.dtype))
    want_lse = _lse_reference(q, k, bias, mask)
    rows = np.isfinite(want_lse)
    # The logits come from q's dtype; fp32 sums and bf16 inputs agree to
    # fp32 rounding (lse is not rounded to q's dtype).
    np.testing.assert_allclose(np.asarray(lse)[rows], want_lse[rows],
                               err_msg="lse", **tolerances.tol(np.float32))
    return out

  def _compare_grads(self, q, k, v, bias, mask, cot, lowp_reference=False,
                     **options):
    """Kernel vs reference: out and the grads w.r.t. q, k, v (and bias).

    Element-wise `tol` by default; with `lowp_reference`, the whole-array
    `tolerances.assert_close_to_reference` against the reference run in
    q's dtype as well as in fp32 (module docstring).
    """
    kernel_fn = functools.partial(self._kernel, mask_BKTN=mask, block_size=_C,
                                  **options)
    ref_fn = functools.partial(
        pallas_kernels.block_sparse_attention_reference, mask_BKTN=mask,
        block_size=_C)
    # Differentiate w.r.t. the bias only when there is one.
    args = (q, k, v) if bias is None else (q, k, v, bias)
    kernel = lambda q, k, v, *b: kernel_fn(q, k, v, b[0] if b else None)
    ref = lambda q, k, v, *b, **kw: ref_fn(q, k, v, b[0] if b else None,
                                           **kw)
    got = bsa_test._out_and_grads(kernel, args, cot)
    want = bsa_test._out_and_grads(ref, args, cot)
    if lowp_reference:
      lowp = bsa_test._out_and_grads(
          functools.partial(ref, compute_dtype=q.dtype), args, cot)
    names = ("out", "dq", "dk", "dv", "dbias")[:len(args) + 1]
    flat = lambda pair: (pair[0], *pair[1])
    for i, name in enumerate(names):
      g, w = flat(got)[i], flat(want)[i]
      self.assertEqual(g.dtype, w.dtype, name)
      self.assertTrue(np.all(np.isfinite(_f32(g))), name)
      if lowp_reference:
        tolerances.assert_close_to_reference(g, w, flat(lowp)[i],
                                             err_msg=name)
      else:
        # The fp32 bias gradient too is computed from q's dtype.
        np.testing.assert_allclose(_f32(g), _f32(w), err_msg=name,
                                   **tolerances.tol(q.dtype))
    return got

  def _grad_case(self, b, t, kh, g, d, density, with_bias, dtype):
    q, k, v, bias, cot = _grad_inputs(t + g, b, t, kh * g, kh, d, dtype,
                                      with_bias)
    self._compare_grads(q, k, v, bias, _mask(t + g, b, kh, t, density), cot,
                        lowp_reference=g >= 16)

  def test_grads_cheap(self):
    """The grid's first case, with gradients: the backward's case of the
    default CPU suite."""
    self._grad_case(*_GRID[0][1:])

  @parameterized.named_parameters(*_GRID[1:])
  @pytest.mark.slow  # inside: the generated cases copy the mark
  def test_grads(self, *case):
    self._grad_case(*case)

  @pytest.mark.slow
  def test_full_budget_grads_are_dense_causal_attention(self):
    # Every block selected: the gradients are dense causal attention's.
    b, t, kh, g, d = 1, 100, 2, 4, 64
    q, k, v, _, cot = _grad_inputs(3, b, t, kh * g, kh, d, _BF16, False)
    mask = _mask(3, b, kh, t, 1.0)
    kernel = lambda q, k, v: self._kernel(q, k, v, None, mask, _C)
    dense = lambda q, k, v: jax.nn.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32),
        v.astype(jnp.float32), is_causal=True)
    got = bsa_test._out_and_grads(kernel, (q, k, v), cot)
    want = bsa_test._out_and_grads(dense, (q, k, v), cot.astype(jnp.float32))
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]),
                          (want[0], *want[1]), strict=True):
      np.testing.assert_allclose(_f32(g), _f32(w), err_msg=name,
                                 **tolerances.tol(_BF16))

  @parameterized.parameters(True, False)
  @pytest.mark.slow  # inside: the generated cases copy the mark
  def test_grads_nosa_like_empty_rows(self, full_fast_path):
    # test_nosa_like_full_fast_path's case with gradients: full and partial
    # (tile, block) pairs, tokens that select nothing on the second KV head
    # (zero dq rows, no NaN), dk/dv programs of the sink block walking every
    # tile, and rings reused in both kernels.
    b, t, kh, g, d = 1, 400, 2, 8, 64
    q, k, v, bias, cot = _grad_inputs(5, b, t, kh * g, kh, d, _BF16, True)
    mask = np.array(_nosa_like_mask(5, b, kh, t, sink=1, window=3, extra=1))
    empty = np.arange(t) % 3 == 0
    mask[:, 1, empty] = False
    _, (dq, *_) = self._compare_grads(
        q, k, v, bias, jnp.asarray(mask), cot, lowp_reference=True,
        max_concurrent_steps=3, full_fast_path=full_fast_path)
    np.testing.assert_array_equal(_f32(dq)[:, empty, g:], 0.0)

  @pytest.mark.slow
  def test_lse_grad(self):
    # The returned lse is differentiable too (its cotangent folds into the
    # backward's delta): d(sum(out * cot) + sum(lse * w)) against jnp.
    b, t, kh, g, d = 1, 100, 1, 4, 64
    q, k, v, bias, cot = _grad_inputs(9, b, t, kh * g, kh, d, _BF16, True)
    mask = _mask(9, b, kh, t, 0.5)
    w = jnp.asarray(np.random.default_rng(9).normal(size=(b, t, kh * g)),
                    jnp.float32)

    def loss(fn):
      def f(q, k, v, bias):
        out, lse = fn(q, k, v, bias)
        return (jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))
                + jnp.sum(lse * w))
      return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    kernel = lambda *a: self._kernel(*a, mask, _C, return_lse=True)
    got = loss(kernel)(q, k, v, bias)
    want = loss(lambda *a: _out_and_lse_jnp(*a, mask))(q, k, v, bias)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want,
                          strict=True):
      np.testing.assert_allclose(_f32(g), _f32(w), err_msg=name,
                                 **tolerances.tol(_BF16))

  def _case(self, b, t, kh, g, d, density, with_bias, dtype):
    q, k, v, bias = _inputs(t + g, b, t, kh * g, kh, d, dtype, with_bias)
    self._compare(q, k, v, bias, _mask(t + g, b, kh, t, density))

  def test_forward_cheap(self):
    """The grid's first case: the kernel case of the default CPU suite."""
    self._case(*_GRID[0][1:])

  @parameterized.named_parameters(*_GRID[1:])
  @pytest.mark.slow  # inside: the generated cases copy the mark
  def test_forward(self, *case):
    self._case(*case)

  @pytest.mark.slow
  def test_full_budget_is_dense_causal_attention(self):
    # Every block selected: the kernel is dense causal attention.
    b, t, kh, g, d = 1, 100, 2, 4, 64
    q, k, v, _ = _inputs(3, b, t, kh * g, kh, d, _BF16, False)
    out = self._kernel(q, k, v, None, _mask(3, b, kh, t, 1.0), _C)
    want = jax.nn.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32),
        v.astype(jnp.float32), is_causal=True)
    np.testing.assert_allclose(_f32(out), _f32(want),
                               **tolerances.tol(_BF16))

  @pytest.mark.slow
  def test_empty_rows_give_zero(self):
    # Tokens that select no block attend nothing: output 0 (a NOSA
    # selection always holds the own block; the kernel does not rely on it).
    b, t, kh, g, d = 1, 100, 1, 4, 64
    q, k, v, bias = _inputs(7, b, t, kh * g, kh, d, _BF16, True)
    mask = np.array(_mask(7, b, kh, t, 0.5))
    empty = np.arange(t) % 3 == 0
    mask[:, :, empty] = False
    out = self._compare(q, k, v, bias, jnp.asarray(mask))
    np.testing.assert_array_equal(_f32(out)[:, empty], 0.0)

  @parameterized.parameters(True, False)
  @pytest.mark.slow  # inside: the generated cases copy the mark
  def test_nosa_like_full_fast_path(self, full_fast_path):
    # Sink + window + random blocks with 8 tokens per warpgroup: most
    # (warpgroup, block) pairs are full and skip the mask; the own blocks
    # (causal inside) and blocks only some tokens picked do not. A wrong
    # full-pair test (any token instead of all, or the causal bound off by
    # one) attends keys it must not. Every third token of the second KV
    # head selects nothing. Lists are longer than the 3-slot ring, so every
    # slot is reused.
    b, t, kh, g, d = 1, 400, 2, 8, 64
    q, k, v, bias = _inputs(5, b, t, kh * g, kh, d, _BF16, True)
    mask = np.array(_nosa_like_mask(5, b, kh, t, sink=1, window=3, extra=1))
    mask[:, 1, np.arange(t) % 3 == 0] = False
    self._compare(q, k, v, bias, jnp.asarray(mask), max_concurrent_steps=3,
                  full_fast_path=full_fast_path)

  def test_shape_errors(self):
    q, k, v, bias = _inputs(0, 1, 70, 4, 2, 64, _BF16, True)
    mask = _mask(0, 1, 2, 70, 1.0)
    fn = lambda *a, **kw: self._kernel(*a, **kw)
    cases = (
        ("float32: .* bfloat16 or float16", (q.astype(jnp.float32),
                                            k.astype(jnp.float32),
                                            v.astype(jnp.float32), bias,
                                            mask, _C), {}),
        ("D=32 must be a multiple of 64", (q[..., :32], k[..., :32],
                                           v[..., :32], bias, mask, _C), {}),
        ("block_size=32", (q, k, v, bias, jnp.ones((1, 2, 70, 3), bool),
                           32), {}),
        ("compute_wgs=2 needs warp_specialized",
         (q, k, v, bias, mask, _C), {"compute_wgs": 2,
                                     "warp_specialized": False}),
        ("compute_wgs=3", (q, k, v, bias, mask, _C), {"compute_wgs": 3}),
        ("k_BTKD", (q, k[:, :10], v, bias, mask, _C), {}),
    )
    for pattern, args, kw in cases:
      with self.assertRaisesRegex(ValueError, pattern) as cm:
        fn(*args, **kw)
      self.assertNotIn("\n", str(cm.exception))
    g128 = jnp.zeros((1, 8, 128, 64), _BF16)
    kv1 = jnp.zeros((1, 8, 1, 64), _BF16)
    with self.assertRaisesRegex(ValueError, "G=128 .* at most 64"):
      fn(g128, kv1, kv1, None, jnp.ones((1, 1, 8, 1), bool), _C)

  def test_gradient_is_refused_for_d256(self):
    # The forward takes D = 256, the backward D <= 128 only.
    q, k, v, bias = _inputs(0, 1, 70, 4, 2, 256, _BF16, True)
    mask = _mask(0, 1, 2, 70, 1.0)
    loss = lambda q: jnp.sum(self._kernel(q, k, v, bias, mask, _C).astype(
        jnp.float32))
    # Traced only: the refusal comes while building the backward.
    with self.assertRaisesRegex(NotImplementedError,
                                "D=256: the Mosaic backward takes D <= 128"
                                ) as cm:
      jax.jit(jax.grad(loss)).trace(q)
    self.assertNotIn("\n", str(cm.exception))


class BlockSparseAttentionMosaicInterpretTest(_MosaicCases):
  __test__ = True
  INTERPRET = True

  @pytest.mark.slow
  def test_warp_specialized_interpret(self):
    """The producer/consumer variant, interpreted in a subprocess.

    Interpreted, every warpgroup is a CPU thread running an XLA program,
    and a thread blocked in a barrier wait holds one of XLA's CPU threads
    (as many as cores by default): 3-4 warpgroups deadlock on 2 cores.
    NPROC raises XLA's thread count; it is read when the CPU client starts,
    hence the subprocess.
    """
    env = dict(os.environ, NPROC="8", JAX_PLATFORMS="cpu")
    code = "\n".join((
        "from tests.pallas_kernels import block_sparse_attention_mosaic_test"
        " as m",
        "m.run_warp_specialized_cases()",
    ))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("ok 4 cases", proc.stdout)


def run_warp_specialized_cases():
  """The producer variant with 1 and 2 consumers, and slots reused; then
  gradients after a 2-consumer forward (the backward rebuilds its dq lists
  for one-warpgroup tiles)."""
  case = _MosaicCases()
  case.INTERPRET = True
  for i, (name, *args) in enumerate((_GRID[0], _GRID[1], _GRID[3])):
    b, t, kh, g, d, density, with_bias, dtype = args
    q, k, v, bias = _inputs(t + g, b, t, kh * g, kh, d, dtype, with_bias)
    mask = _mask(t + g, b, kh, t, density)
    case._compare(q, k, v, bias, mask, warp_specialized=True,
                  compute_wgs=1 + i % 2)
    print(name, "ok", flush=True)
  b, t, kh, g, d, density, with_bias, dtype = _GRID[0][1:]
  q, k, v, bias, cot = _grad_inputs(t + g, b, t, kh * g, kh, d, dtype,
                                    with_bias)
  case._compare_grads(q, k, v, bias, _mask(t + g, b, kh, t, density), cot,
                      warp_specialized=True, compute_wgs=2)
  print("grads ok", flush=True)
  print("ok 4 cases")


@pytest.mark.gpu
class BlockSparseAttentionMosaicTest(_MosaicCases):
  """Compiled on the GPU (sm_90a); skips elsewhere."""
  __test__ = True

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu":
      self.skipTest("the compiled Mosaic GPU kernel needs a Hopper GPU")

  @parameterized.product(compute_wgs=(1, 2), max_concurrent_steps=(2, 3))
  def test_variants(self, compute_wgs, max_concurrent_steps):
    for warp_specialized in (True, False)[:3 - compute_wgs]:
      q, k, v, bias = _inputs(1, 1, 500, 2 * 16, 2, 128, _BF16, True)
      mask = _nosa_like_mask(1, 1, 2, 500, sink=1, window=2, extra=2)
      self._compare(q, k, v, bias, mask, compute_wgs=compute_wgs,
                    warp_specialized=warp_specialized,
                    max_concurrent_steps=max_concurrent_steps)

  def test_large_nosa_like(self):
    b, t, kh, g, d = 1, 4096, 2, 16, 128
    q, k, v, bias = _inputs(3, b, t, kh * g, kh, d, _BF16, True)
    mask = _nosa_like_mask(3, b, kh, t, sink=1, window=4, extra=8)
    out = self._kernel(q, k, v, bias, mask, _C)
    ref = pallas_kernels.block_sparse_attention_reference
    tolerances.assert_close_to_reference(
        out, ref(q, k, v, bias, mask, _C),
        ref(q, k, v, bias, mask, _C, compute_dtype=jnp.bfloat16),
        err_msg="out")
    # The Triton kernel computes the same forward.
    triton = pallas_kernels.block_sparse_attention(q, k, v, bias, mask, _C)
    np.testing.assert_allclose(_f32(out), _f32(triton),
                               **tolerances.tol(_BF16))

  @parameterized.product(compute_wgs=(1, 2), max_concurrent_steps=(2, 3))
  def test_grad_variants(self, compute_wgs, max_concurrent_steps):
    # The forward's variants set the backward's lists (its dq lists are the
    # forward's with one consumer, rebuilt with two) and ring depth.
    q, k, v, bias, cot = _grad_inputs(1, 1, 500, 2 * 16, 2, 128, _BF16,
                                      True)
    mask = _nosa_like_mask(1, 1, 2, 500, sink=1, window=2, extra=2)
    self._compare_grads(q, k, v, bias, mask, cot, lowp_reference=True,
                        compute_wgs=compute_wgs,
                        max_concurrent_steps=max_concurrent_steps)

  def test_large_nosa_like_grads(self):
    b, t, kh, g, d = 1, 4096, 2, 16, 128
    q, k, v, bias, cot = _grad_inputs(3, b, t, kh * g, kh, d, _BF16, True)
    mask = _nosa_like_mask(3, b, kh, t, sink=1, window=4, extra=8)
    _, grads = self._compare_grads(q, k, v, bias, mask, cot,
                                   lowp_reference=True)
    # The Triton backward computes the same gradients.
    triton = lambda *a: pallas_kernels.block_sparse_attention(*a, mask, _C)
    _, want = bsa_test._out_and_grads(triton, (q, k, v, bias), cot)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want,
                          strict=True):
      tolerances.assert_close_to_reference(g, w, w, atol_floor=5e-2,
                                           err_msg=name)


class MosaicLoweringTest(parameterized.TestCase):
  """The kernel lowers to Mosaic GPU for CUDA (sm_90a) on the CPU.

  Catches lowering errors (layouts, unsupported primitives), not ptxas or
  SMEM limits; with no GPU the target is Mosaic's default, sm_90a.
  """

  @parameterized.parameters(
      # warp_specialized, compute_wgs, G, D, dtype
      (True, 2, 16, 128, _BF16), (True, 1, 1, 64, _BF16),
      (False, 1, 8, 128, np.float16), (True, 2, 2, 256, _BF16))
  def test_lowers_for_cuda(self, warp_specialized, compute_wgs, g, d, dtype):
    b, t, kh = 1, 300, 2
    q = jax.ShapeDtypeStruct((b, t, kh * g, d), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, d), dtype)
    bias = jax.ShapeDtypeStruct((b, t, kh), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, kh, t, math.ceil(t / _C)), jnp.bool_)
    fn = lambda *a: bsm.block_sparse_attention_mosaic(
        *a, _C, compute_wgs=compute_wgs, warp_specialized=warp_specialized)
    text = jax.jit(fn).trace(q, kv, kv, bias, mask).lower(
        lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)
    self.assertNotIn("__gpu$xla.gpu.triton", text)

  @parameterized.parameters(
      # warp_specialized, compute_wgs, G, D, dtype
      (True, 2, 16, 128, _BF16), (False, 1, 1, 64, np.float16))
  def test_grad_lowers_for_cuda(self, warp_specialized, compute_wgs, g, d,
                                dtype):
    # The compiled backward feeds P^T, dS^T, dS to wgmma from registers and
    # accumulates in place (run_state), which interpret mode never runs.
    b, t, kh = 1, 300, 2
    q = jax.ShapeDtypeStruct((b, t, kh * g, d), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, d), dtype)
    bias = jax.ShapeDtypeStruct((b, t, kh), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, kh, t, math.ceil(t / _C)), jnp.bool_)
    loss = lambda *a: jnp.sum(bsm.block_sparse_attention_mosaic(
        *a, _C, compute_wgs=compute_wgs,
        warp_specialized=warp_specialized).astype(jnp.float32))
    fn = jax.grad(loss, argnums=(0, 1, 2, 3))
    text = jax.jit(fn).trace(q, kv, kv, bias, mask).lower(
        lowering_platforms=("cuda",)).as_text()
    # The forward, dq and dk/dv kernels, none through Triton.
    self.assertGreaterEqual(text.count("custom_call @mosaic_gpu"), 3)
    self.assertNotIn("__gpu$xla.gpu.triton", text)


if __name__ == "__main__":
  absltest.main()
