"""SPMD: a named (data, fsdp, tensor) mesh and logical axis rules.

The model code is unchanged by sharding: parameters get a `NamedSharding`
from their *logical* axes (named by parameter, below) through one rule
table, the batch is split over (data, fsdp), and XLA's SPMD partitioner
propagates the rest. A dimension that the mesh axis does not divide is
replicated instead (e.g. 2 KV heads on a tensor axis of 4), so any mesh
that multiplies to the device count works.

Multi-host: every process builds the same global batch order and feeds only
its own rows (`global_batch`), orbax saves and restores sharded arrays from
all hosts, and restoring into a state laid out on another mesh reshards.

The per-device memory estimate of a mesh (`--dry_run`) is in `memory_plan`,
which imports this module and the model; this module imports neither.
"""

from __future__ import annotations

import math
from typing import Any

import jax
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
    # Biases (attention_bias / mlp_bias).
    "bq": ("heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    "bo": ("embed",),
    "b_gate": ("mlp",),
    "b_up": ("mlp",),
    "b_down": ("embed",),
    "evict_delta_b": ("kv_heads",),
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


def leaf_name(path) -> str:
  """The parameter name of a pytree leaf path (its last string key)."""
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
    axes = PARAM_AXES[leaf_name(path)]
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
