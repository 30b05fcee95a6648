"""Per-device memory of one training step on a mesh, without devices.

An analytic plan for `experiments/pretrain.py --dry_run`: the parameter,
gradient and optimizer shards follow the sharding rules of `sharding.py`
exactly; activations are an estimate of the peak. Like `cost_model`, it
allocates nothing; unlike it, it needs the model's abstract parameters, so
it lives outside `sharding` (which the model's attention imports) to keep
the imports one-way.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nosa_jax import config as config_lib
from nosa_jax import model as model_lib
from nosa_jax import sharding


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one training step, an analytic estimate."""

  mesh_shape: tuple[int, int, int]
  params: int
  grads: int
  optimizer: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.activations


def _bytes(dtype: str) -> int:
  return jnp.dtype(dtype).itemsize


def memory_plan(cfg: config_lib.ExperimentConfig,
                mesh_shape: tuple[int, int, int]) -> MemoryPlan:
  """Estimates per-device memory for `cfg` on a mesh, without devices.

  Parameters, gradients (param dtype) and AdamW moments (2 x fp32) are
  exact per-device shard sizes under the rules of `sharding`. Activations
  are an estimate of the peak: with remat, the block inputs of every layer
  (model dtype) and, for the sparse variants with `remat_keeps_selection`,
  every layer's bool block mask, plus one layer's live intermediates during
  its recomputation; the attention working set of one query chunk; and the
  fp32 logits with their gradient. Without remat every layer's
  intermediates are kept. With `scan_layers` the forward stacks the layer
  parameters (a copy; the matmul weights in the compute dtype) and the
  backward builds their gradient stacked before splitting it per layer: two
  more copies, counted with the activations.

  Args:
    cfg: the experiment; `cfg.model` and `cfg.train` (batch size, sequence
      length) are read.
    mesh_shape: (data, fsdp, tensor) sizes, as `sharding.resolve_mesh_shape`
      returns them.

  Returns:
    The per-device bytes of each part.
  """
  m, t = cfg.model, cfg.train
  sizes = dict(zip(sharding.AXES, mesh_shape, strict=True))
  _, abstract = model_lib.abstract_params(m)
  specs = sharding.param_specs(abstract, sizes)

  def shard_elems(x, spec):
    n = x.size
    for entry in spec:
      if entry:
        entry = entry if isinstance(entry, tuple) else (entry,)
        n //= math.prod(sizes[a] for a in entry)
    return n

  elems = sum(jax.tree.leaves(jax.tree.map(shard_elems, abstract, specs)))
  p_bytes = elems * _bytes(m.param_dtype)
  batch_shards = sizes["data"] * sizes["fsdp"]
  b_local = max(1, t.batch_size // batch_shards)
  tp = sizes["tensor"]
  act = _bytes(m.dtype)
  tokens = b_local * t.seq_len
  heads_local = m.num_heads // tp if m.num_heads % tp == 0 else m.num_heads
  mlp_local = m.mlp_dim // tp if m.mlp_dim % tp == 0 else m.mlp_dim
  # One layer's live intermediates (x, norms, q/k/v/out, gate/up/act).
  layer = tokens * act * (4 * m.model_dim
                          + (2 * heads_local + 2 * m.num_kv_heads)
                          * m.head_dim + 3 * mlp_local)
  if m.sparse.is_sparse:
    chunk = min(m.sparse.query_chunk, t.seq_len)
    attn = 3 * b_local * heads_local * chunk * t.seq_len * 4
  else:
    attn = 0  # cuDNN / fused attention keeps O(T) state
  saved = (m.num_layers * tokens * m.model_dim * act if m.remat != "none"
           else m.num_layers * layer)
  if (m.remat != "none" and m.remat_keeps_selection
      and m.sparse.is_sparse):
    # Each layer's bool block mask [B, K, T, N], kept by the remat policy.
    kv_local = (m.num_kv_heads // tp if m.num_kv_heads % tp == 0
                else m.num_kv_heads)
    saved += (m.num_layers * tokens * kv_local
              * -(-t.seq_len // m.sparse.block_size))
  vocab_local = m.vocab_size // tp if m.vocab_size % tp == 0 else m.vocab_size
  logits = 2 * tokens * vocab_local * 4
  stacked = 0
  if m.scan_layers:
    # The matmul weights are stacked in the compute dtype, the rest in the
    # parameter dtype (model.Transformer._scan_blocks).
    stacked = 2 * sum(jax.tree.leaves(jax.tree.map_with_path(
        lambda path, x, spec: shard_elems(x, spec) * _bytes(
            m.dtype if sharding.leaf_name(path) in model_lib.MATMUL_WEIGHTS
            else m.param_dtype),
        abstract["blocks"], specs["blocks"])))
  return MemoryPlan(mesh_shape=tuple(mesh_shape), params=p_bytes,
                    grads=p_bytes, optimizer=2 * elems * 4,
                    activations=saved + 2 * layer + attn + logits + stacked)


def format_plan(plan: MemoryPlan, device_bytes: int) -> str:
  """The plan as a table in GiB, against the device's `device_bytes` (0:
  unknown, the total stands alone)."""
  gib = lambda n: f"{n / 2**30:8.2f} GiB"
  of = f"  of {gib(device_bytes)}" if device_bytes else ""
  lines = [f"mesh (data, fsdp, tensor) = {plan.mesh_shape}, per device:",
           f"  parameters   {gib(plan.params)}",
           f"  gradients    {gib(plan.grads)}",
           f"  optimizer    {gib(plan.optimizer)}  (AdamW moments, fp32)",
           f"  activations  {gib(plan.activations)}  (estimate)",
           f"  total        {gib(plan.total)}{of}"]
  return "\n".join(lines)
