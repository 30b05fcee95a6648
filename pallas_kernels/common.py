"""Pieces shared by the Pallas kernels: tile sizes and small helpers."""

from __future__ import annotations

import dataclasses

# Logit of a masked key. Finite, so that `m_prev - m_next` of two fully
# masked rows is 0 rather than NaN; the kernels also zero masked
# probabilities explicitly, so its size never matters.
MASK_VALUE = -1e30


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def is_power_of_2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the block-sparse attention kernels; the knobs to sweep.

  A query tile is `block_q` consecutive query tokens times the G query heads
  of one KV head, R = block_q * G rows (G padded to a power of 2); the key
  tile is always one selection block of C tokens. The forward and dq kernels
  iterate over the union of the tile's selected blocks, so a larger tile
  means a larger union (wasted work when neighbouring tokens select
  different blocks) but fewer, fuller matmuls. None picks R = 64 rows for
  all three kernels: with the transposed backward (the kernel's default),
  the fastest fwd+bwd of the bwd_sweep at T = 32k, G = 16, ahead of 32-row
  dq tiles; 128-row dk/dv tiles spill and were far slower
  (experiments/results/kernels/NOTES.md, session 3).

  The dk/dv/dbias kernel runs one program per work item: a key block and a
  segment of at most `dkv_segment` consecutive entries of the list of query
  tiles (of `block_q_dkv` tokens) whose union holds the block. Segments of
  one block add their partial dk, dv, dbias atomically into fp32
  accumulators. Without segments the sink block, in every tile's union,
  would be one program walking all T / block_q_dkv tiles while most walk a
  small fraction of them. Smaller segments balance better; larger ones do fewer
  atomic adds and launch fewer programs (the grid holds a static upper
  bound on the item count, and items past the real count exit at once).

  On the GPU each `block_q*` must be a power of 2 with `block_q*` * G >= 16.

  Attributes:
    block_q: tokens per tile of the forward kernel.
    block_q_dq: tokens per tile of the dq kernel.
    block_q_dkv: tokens per tile that the dk/dv/dbias kernel iterates over.
    dkv_segment: most query tiles per dk/dv/dbias program (None: 64).
  """
  block_q: int | None = None
  block_q_dq: int | None = None
  block_q_dkv: int | None = None
  dkv_segment: int | None = None

  def resolve(self, groups: int) -> BlockSizes:
    """Fills the unset sizes for G = `groups` (a power of 2) query heads."""
    default = lambda rows: max(1, rows // groups)
    return BlockSizes(
        block_q=self.block_q or default(64),
        block_q_dq=self.block_q_dq or default(64),
        block_q_dkv=self.block_q_dkv or default(64),
        dkv_segment=self.dkv_segment or 64)
