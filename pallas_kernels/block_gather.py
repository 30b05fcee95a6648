"""Zero-copy block gather: copy listed KV tiles between two block arrays.

The offload engine's fetch (NOSA_SPEC.md §4.4, project decision 6): the KV
store lives in `pinned_host` memory, block-major, so each block of one KV
head is one contiguous C x D tile; each decode step copies the few missing
tiles into free slots of the device block cache. XLA rejects gathers on a
`pinned_host` operand, and a loop of per-tile `device_put`s runs far below
the link's bandwidth (PERFORMANCE.md; the session-2 fetch figures in
experiments/results/NOTES.md). This kernel instead reads the host
array directly: the operand is passed with `memory_space=pl.ANY`, so the
Triton program gets its (UVA) pointer and each load is a PCIe read, as
NOSI's CUDA gather does.

  gather_blocks(src, dst, src_rows_F, dst_rows_F, count) -> dst'

copies, for every f < count, tile src[src_rows_F[f]] into dst[dst_rows_F[f]]
for each (src, dst) pair (K and V in one launch). `dst` is aliased to the
output (donate it), so tiles not listed keep their contents and nothing else
is written. Entries at f >= count are ignored, whatever they hold.

Design: a persistent grid of `programs` programs; program i copies entries
i, i + programs, ... below `count` (a dynamic loop bound), one whole C x D
tile per load/store. A small grid leaves SMs to other kernels; a grid of a
few waves saturates PCIe (the grid sweep: experiments/results/NOTES.md,
session 2). The same kernel copies
device -> host (write-back of completed blocks) when `dst` is the host
array.

`gather_blocks_reference` has the same signature in jnp (device memory only:
it uses a scatter, which XLA refuses on `pinned_host`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

# 4 waves of 132 SMs (H100 SXM); the grid sweep: experiments/results/NOTES.md.
DEFAULT_PROGRAMS = 528


def _check(srcs, dsts, src_rows_F, dst_rows_F):
  if len(srcs) != len(dsts) or not srcs:
    raise ValueError(f"gather_blocks: {len(srcs)} sources for {len(dsts)} "
                     "destinations; give one or more (src, dst) pairs")
  for s, d in zip(srcs, dsts, strict=True):
    if s.ndim != 3 or d.ndim != 3 or s.shape[1:] != d.shape[1:]:
      raise ValueError("gather_blocks: src and dst must be [rows, C, D] with "
                       f"the same tile, got {s.shape} and {d.shape}")
    if s.dtype != d.dtype:
      raise ValueError(f"gather_blocks: dtype {s.dtype} != {d.dtype}")
  if (src_rows_F.ndim != 1 or src_rows_F.shape != dst_rows_F.shape
      or src_rows_F.dtype != jnp.int32 or dst_rows_F.dtype != jnp.int32):
    raise ValueError("gather_blocks: src_rows_F and dst_rows_F must be int32 "
                     f"[F], got {src_rows_F.shape} {src_rows_F.dtype} and "
                     f"{dst_rows_F.shape} {dst_rows_F.dtype}")


def _kernel(count_ref, src_rows_ref, dst_rows_ref, *refs, programs: int,
            pairs: int):
  srcs, dsts_in, dsts = refs[:pairs], refs[pairs:2 * pairs], refs[2 * pairs:]
  del dsts_in  # aliased to dsts
  i = pl.program_id(0)
  count = count_ref[0]
  trips = jnp.maximum(count - i + programs - 1, 0) // programs

  def body(t, carry):
    f = i + t * programs
    s, d = src_rows_ref[f], dst_rows_ref[f]
    for src, dst in zip(srcs, dsts, strict=True):
      dst[d] = src[s]
    return carry

  lax.fori_loop(0, trips, body, 0)


@functools.partial(jax.jit, static_argnames=("programs", "num_warps",
                                             "interpret"),
                   donate_argnames=("dsts",))
def gather_blocks(srcs: tuple[jax.Array, ...], dsts: tuple[jax.Array, ...],
                  src_rows_F: jax.Array, dst_rows_F: jax.Array,
                  count: jax.Array, *, programs: int = DEFAULT_PROGRAMS,
                  num_warps: int = 4, interpret: bool = False
                  ) -> tuple[jax.Array, ...]:
  """Copies tiles src[src_rows_F[f]] -> dst[dst_rows_F[f]] for f < count.

  Args:
    srcs: [R_src, C, D] arrays (any memory kind, e.g. the pinned_host store
      reshaped to tiles).
    dsts: [R_dst, C, D] arrays, same tile and dtype; donated and returned
      updated.
    src_rows_F, dst_rows_F: int32 [F] tile indices (entries past `count` are
      ignored; rows must be in range and destination rows distinct below
      `count`).
    count: int32 scalar, number of entries to copy (0 <= count <= F).
    programs: persistent grid size.
    num_warps: Triton warps per program.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  """
  srcs, dsts = tuple(srcs), tuple(dsts)
  _check(srcs, dsts, src_rows_F, dst_rows_F)
  if programs < 1:
    raise ValueError(f"gather_blocks: programs must be >= 1, got {programs}")
  pairs = len(srcs)
  count_1 = jnp.clip(jnp.asarray(count, jnp.int32), 0,
                     src_rows_F.shape[0]).reshape(1)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  n_in = 3 + 2 * pairs
  return tuple(pl.pallas_call(
      functools.partial(_kernel, programs=programs, pairs=pairs),
      grid=(programs,),
      in_specs=[any_spec] * n_in,
      out_specs=[any_spec] * pairs,
      out_shape=[jax.ShapeDtypeStruct(d.shape, d.dtype) for d in dsts],
      input_output_aliases={3 + pairs + j: j for j in range(pairs)},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="gather_blocks",
  )(count_1, src_rows_F, dst_rows_F, *srcs, *dsts))


def gather_blocks_reference(srcs, dsts, src_rows_F, dst_rows_F, count, *,
                            programs: int = DEFAULT_PROGRAMS,
                            num_warps: int = 4, interpret: bool = False):
  """`gather_blocks` in jnp (a masked scatter; device memory only)."""
  del programs, num_warps, interpret
  srcs, dsts = tuple(srcs), tuple(dsts)
  _check(srcs, dsts, src_rows_F, dst_rows_F)
  live_F = jnp.arange(src_rows_F.shape[0]) < count
  out = []
  for s, d in zip(srcs, dsts, strict=True):
    rows_F = jnp.where(live_F, dst_rows_F, d.shape[0])  # out of range: drop
    out.append(d.at[rows_F].set(s[src_rows_F], mode="drop"))
  return tuple(out)
