"""Checkpoint export/import: Hugging Face safetensors and params-only orbax.

The HF layout is the one of the released NOSA checkpoints (NOSA_SPEC.md §1):
a Llama state dict (`model.layers.{i}.self_attn.q_proj.weight`, ...) plus,
for the `dma` / `nosa` variants, the eviction head of §2.2 per layer,
`self_attn.A` [K] and `self_attn.delta.weight` [K, K*D]. Linear weights are
stored in torch `nn.Linear` layout [out, in].

RoPE needs no weight permutation: `layers.apply_rope` is the NeoX
rotate-half convention, the same as HF Llama (and the upstream
`modeling_llama_nosa.py`), so HF q/k projections load as they are. (Only
Meta's original Llama checkpoints interleave pairs and need a permutation;
HF's own converter has already applied it.)

safetensors is read and written here with numpy alone (no torch, no
`safetensors` package): an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` with an optional
`"__metadata__"` string map, then the raw little-endian tensor bytes, offsets
counted from the end of the header.

A `tokenizer.json` in an export directory is left alone;
`data.load_tokenizer(out_dir)` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from nosa_jax import checkpoint as checkpoint_lib
from nosa_jax import config as config_lib
from nosa_jax import model as model_lib

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_DTYPES = ("bfloat16", "float32", "float16")

# ----------------------------------------------------------------------------
# safetensors, with numpy only.
# ----------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Keyed by dtype name so that byte order does not matter for the lookup.
_ST_CODES = {dt.name: code for code, dt in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file, a sharded checkpoint, or a directory of either.

  Args:
    path: a `.safetensors` file; a `model.safetensors.index.json` (sharded:
      its `weight_map` names the shard of every tensor); or a directory
      holding `model.safetensors` or that index.

  Returns:
    name -> array. Arrays are read-only views of a memory map, so an 8B
    checkpoint is not read into memory until its tensors are used.

  Raises:
    FileNotFoundError: nothing to read at `path`.
    ValueError: a malformed file (the message names file and tensor).
  """
  if os.path.isdir(path):
    for name in (WEIGHTS_FILE, INDEX_FILE):
      if os.path.isfile(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise FileNotFoundError(
          f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such safetensors file: {path}")
  if path.endswith(".json"):
    return _read_sharded(path)
  return _read_one(path)


def _read_one(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  if size < 8:
    raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
      raise ValueError(f"{path}: header length {header_len} exceeds the "
                       f"file ({size} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: header is not a JSON object")
  header.pop("__metadata__", None)
  start, data_len = 8 + header_len, size - 8 - header_len
  buf = (np.memmap(path, np.uint8, "r", offset=start, shape=(data_len,))
         if data_len else np.zeros((0,), np.uint8))
  out = {}
  for name, info in header.items():
    try:
      dtype = _ST_DTYPES[info["dtype"]].newbyteorder("<")
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: tensor {name!r} has a bad header entry "
                       f"{info!r} ({type(e).__name__}: {e})") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_len or end - begin != nbytes:
      raise ValueError(
          f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], "
          f"expected {nbytes} bytes within [0, {data_len}]")
    out[name] = buf[begin:end].view(dtype).reshape(shape)
  return out


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index_path}: no weight_map object")
  root, out = os.path.dirname(index_path), {}
  for shard in sorted(set(weight_map.values())):
    tensors = _read_one(os.path.join(root, shard))
    absent = sorted(n for n, s in weight_map.items()
                    if s == shard and n not in tensors)
    if absent:
      raise ValueError(f"{index_path}: {shard} lacks {', '.join(absent)}")
    twice = sorted(set(tensors) & set(out))
    if twice:
      raise ValueError(f"{index_path}: {', '.join(twice)} in several shards")
    out.update(tensors)
  return out


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` as one safetensors file, atomically.

  The file goes to a temporary name in the same directory and is renamed
  into place once complete, so a killed process never leaves half a file.

  Args:
    path: destination file.
    tensors: name -> array (numpy, or anything `np.asarray` takes).
    metadata: optional `__metadata__` strings (HF `transformers` wants
      `{"format": "pt"}`).

  Raises:
    ValueError: an unsupported dtype, a non-string metadata entry, or a
      tensor named `__metadata__`.
  """
  header: dict[str, Any] = {}
  if metadata:
    bad = sorted(k for k, v in metadata.items()
                 if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
      raise ValueError(f"safetensors metadata must map str to str; bad keys: "
                       f"{', '.join(map(str, bad))}")
    header["__metadata__"] = dict(metadata)
  arrays, offset = [], 0
  for name in sorted(tensors):
    if name == "__metadata__":
      raise ValueError("a tensor may not be named __metadata__")
    a = np.asarray(tensors[name])
    code = _ST_CODES.get(a.dtype.name)
    if code is None:
      raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which "
                       "safetensors cannot store")
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    a = np.require(a, requirements="C")  # keeps 0-d (ascontiguousarray: 1-d)
    header[name] = {"dtype": code, "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.reshape(-1).view(np.uint8).data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------
# JAX params <-> HF Llama state dict.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One parameter: its HF name and how the two layouts relate.

  A JAX weight of shape `jax_shape = in_axes + out_axes` (`n_in` leading
  input axes) is the HF [prod(out), prod(in)] matrix transposed; with
  `n_in=None` both layouts are the same array.
  """

  hf_name: str
  jax_shape: tuple[int, ...]
  n_in: int | None = None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.n_in is None:
      return self.jax_shape
    return (math.prod(self.jax_shape[self.n_in:]),
            math.prod(self.jax_shape[:self.n_in]))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in is None:
      return x
    return x.reshape(self.hf_shape[::-1]).T

  def from_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in is None:
      return x
    return x.T.reshape(self.jax_shape)


def _layout(cfg: config_lib.ModelConfig) -> dict[str, _Tensor]:
  """JAX parameter path (`blocks.0.attn.wq`) -> its HF tensor."""
  m, h, k, d = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, v = cfg.mlp_dim, cfg.vocab_size
  out = {"embed": _Tensor("model.embed_tokens.weight", (v, m)),
         "final_norm.scale": _Tensor("model.norm.weight", (m,))}
  if not cfg.tie_embeddings:
    out["lm_head"] = _Tensor("lm_head.weight", (m, v), 1)
  for i in range(cfg.num_layers):
    j, p = f"blocks.{i}.", f"model.layers.{i}."
    out.update({
        j + "attn.wq": _Tensor(p + "self_attn.q_proj.weight", (m, h, d), 1),
        j + "attn.wk": _Tensor(p + "self_attn.k_proj.weight", (m, k, d), 1),
        j + "attn.wv": _Tensor(p + "self_attn.v_proj.weight", (m, k, d), 1),
        j + "attn.wo": _Tensor(p + "self_attn.o_proj.weight", (h, d, m), 2),
        j + "attn_norm.scale": _Tensor(p + "input_layernorm.weight", (m,)),
        j + "mlp_norm.scale": _Tensor(
            p + "post_attention_layernorm.weight", (m,)),
        j + "mlp.w_gate": _Tensor(p + "mlp.gate_proj.weight", (m, f), 1),
        j + "mlp.w_up": _Tensor(p + "mlp.up_proj.weight", (m, f), 1),
        j + "mlp.w_down": _Tensor(p + "mlp.down_proj.weight", (f, m), 1),
    })
    if cfg.sparse.has_eviction_head:
      # §2.2: delta maps concat_h v_h (K-major, as `v.reshape(.., K*D)`)
      # to one logit per KV head; HF stores it as Linear(K*D -> K).
      out[j + "attn.evict_a"] = _Tensor(p + "self_attn.A", (k,))
      out[j + "attn.evict_delta"] = _Tensor(
          p + "self_attn.delta.weight", (k * d, k), 1)
  return out


def _path_key(path) -> str:
  """`blocks.0.attn.wq` from a pytree key path, minus the Variable `.value`."""
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    else:
      parts.append(str(entry))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def _check_keys(got, want, what: str) -> None:
  unknown, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
  parts = []
  if unknown:
    parts.append(f"unknown {what}: {', '.join(unknown)}")
  if missing:
    parts.append(f"missing {what}: {', '.join(missing)}")
  if parts:
    raise ValueError("; ".join(parts))


def to_hf_state_dict(params: Any, cfg: config_lib.ModelConfig,
                     dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The HF Llama (+ NOSA eviction head) state dict of `params`.

  Args:
    params: the model parameters (`model.init(cfg, seed)[1]`, a restored
      checkpoint's `state["params"]`, or the same tree as plain dicts).
    cfg: the model config the parameters belong to.
    dtype: storage dtype of the returned arrays (`np.float32`, `"bfloat16"`).

  Returns:
    HF name -> numpy array in torch Linear layout [out, in], e.g.
    `model.layers.0.self_attn.q_proj.weight` [H*D, M]; `lm_head.weight`
    [V, M] only when the embeddings are untied.

  Raises:
    ValueError: `params` does not have the parameters `cfg` implies.
  """
  dtype = jnp.dtype(dtype)
  layout = _layout(cfg)
  flat = {_path_key(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  _check_keys(flat, layout, "parameters for this config")
  out = {}
  for key, t in layout.items():
    x = np.asarray(flat[key])
    if x.shape != t.jax_shape:
      raise ValueError(f"parameter {key}: expected shape {t.jax_shape}, got "
                       f"{x.shape}")
    out[t.hf_name] = np.ascontiguousarray(t.to_hf(x).astype(dtype))
  return out


def _unfuse(tensors: dict[str, Any], cfg: config_lib.ModelConfig) -> None:
  """Splits fused `qkv_proj` / `gate_up_proj` weights in place."""
  hd = cfg.num_heads * cfg.head_dim
  kd = cfg.num_kv_heads * cfg.head_dim
  f = cfg.mlp_dim
  fused = {"self_attn.qkv_proj.weight": (
               ("self_attn.q_proj.weight", hd),
               ("self_attn.k_proj.weight", kd),
               ("self_attn.v_proj.weight", kd)),
           "mlp.gate_up_proj.weight": (
               ("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f))}
  for name in sorted(tensors):
    prefix, _, suffix = name.rpartition(".layers.")
    idx, _, rest = suffix.partition(".")
    if not prefix or rest not in fused:
      continue
    base = f"{prefix}.layers.{idx}."
    parts = fused[rest]
    x = tensors.pop(name)
    want = (sum(rows for _, rows in parts), cfg.model_dim)
    if np.shape(x) != want:
      raise ValueError(f"shape mismatch: {name} expected {want} got "
                       f"{np.shape(x)}")
    start = 0
    for part, rows in parts:
      if base + part in tensors:
        raise ValueError(f"{name} and {base + part} are both given")
      tensors[base + part] = x[start:start + rows]
      start += rows


def from_hf_state_dict(tensors: Mapping[str, Any],
                       cfg: config_lib.ModelConfig) -> Any:
  """Model parameters for `cfg` from an HF Llama / NOSA state dict.

  Accepts split `q/k/v_proj` or a fused `qkv_proj.weight` [H*D + 2*K*D, M],
  split `gate/up_proj` or a fused `gate_up_proj.weight` [2F, M] (gate
  first). With `cfg.tie_embeddings`, `lm_head.weight` may be absent or equal
  to the embedding. A zero `self_attn.delta.bias` (upstream's
  `attention_bias=True` eviction head) is dropped; `rotary_emb.inv_freq`
  buffers of old checkpoints are ignored.

  Args:
    tensors: HF name -> array (e.g. `read_safetensors(path)`).
    cfg: the model config to load into.

  Returns:
    An `nnx.State` with exactly the structure of `model.init(cfg, 0)[1]`,
    arrays in `cfg.param_dtype`.

  Raises:
    ValueError: unknown or missing tensors (one message listing all of
      them), or tensors of the wrong shape (naming expected and got shape).
  """
  tensors = {n: x for n, x in tensors.items()
             if not n.endswith("rotary_emb.inv_freq")}
  _unfuse(tensors, cfg)
  for name in sorted(n for n in tensors if n.endswith("self_attn.delta.bias")):
    if cfg.sparse.has_eviction_head and not np.any(np.asarray(tensors[name])):
      del tensors[name]
    elif cfg.sparse.has_eviction_head:
      raise ValueError(f"{name} is nonzero: nosa_jax's eviction head has no "
                       "bias (attention_bias=false)")
  embed = tensors.get("model.embed_tokens.weight")
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    if embed is None or not np.array_equal(head, embed):
      raise ValueError("lm_head.weight differs from model.embed_tokens.weight "
                       "but the config ties them (tie_embeddings=True)")
  layout = _layout(cfg)
  by_name = {t.hf_name: key for key, t in layout.items()}
  _check_keys(tensors, by_name, "tensors")
  bad = [f"{n} expected {layout[k].hf_shape} got {np.shape(tensors[n])}"
         for n, k in sorted(by_name.items())
         if np.shape(tensors[n]) != layout[k].hf_shape]
  if bad:
    raise ValueError(f"shape mismatch: {'; '.join(bad)}")
  values = {key: layout[key].from_hf(np.asarray(tensors[name]))
            for name, key in by_name.items()}
  _, abstract = model_lib.abstract_params(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(values[_path_key(p)], s.dtype), abstract)


# ----------------------------------------------------------------------------
# config.json.
# ----------------------------------------------------------------------------


def hf_config(cfg: config_lib.ModelConfig, *, torch_dtype: str | None = None,
              max_position_embeddings: int = 32768) -> dict[str, Any]:
  """`config.json` in the HF Llama layout, NOSA settings under `"nosa"`.

  Args:
    cfg: the model config.
    torch_dtype: the stored weights' dtype (default `cfg.param_dtype`).
    max_position_embeddings: written for HF; plain RoPE does not depend on
      it (32768 as in MiniCPM4-8B).

  Returns:
    A JSON-able dict. `architectures` is `SparseLlamaForCausalLM` (the
    upstream remote-code class) for sparse variants and plain
    `LlamaForCausalLM` for `full`, which `transformers` loads without
    remote code.
  """
  arch = ("SparseLlamaForCausalLM" if cfg.sparse.is_sparse
          else "LlamaForCausalLM")
  return {
      "architectures": [arch],
      "model_type": "llama",
      "hidden_size": cfg.model_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "vocab_size": cfg.vocab_size,
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": max_position_embeddings,
      "initializer_range": cfg.init_std,
      "torch_dtype": torch_dtype or cfg.param_dtype,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "attention_dropout": 0.0,
      "pretraining_tp": 1,
      "nosa": dataclasses.asdict(cfg.sparse),
  }


def _sparse_from_hf(hf: Mapping[str, Any]) -> config_lib.SparseConfig:
  """SparseConfig from our `nosa` block, or a MiniCPM `sparse_config`.

  Without either, the architecture name picks `nosa` or `full` with the
  paper's constants (SparseConfig's defaults), which the released NOSA code
  hard-codes instead of reading them from config.json.
  """
  if isinstance(hf.get("nosa"), Mapping):
    d = dict(hf["nosa"])
    known = {f.name for f in dataclasses.fields(config_lib.SparseConfig)}
    if set(d) - known:
      logging.warning("config.json: ignoring unknown nosa fields %s",
                      sorted(set(d) - known))
    return config_lib.SparseConfig(**{k: v for k, v in d.items()
                                      if k in known})
  sparse_arch = any("Sparse" in a for a in hf.get("architectures") or ())
  sc = hf.get("sparse_config")
  if not isinstance(sc, Mapping):
    return config_lib.SparseConfig(variant="nosa" if sparse_arch else "full")
  # MiniCPM4 / InfLLM-V2 names: window_size is in tokens; the query-aware
  # top-k is sink + window + 16 (`select_blocks`, NOSA_SPEC.md §2.0).
  block = int(sc.get("block_size", 64))
  sink, topk = int(sc.get("init_blocks", 1)), int(sc.get("topk", 64))
  window = int(sc.get("window_size", 1024)) // block
  return config_lib.SparseConfig(
      variant="nosa" if sparse_arch else "infllmv2", block_size=block,
      compress_kernel=int(sc.get("kernel_size", 32)),
      compress_stride=int(sc.get("kernel_stride", 16)), topk_blocks=topk,
      query_topk_blocks=min(topk, sink + window + 16), sink_blocks=sink,
      window_blocks=window)


def model_config_from_hf(hf: Mapping[str, Any],
                         **overrides) -> config_lib.ModelConfig:
  """ModelConfig from an HF `config.json` dict (ours or a released one).

  Unknown keys are ignored. `rope_scaling` (MiniCPM4's LongRoPE) and
  MiniCPM μP keys (`scale_emb`, ...) are logged as not implemented.

  Args:
    hf: the parsed `config.json`.
    **overrides: ModelConfig fields to set (e.g. `param_dtype`, `sparse`).

  Returns:
    The validated ModelConfig.

  Raises:
    ValueError: required keys are absent or the architecture is outside
      what nosa_jax models (biases, a non-SiLU MLP).
  """
  required = ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "vocab_size")
  absent = [k for k in required if k not in hf]
  if absent:
    raise ValueError(f"config.json lacks {', '.join(absent)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: "
                     "nosa_jax's MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"{key}=true is not supported: nosa_jax's "
                       "projections have no bias")
  if hf.get("rope_scaling"):
    logging.warning("config.json: rope_scaling %s is not implemented "
                    "(LongRoPE); using plain RoPE with theta=%s",
                    hf["rope_scaling"], hf.get("rope_theta", 10000.0))
  for key in ("scale_emb", "scale_depth", "dim_model_base"):
    if hf.get(key) not in (None, 1, 1.0):
      logging.warning("config.json: %s=%s (MiniCPM muP scaling) is not "
                      "implemented and is ignored", key, hf[key])
  m, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  kwargs = dict(
      vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]), model_dim=m, num_heads=h,
      num_kv_heads=int(hf.get("num_key_value_heads") or h),
      head_dim=int(hf.get("head_dim") or m // h),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
      sparse=_sparse_from_hf(hf))
  kwargs.update(overrides)
  return config_lib.ModelConfig(**kwargs)


# ----------------------------------------------------------------------------
# Directories: HF export/import, training workdirs, params-only orbax.
# ----------------------------------------------------------------------------


def export_hf(params: Any, cfg: config_lib.ModelConfig, out_dir: str,
              dtype: str = "bfloat16") -> list[str]:
  """Writes `out_dir/model.safetensors` and `out_dir/config.json`.

  Args:
    params: model parameters for `cfg`.
    cfg: their model config.
    out_dir: created if needed; other files in it (a `tokenizer.json`) are
      left alone.
    dtype: `bfloat16` (as released checkpoints), `float32` or `float16`.

  Returns:
    The paths written.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r} is invalid: must be one of "
                     f"{', '.join(EXPORT_DTYPES)}")
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, WEIGHTS_FILE)
  write_safetensors(weights, to_hf_state_dict(params, cfg, dtype),
                    metadata={"format": "pt"})
  config_path = os.path.join(out_dir, CONFIG_FILE)
  checkpoint_lib.write_json_atomic(config_path,
                                   hf_config(cfg, torch_dtype=dtype))
  return [weights, config_path]


def import_hf(path: str, **overrides) -> tuple[config_lib.ModelConfig, Any]:
  """(ModelConfig, params) from an HF directory (config.json + weights).

  Args:
    path: a directory with `config.json` and `model.safetensors` (or a
      sharded `model.safetensors.index.json`).
    **overrides: ModelConfig fields to override (see model_config_from_hf).
  """
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
  with open(config_path) as f:
    cfg = model_config_from_hf(json.load(f), **overrides)
  return cfg, from_hf_state_dict(read_safetensors(path), cfg)


def _with_sharding(abstract: Any) -> Any:
  """Abstract arrays placed on the first device (orbax restores to it)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      abstract)


def load_workdir(workdir: str, step: int | None = None
                 ) -> tuple[config_lib.ExperimentConfig, Any, int]:
  """(ExperimentConfig, params, step) from a `train_and_evaluate` workdir.

  Only the parameters are read from the checkpoint's `state` item (orbax
  partial restore), not the optimizer moments, so an 8B export needs the
  memory of the parameters alone. The directory is only read: unlike
  `checkpoint.Checkpointer`, nothing is created or cleaned up, so this is
  safe while the training run is still writing checkpoints.

  Args:
    workdir: holds `config.json` and `checkpoints/<step>/`.
    step: the checkpoint step (default: the latest finished one).

  Raises:
    FileNotFoundError: no config.json, no checkpoint, or no such step.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"no {CONFIG_FILE} in {workdir}: not a training workdir")
  with open(config_path) as f:
    cfg = config_lib.ExperimentConfig.from_dict(json.load(f))
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = (sorted(ocp.path.step.checkpoint_steps(ckpt_dir))
           if os.path.isdir(ckpt_dir) else [])
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; "
                            f"steps: {', '.join(map(str, steps))}")
  # The params subtree as orbax stored it inside Checkpointer's `state`.
  abstract = _with_sharding(model_lib.abstract_params(cfg.model)[1])
  item = {"params": ocp.tree.serialize_tree(abstract)}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(
        os.path.join(ckpt_dir, str(step), "state"),
        args=ocp.args.PyTreeRestore(item, restore_args=restore_args,
                                    partial_restore=True))
  return cfg, ocp.tree.deserialize_tree(out["params"], abstract), step


def export_orbax_params(params: Any, out_dir: str) -> str:
  """Writes a params-only orbax checkpoint; `load_orbax_params` reads it."""
  out_dir = os.path.abspath(out_dir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, params, force=True)
    ckptr.wait_until_finished()
  return out_dir


def load_orbax_params(path: str, cfg: config_lib.ModelConfig) -> Any:
  """Params of `cfg` from an `export_orbax_params` directory."""
  abstract = _with_sharding(model_lib.abstract_params(cfg)[1])
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path), abstract)
