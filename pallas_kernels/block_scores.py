"""Query-aware block scores of NOSA selection (Pallas, Triton).

NOSA_SPEC.md §2.3 steps 2-4 (InfLLM-V2 "stage 1"), the same math as
`nosa_jax.selection.query_aware_scores`:

  p[t, g, c] = softmax_c(<q[t, g], kbar[c]> / sqrt(D))  over the windows c
               visible to t (stride*c + kernel - 1 <= pos[t]); a row with
               no visible window gives p = 0,
  S[t, k, c] = sum of p over the G query heads g of KV head k,
  sq[t, k, j] = max of S over the windows overlapping block j, i.e.
               c in [r*j - lead, r*j + r - 1] with r = C // stride and
               lead = ceil(kernel / stride) - 1 ([4j-1, 4j+3] for 64/32/16);
               windows outside [0, W) are ignored and a block without any
               window scores -inf (an existing but invisible window
               contributes 0, not -inf).

Why a kernel: in XLA the [G, T, W] probabilities of a query chunk go through
HBM several times (logits, max, exp, sum, pooling); at T = 32k this scoring
was most of the selection's time (issue #4; experiments/results/kernels/
NOTES.md). Here they never leave the chip.

Design: the grid is (B, K, query tiles). A program holds R = block_q * Gp
query rows (token-major: row = t * Gp + g, G padded to a power of 2 Gp with
masked heads) and walks the block columns in tiles of `block_n` blocks. The
wrapper lays the compressed keys out per window offset o in [0, r + lead):
kbar_o[o, j] = kbar[r*j - lead + o], so the o-th window of every block in a
tile is one contiguous [block_n, D] load and each [R, block_n] logit tile
maps one-to-one onto block columns; the pooling is an elementwise max over
the r + lead offsets, with no shifts across tiles.

  pass 1: over the block tiles that hold a window visible to some row of the
          tile, offsets o = lead .. lead + r - 1 (each window once): online
          row max m and denominator l (fp32).
  pass 2: over the same tiles, all r + lead offsets (windows shared by two
          blocks are recomputed: (r + lead) / r = 1.25x for 64/32/16):
          p = exp(s - m) / l, sum over the Gp heads of a token (a reshape
          [R, n] -> [block_q, Gp, n]), max into the block columns, store a
          [block_q, block_n] tile. Tiles past the last visible window need
          no logits: their value is 0 where a window exists, else -inf.

Only the [T, N] block scores are written. The logits cost
R * D * block_n * (2r + lead) FMAs per tile; `precision` picks the dot: fp32
IEEE ("highest", matches the fp32 reference to rounding), TF32 ("tf32", what
XLA's default precision uses for fp32 dots on the GPU), or bf16 operands
("bf16", the keys rounded to bf16; fastest).
"""

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

# Triton's dot needs every operand dimension >= 16; tiles are powers of 2.
_MIN_DOT_DIM = 16
_PRECISIONS = ("highest", "tf32", "bf16")


