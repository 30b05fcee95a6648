"""Pinned host memory for the host KV store: XLA's cap and a capacity check.

XLA's GPU client allocates `pinned_host` memory from a pool with a cap
(`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`, 64 GB by default) that grows by
doubling regions and keeps them once allocated. Entry points raise the cap
before JAX starts (`allow_pinned_host_memory`); `check_host_capacity`
refuses a store that cannot fit, with the arithmetic in the message.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from nosa_jax import config as config_lib
from nosa_jax import cost_model


def host_store_bytes(cfg: config_lib.ModelConfig, batch: int,
                     max_len: int) -> int:
  """Host KV store size: 2 (K, V) * L * B * K * S * D * itemsize, S = N*C."""
  return cost_model.host_bytes(cfg, int(batch), int(max_len))


# XLA's GPU client caps its pinned host allocator (the `pinned_host` memory
# kind) at this many GB unless the variable says otherwise; an 8B-like store
# of 68.7 GB failed with RESOURCE_EXHAUSTED on the H100 (2026-11-24).
HOST_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
_XLA_DEFAULT_HOST_LIMIT_GB = 64


def _physical_host_bytes(kind: str) -> Optional[int]:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(kind)
  except (ValueError, OSError, AttributeError):
    return None


def allow_pinned_host_memory(need_bytes: Optional[int] = None,
                             fraction: float = 0.75) -> None:
  """Raises XLA's pinned-host cap for a host KV store of `need_bytes`.

  Sets `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB` unless it is already set, to
  `need_bytes` plus max(8 GB, 10%) of headroom (transfer staging shares the
  pool), and never above `fraction` of the physical memory. Without
  `need_bytes`, to that fraction. The cap matters beyond the store's size:
  XLA's pinned allocator (a BFC allocator with growth) doubles each new
  region, up to the cap, so a 68.7 GB store under a 123 GB cap pinned
  ~123 GB of the H100 machine's 137 GB and the process died without a
  message (2026-11-24). Only takes effect when called before JAX creates
  its GPU client (the first computation or `jax.devices()`), so entry
  points call it first.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
  if need_bytes is not None and need_bytes < 0:
    raise ValueError(f"need_bytes={need_bytes!r} must be >= 0")
  total = _physical_host_bytes("SC_PHYS_PAGES")
  if total is None or HOST_LIMIT_ENV in os.environ:
    return
  limit = fraction * total
  if need_bytes is not None:
    limit = min(limit, need_bytes + max(8e9, 0.1 * need_bytes))
  # Never below XLA's own default: small stores keep the usual pool.
  limit = max(limit, _XLA_DEFAULT_HOST_LIMIT_GB * 1e9)
  os.environ[HOST_LIMIT_ENV] = str(math.ceil(limit / 1e9))


# Bytes of pinned_host stores this process has held at once. XLA's pinned
# pool keeps a region once allocated (free inside the pool, not in the OS's
# free memory), so a second 68.7 GB store after a first one was refused on
# the H100 (2026-11-24) while the pool had room for it.
_pinned_high_water = [0]


def _live_pinned_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays()
             if getattr(x.sharding, "memory_kind", None) == "pinned_host")


def _available_host_bytes() -> Optional[int]:
  """Pinned host bytes a new store can take.

  Off the GPU: the free physical memory. On the GPU: the free room inside
  XLA's pinned pool (estimated as the high-water mark of this process's
  stores minus the live pinned arrays) plus what the pool may still grow
  by, min(free RAM, XLA's cap - the pool).
  """
  free = _physical_host_bytes("SC_AVPHYS_PAGES")
  if jax.default_backend() != "gpu":
    return free
  try:
    cap = int(float(os.environ.get(HOST_LIMIT_ENV,
                                   _XLA_DEFAULT_HOST_LIMIT_GB)) * 1e9)
  except ValueError:
    return free
  live = _live_pinned_bytes()
  pool = max(live, _pinned_high_water[0])
  grow = max(0, cap - pool)
  return (pool - live) + (grow if free is None else min(free, grow))


def check_host_capacity(cfg: config_lib.ModelConfig, batch: int,
                        max_len: int,
                        host_memory_limit: Optional[int] = None) -> int:
  """Raises ValueError if the host store does not fit; returns its bytes.

  host_memory_limit: bytes allowed (default: the free physical memory).
  """
  need = host_store_bytes(cfg, batch, max_len)
  limit = (host_memory_limit if host_memory_limit is not None
           else _available_host_bytes())
  if limit is not None and need > limit:
    c = cfg.sparse.block_size
    s = -(-max_len // c) * c
    raise ValueError(
        f"the host KV store needs {need} bytes ({need / 2**30:.3f} GiB) = "
        f"2 (K,V) x {cfg.num_layers} layers x B={batch} x "
        f"K={cfg.num_kv_heads} x S={s} (max_len={max_len} in blocks of "
        f"{cfg.sparse.block_size}) x D={cfg.head_dim} x "
        f"{jnp.dtype(cfg.dtype).itemsize} B, but only {limit} bytes of "
        "pinned host memory are available (free RAM, and on the GPU "
        f"XLA's cap {HOST_LIMIT_ENV}, default "
        f"{_XLA_DEFAULT_HOST_LIMIT_GB} GB: see allow_pinned_host_memory)")
  if host_memory_limit is None and jax.default_backend() == "gpu":
    _pinned_high_water[0] = max(_pinned_high_water[0],
                                _live_pinned_bytes() + need)
  return need


