"""SPMD: a named (data, fsdp, tensor) mesh, logical axis rules, memory plan.

The model code is unchanged by sharding: parameters get a `NamedSharding`
from their *logical* axes (named by parameter, below) through one rule
table, the batch is split over (data, fsdp), and XLA's SPMD partitioner
propagates the rest. A dimension that the mesh axis does not divide is
replicated instead (e.g. 2 KV heads on a tensor axis of 4), so any mesh
that multiplies to the device count works.

Multi-host: every process builds the same global batch order and feeds only
its own rows (`global_batch`), orbax saves and restores sharded arrays from
all hosts, and restoring into a state laid out on another mesh reshards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nosa_jax import config as config_lib

AXES = ("data", "fsdp", "tensor")

# Logical axes of each parameter, by its name in the model (model.py).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "scale": ("embed",),
    "evict_a": ("kv_heads",),
    "evict_delta": ("kv_dim", "kv_heads"),
}

# Logical axis -> mesh axis (None = replicated). FSDP shards the model dim
# of every matrix; tensor parallelism splits heads, MLP and vocabulary.
RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "kv_heads": None,
    "head_dim": None,
    "kv_dim": None,
}


def resolve_mesh_shape(shape: tuple[int, ...], num_devices: int
                       ) -> tuple[int, int, int]:
  """Fills one -1 entry so the product is `num_devices`; validates."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or (
      shape.count(-1) > 1):
    raise config_lib.ConfigError(
        f"train.mesh_shape={shape!r} is invalid: must be 3 positive sizes "
        "(data, fsdp, tensor), one of which may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise config_lib.ConfigError(
          f"train.mesh_shape={shape!r} is invalid: {num_devices} devices are "
          f"not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise config_lib.ConfigError(
        f"train.mesh_shape={shape!r} is invalid: its product must equal the "
        f"device count {num_devices}")
  return shape


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def _leaf_name(path) -> str:
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  names = [n for n in names if isinstance(n, str) and n != "value"]
  return names[-1]


def _spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
          mesh_sizes: dict[str, int]) -> PartitionSpec:
  out = []
  for logical, dim in zip(axes, shape, strict=True):
    mesh_axes = RULES.get(logical) if logical else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    size = math.prod(mesh_sizes[a] for a in mesh_axes) if mesh_axes else 1
    # Replicate what the mesh does not divide (a correctness-preserving
    # fallback: the dimension is simply not split).
    out.append(mesh_axes if mesh_axes and dim % size == 0 and size > 1
               else None)
  return PartitionSpec(*out)


def param_specs(params: Any, mesh_sizes: dict[str, int]) -> Any:
  """PartitionSpec per parameter leaf (works on arrays or ShapeDtypeStructs)."""
  def spec(path, x):
    axes = PARAM_AXES[_leaf_name(path)]
    return _spec(axes, x.shape, mesh_sizes)
  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
  sizes = dict(mesh.shape)
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(params, sizes))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """Shardings for a train state: parameter rules by leaf name, else replicated.

  Optimizer moments (mu, nu) mirror the parameter tree, so their leaves carry
  the parameter names and get the parameter's sharding; counters, the step
  and the RNG key are replicated.
  """
  sizes = dict(mesh.shape)

  def one(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    axes = PARAM_AXES.get(names[-1]) if names else None
    if axes is None or len(axes) != len(x.shape):
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, _spec(axes, x.shape, sizes))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(batch_BT1: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global batch as one sharded array; each process feeds its rows.

  Every process computes the same global batch (the data order is a pure
  function of the position), so rows are assigned by process index.
  """
  sharding = batch_sharding(mesh)
  n, p = jax.process_count(), jax.process_index()
  rows = batch_BT1.shape[0]
  if rows % n:
    raise config_lib.ConfigError(
        f"train.batch_size={rows} is invalid: must be divisible by the "
        f"process count {n}")
  local = batch_BT1[p * rows // n:(p + 1) * rows // n]
  return jax.make_array_from_process_local_data(sharding, local,
                                                batch_BT1.shape)


# ----------------------------------------------------------------------------
# Memory planning (--dry_run).
# ----------------------------------------------------------------------------


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
  exact per-device shard sizes under the rules above. Activations are an
  estimate of the peak: with remat, the block inputs of every layer (model
  dtype) and, for the sparse variants with `remat_keeps_selection`, every
  layer's bool block mask, plus one layer's live intermediates during its
  recomputation; the
  attention working set of one query chunk; and the fp32 logits with their
  gradient. Without remat every layer's intermediates are kept. With
  `scan_layers` the forward stacks the layer parameters (a copy; the
  matmul weights in the compute dtype) and the backward builds their
  gradient stacked before splitting it per layer: two more copies, counted
  with the activations.
  """
  from nosa_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  m, t = cfg.model, cfg.train
  sizes = dict(zip(AXES, mesh_shape, strict=True))
  _, abstract = model_lib.abstract_params(m)
  specs = param_specs(abstract, sizes)

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
  if m.sparse.variant == "full":
    attn = 0  # cuDNN / fused attention keeps O(T) state
  else:
    chunk = min(m.sparse.query_chunk, t.seq_len)
    attn = 3 * b_local * heads_local * chunk * t.seq_len * 4
  saved = (m.num_layers * tokens * m.model_dim * act if m.remat != "none"
           else m.num_layers * layer)
  if (m.remat != "none" and m.remat_keeps_selection
      and m.sparse.variant != "full"):
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
            m.dtype if _leaf_name(path) in model_lib.MATMUL_WEIGHTS
            else m.param_dtype),
        abstract["blocks"], specs["blocks"])))
  return MemoryPlan(mesh_shape=tuple(mesh_shape), params=p_bytes,
                    grads=p_bytes, optimizer=2 * elems * 4,
                    activations=saved + 2 * layer + attn + logits + stacked)