@dataclasses.dataclass(frozen=True)
class ScoreBlockSizes:
  """Tiling of `block_scores` (frozen: a jit static argument).

  The defaults (R = 128 rows, 32 block columns, with 8 warps) were the
  fastest of `kernel_bench --parts=scores_sweep` at H = 32, K = 2 over
  1024-query chunks, ahead of the earlier 64 rows x 16 columns with 4 warps
  (figures: experiments/results/kernels/NOTES.md, session 8).

  Attributes:
    block_q: query tokens per program; None picks 128 // Gp (at least 1),
      so that R = block_q * Gp = 128 rows. A power of 2 with
      block_q * Gp >= 16.
    block_n: block columns per tile; a power of 2 >= 16 (the dot's N).
  """

  block_q: int | None = None
  block_n: int = 32

  def resolve(self, gp: int) -> "ScoreBlockSizes":
    bq = self.block_q or max(1, 128 // gp)
    return ScoreBlockSizes(block_q=bq, block_n=self.block_n)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


def _pool_geometry(block_size: int, kernel: int, stride: int):
  """(r, lead): windows per block stride and windows starting before it."""
  return block_size // stride, -(-kernel // stride) - 1


# ---------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------


def _block_scores_kernel(
    q_ref,     # [R, Dp]  R = block_q * Gp rows, row = t * Gp + g
    kbar_ref,  # [r + lead, Np, Dp]  kbar_o[o, j] = kbar[r*j - lead + o]
    pos_ref,   # [R] int32 position of each row (-1 for padded tokens)
    out_ref,   # [block_q, Np] fp32 block scores
    *,
    sm_scale: float,
    groups: int,
    gp: int,
    num_windows: int,
    num_blocks: int,
    r: int,
    lead: int,
    kernel: int,
    stride: int,
    block_n: int,
    precision: str,
):
  rows = q_ref.shape[0]
  bq = rows // gp
  width = r + lead
  n_tiles = out_ref.shape[1] // block_n
  if precision == "bf16":
    q = q_ref[...].astype(jnp.bfloat16)
    dot_precision = lax.Precision.DEFAULT
  else:
    q = q_ref[...].astype(jnp.float32)
    dot_precision = (lax.Precision.HIGHEST if precision == "highest"
                     else lax.Precision.DEFAULT)  # DEFAULT -> Triton TF32
  pos = pos_ref[...]  # [R]
  # Padded heads (g >= G) must not add probability mass to the group sum.
  head_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) % gp < groups
  col = lax.broadcasted_iota(jnp.int32, (block_n,), 0)

  # Block tiles holding a window visible to some row (every operand is >= 0,
  # so truncating lax.div is floor division).
  p_max = jnp.max(pos)
  c_max = jnp.minimum(lax.div(jnp.maximum(p_max - kernel + 1, 0), stride),
                      num_windows - 1)
  j_max = jnp.minimum(lax.div(c_max + lead, r), num_blocks - 1)
  n_vis = jnp.where(p_max >= kernel - 1, lax.div(j_max, block_n) + 1, 0)

  def windows(j, o):
    """Window index [block_n] of offset o in tile j, and whether it exists."""
    c = r * (j * block_n + col) - lead + o
    return c, (c >= 0) & (c < num_windows)

  def logits(j, o):
    """[R, block_n] fp32 logits in base 2 (log2(e) * q.k / sqrt(D), so the
    softmax runs on exp2, one MUFU op) and visibility of offset o."""
    k = kbar_ref[o, pl.ds(pl.multiple_of(j * block_n, block_n), block_n), :]
    s = lax.dot_general(
        q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
        precision=dot_precision,
        preferred_element_type=jnp.float32) * sm_scale
    c, exists = windows(j, o)
    # Causal visibility: the whole window lies at or before the row's token.
    visible = exists[None, :] & (stride * c[None, :] + kernel - 1
                                 <= pos[:, None])
    return s, visible, exists

  # Pass 1: online max and denominator over each window once.
  def stats_body(j, carry):
    m_i, l_i = carry
    for o in range(lead, lead + r):
      s, visible, _ = logits(j, o)
      s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      # Rows without a visible window so far keep m = -inf: shift by 0.
      shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.where(visible, jnp.exp2(s - shift[:, None]), 0.0)
      l_i = jnp.exp2(m_i - shift) * l_i + p.sum(axis=1)
      m_i = m_new
    return m_i, l_i

  m_i, l_i = lax.fori_loop(
      0, n_vis, stats_body,
      (jnp.full((rows,), -jnp.inf, jnp.float32),
       jnp.zeros((rows,), jnp.float32)))
  shift = jnp.where(m_i == -jnp.inf, 0.0, m_i)
  # A row without any visible window has l = 0 and gets p = 0 (not NaN).
  inv_l = jnp.where(head_ok & (l_i > 0), 1.0 / jnp.where(l_i > 0, l_i, 1.0),
                    0.0)

  def store(j, best):
    out_ref[:, pl.ds(pl.multiple_of(j * block_n, block_n), block_n)] = best

  # Pass 2: normalised probabilities, group sum, max over the offsets.
  def score_body(j, carry):
    best = jnp.full((bq, block_n), -jnp.inf, jnp.float32)
    for o in range(width):
      s, visible, exists = logits(j, o)
      p = jnp.where(visible, jnp.exp2(s - shift[:, None]) * inv_l[:, None],
                    0.0)
      if gp > 1:
        p = p.reshape(bq, gp, block_n).sum(axis=1)  # GQA sum (step 3)
      best = jnp.maximum(best, jnp.where(exists[None, :], p, -jnp.inf))
    store(j, best)
    return carry  # a literal here fails the Triton lowering (scf.yield)

  lax.fori_loop(0, n_vis, score_body, 0)

  # Tiles past the last visible window: 0 where a window exists, else -inf.
  def empty_body(j, carry):
    any_window = None
    for o in range(width):
      _, exists = windows(j, o)
      any_window = exists if any_window is None else any_window | exists
    store(j, jnp.broadcast_to(
        jnp.where(any_window, 0.0, -jnp.inf)[None, :], (bq, block_n)))
    return carry

  lax.fori_loop(n_vis, n_tiles, empty_body, 0)


# ---------------------------------------------------------------------------
# Wrapper.
# ---------------------------------------------------------------------------


def _validate(q_BTHD, kbar_BWKD, positions_T, num_blocks, block_size, kernel,
              stride):
  """Raises a one-line ValueError naming the first bad argument."""
  if q_BTHD.ndim != 4:
    raise ValueError(f"q_BTHD must be [B, T, H, D], got shape {q_BTHD.shape}")
  if kbar_BWKD.ndim != 4:
    raise ValueError(f"kbar_BWKD must be [B, W, K, D], got shape "
                     f"{kbar_BWKD.shape}")
  b, t, h, d = q_BTHD.shape
  kb, _, kv_heads, kd = kbar_BWKD.shape
  if kb != b or kd != d:
    raise ValueError(f"kbar_BWKD shape {kbar_BWKD.shape} does not match "
                     f"q_BTHD shape {q_BTHD.shape} in B or D")
  if kv_heads == 0 or h % kv_heads:
    raise ValueError(f"q_BTHD heads H={h} not a multiple of kbar_BWKD heads "
                     f"K={kv_heads}")
  if positions_T.shape != (t,):
    raise ValueError(f"positions_T shape {positions_T.shape} must be [T] = "
                     f"({t},)")
  if not jnp.issubdtype(positions_T.dtype, jnp.integer):
    raise ValueError(f"positions_T dtype must be integer, got "
                     f"{positions_T.dtype}")
  if not jnp.issubdtype(q_BTHD.dtype, jnp.floating):
    raise ValueError(f"q_BTHD dtype must be floating, got {q_BTHD.dtype}")
  if num_blocks < 1:
    raise ValueError(f"num_blocks={num_blocks} must be >= 1")
  if stride < 1 or kernel < stride or block_size % stride:
    raise ValueError(f"need kernel >= stride >= 1 and block_size % stride "
                     f"== 0, got block_size={block_size}, kernel={kernel}, "
                     f"stride={stride}")


@functools.partial(
    jax.jit,
    static_argnames=["num_blocks", "block_size", "kernel", "stride",
                     "block_sizes", "precision", "num_warps", "num_stages",
                     "interpret", "debug"])