def format_plan(plan: MemoryPlan, device_bytes: int) -> str:
  gib = lambda n: f"{n / 2**30:8.2f} GiB"
  lines = [f"mesh (data, fsdp, tensor) = {plan.mesh_shape}, per device:",
           f"  parameters   {gib(plan.params)}",
           f"  gradients    {gib(plan.grads)}",
           f"  optimizer    {gib(plan.optimizer)}  (AdamW moments, fp32)",
           f"  activations  {gib(plan.activations)}  (estimate)",
           f"  total        {gib(plan.total)}  of {gib(device_bytes)}"]
  return "\n".join(lines)


def batch_parallel(fn, *args: jax.Array | None,
                   head_dims: tuple[int | None, ...] | None = None,
                   out_head_dim: int | None = None) -> jax.Array:
  """`fn(*args)` run per shard when traced under a mesh (`set_mesh`).

  For custom calls that XLA's SPMD partitioner cannot split (the Pallas
  kernels): without this, it gathers their inputs and every device computes
  the whole batch. Every array argument and the output are batch-first and
  split over the batch axes (data, fsdp); None arguments pass through.

  With `head_dims` (per argument: the index of its query-head or KV-head
  dimension, or None) and `out_head_dim`, those dimensions are also split
  over the `tensor` axis, in contiguous chunks as the `heads` rule splits
  the projections, when it divides every one of them. Splitting H and K
  alike keeps each query head with its KV head (GQA), since K % tensor == 0.

  Axes of size 1, or that do not divide the sizes, are left whole; outside
  a mesh context this is plain `fn(*args)`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  batch = next(a for a in args if a is not None).shape[0]
  axes = tuple(a for a in RULES["batch"] if sizes.get(a, 1) > 1)
  if batch % math.prod(sizes[a] for a in axes):
    axes = ()
  heads = RULES["heads"]
  split_heads = (head_dims is not None and sizes.get(heads, 1) > 1
                 and all(dim is None or a is None
                         or a.shape[dim] % sizes[heads] == 0
                         for a, dim in zip(args, head_dims, strict=True)))
  if not axes and not split_heads:
    return fn(*args)
  present = [i for i, a in enumerate(args) if a is not None]

  def local(*arrays):
    full = list(args)
    for i, a in zip(present, arrays, strict=True):
      full[i] = a
    return fn(*full)

  def spec(ndim: int, head_dim: int | None) -> PartitionSpec:
    entries = [axes or None] + [None] * (ndim - 1)
    if split_heads and head_dim is not None:
      entries[head_dim] = heads
    return PartitionSpec(*entries)

  dims = head_dims or (None,) * len(args)
  out = jax.eval_shape(fn, *args)
  return jax.shard_map(
      local, in_specs=tuple(spec(args[i].ndim, dims[i]) for i in present),
      out_specs=spec(out.ndim, out_head_dim), check_vma=False)(
          *[args[i] for i in present])


def under_mesh(fn, mesh: Mesh):
  """`fn` called (and so traced) under `jax.set_mesh(mesh)`, which
  `batch_parallel` reads."""
  def run(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return run