def block_scores(
    q_BTHD: jax.Array,
    kbar_BWKD: jax.Array,
    positions_T: jax.Array,
    num_blocks: int,
    block_size: int,
    kernel: int,
    stride: int,
    *,
    block_sizes: ScoreBlockSizes | None = None,
    precision: str = "highest",
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
  """Query-aware block scores sq (§2.3 steps 2-4) without a [T, W] matrix.

  Args:
    q_BTHD: queries (RoPE applied), any float dtype; H = K * G.
    kbar_BWKD: compressed keys (mean over windows [stride*c, stride*c +
      kernel)), usually fp32.
    positions_T: int token positions of the T queries (window c is visible
      to query t iff stride*c + kernel - 1 <= positions_T[t]).
    num_blocks: N, block columns of the output.
    block_size: C tokens per block; a multiple of `stride`.
    kernel: compressed window length in tokens.
    stride: compressed window stride in tokens.
    block_sizes: tiling; None = `ScoreBlockSizes()`.
    precision: the logit dot: "highest" (fp32 IEEE; far slower than
      "tf32", experiments/results/kernels/NOTES.md, session 5), "tf32"
      (TF32 on the GPU; exact fp32 in interpret mode) or "bf16" (q and kbar
      rounded to bf16, fp32 accumulation).
    num_warps: Triton warps per program; None = 8.
    num_stages: Triton pipelining stages of the tile loops; None = 2.
    interpret: run in the Pallas interpreter (CPU).
    debug: print the kernel's jaxpr and lowered code.

  Returns:
    sq_BKTN fp32 (no forced or causal block masking applied), equal to
    `block_scores_reference`.
  """
  _validate(q_BTHD, kbar_BWKD, positions_T, num_blocks, block_size, kernel,
            stride)
  if precision not in _PRECISIONS:
    raise ValueError(f"precision={precision!r} not in {_PRECISIONS}")
  b, t, h, d = q_BTHD.shape
  w, kv_heads = kbar_BWKD.shape[1:3]
  if w == 0:
    return jnp.full((b, kv_heads, t, num_blocks), -jnp.inf, jnp.float32)
  g = h // kv_heads
  gp = _next_pow2(g)
  dp = max(_MIN_DOT_DIM, _next_pow2(d))
  sizes = (block_sizes or ScoreBlockSizes()).resolve(gp)
  bq, bn = sizes.block_q, sizes.block_n
  if not (_is_pow2(bq) and bq * gp >= _MIN_DOT_DIM):
    raise ValueError(f"block_q={bq} must be a power of 2 with block_q * Gp "
                     f">= {_MIN_DOT_DIM} (Gp={gp})")
  if not (_is_pow2(bn) and bn >= _MIN_DOT_DIM):
    raise ValueError(f"block_n={bn} must be a power of 2 >= {_MIN_DOT_DIM}")
  r, lead = _pool_geometry(block_size, kernel, stride)
  width = r + lead
  tp = -(-t // bq) * bq
  np_ = -(-num_blocks // bn) * bn

  # Queries: [B, T, K, G, D] -> [B, K, Tp * Gp, Dp], token-major rows; the
  # padded heads, tokens and features are zero (and masked in the kernel).
  q_BKTGD = jnp.transpose(q_BTHD.reshape(b, t, kv_heads, g, d), (0, 2, 1, 3, 4))
  q_BKTGD = jnp.pad(q_BKTGD, ((0, 0), (0, 0), (0, tp - t), (0, gp - g),
                              (0, dp - d)))
  q_BKRD = q_BKTGD.reshape(b, kv_heads, tp * gp, dp)
  pos_T = jnp.pad(positions_T.astype(jnp.int32), (0, tp - t),
                  constant_values=-1)  # a padded token sees no window
  pos_R = jnp.repeat(pos_T, gp)
  # Keys per window offset: kbar_o[o, j] = kbar[r*j - lead + o] (zero, and
  # masked in the kernel, outside [0, W)).
  kdtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
  kbar_BKWD = jnp.transpose(kbar_BWKD.astype(kdtype), (0, 2, 1, 3))
  hi = r * np_ + width - lead - w
  kbar_pad = jnp.pad(kbar_BKWD, ((0, 0), (0, 0), (lead, max(0, hi)),
                                 (0, dp - d)))
  kbar_BKOND = jnp.stack(
      [kbar_pad[:, :, o:o + r * (np_ - 1) + 1:r] for o in range(width)],
      axis=2)

  kern = functools.partial(
      _block_scores_kernel, sm_scale=math.log2(math.e) / math.sqrt(d),
      groups=g, gp=gp,
      num_windows=w, num_blocks=num_blocks, r=r, lead=lead, kernel=kernel,
      stride=stride, block_n=bn, precision=precision)
  rows = bq * gp
  out = pl.pallas_call(
      kern,
      grid=(b, kv_heads, tp // bq),
      in_specs=[
          pl.BlockSpec((None, None, rows, dp), lambda i, j, n: (i, j, n, 0)),
          pl.BlockSpec((None, None, width, np_, dp),
                       lambda i, j, n: (i, j, 0, 0, 0)),
          pl.BlockSpec((rows,), lambda i, j, n: (n,)),
      ],
      out_specs=pl.BlockSpec((None, None, bq, np_),
                             lambda i, j, n: (i, j, n, 0)),
      out_shape=jax.ShapeDtypeStruct((b, kv_heads, tp, np_), jnp.float32),
      compiler_params=plt.CompilerParams(
          num_warps=8 if num_warps is None else num_warps,
          num_stages=2 if num_stages is None else num_stages),
      interpret=interpret,
      debug=debug,
      name="nosa_block_scores",
  )(q_BKRD, kbar_BKOND, pos_R)
  return out[:, :, :t, :num_blocks]


# ---------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit,
                   static_argnames=["num_blocks", "block_size", "kernel",
                                    "stride"])
def block_scores_reference(
    q_BTHD: jax.Array,
    kbar_BWKD: jax.Array,
    positions_T: jax.Array,
    num_blocks: int,
    block_size: int,
    kernel: int,
    stride: int,
) -> jax.Array:
  """Pure-jnp `block_scores`: dense fp32 [G, T, W] probabilities. The spec.

  Same arguments (without the tuning ones) and result as `block_scores`;
  the math of `nosa_jax.selection.query_aware_scores` + `block_pool`.
  """
  _validate(q_BTHD, kbar_BWKD, positions_T, num_blocks, block_size, kernel,
            stride)
  b, t, h, d = q_BTHD.shape
  w, kv_heads = kbar_BWKD.shape[1:3]
  if w == 0:
    return jnp.full((b, kv_heads, t, num_blocks), -jnp.inf, jnp.float32)
  q_BTKGD = q_BTHD.astype(jnp.float32).reshape(b, t, kv_heads,
                                               h // kv_heads, d)
  logits_BKGTW = jnp.einsum("BTKGD,BWKD->BKGTW", q_BTKGD,
                            kbar_BWKD.astype(jnp.float32),
                            precision=lax.Precision.HIGHEST) / math.sqrt(d)
  c_W = jnp.arange(w)
  visible_TW = stride * c_W[None, :] + kernel - 1 <= positions_T[:, None]
  visible = visible_TW[None, None, None]
  logits_BKGTW = jnp.where(visible, logits_BKGTW, -jnp.inf)
  m = jnp.max(logits_BKGTW, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(visible, jnp.exp(logits_BKGTW - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  s_BKTW = jnp.sum(e / jnp.where(z > 0, z, 1.0), axis=2)  # GQA sum
  # Block j takes the max over windows [r*j - lead, r*j + r - 1] in [0, W).
  r, lead = _pool_geometry(block_size, kernel, stride)
  c_N5 = (r * jnp.arange(num_blocks)[:, None] - lead
          + jnp.arange(r + lead)[None, :])
  exists_N5 = (c_N5 >= 0) & (c_N5 < w)
  s_BKTN5 = s_BKTW[..., jnp.clip(c_N5, 0, w - 1)]
  return jnp.max(jnp.where(exists_N5[None, None, None], s_BKTN5, -jnp.inf),
                 axis=-1)
