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

A config.json is read with the semantics of the modeling code it names
(`hf_family`): for the Llama family (LlamaForCausalLM, NOSA's
SparseLlamaForCausalLM) `rope_scaling` as transformers' rope functions
compute it, `attention_bias` (q/k/v/o and the eviction head's delta) and
`mlp_bias`, no muP (scale_emb & co. are reported and ignored, as that code
ignores them), and NOSA's hard-coded sparse constants (a `sparse_config`
block is reported and ignored, as that code ignores it); for MiniCPM, its
LongRoPE / linear RoPE, muP (scale_emb, scale_depth, dim_model_base, with
MiniCPMConfig's defaults of 1) and attention biases, while its
`sparse_config` (InfLLM-V2 with dense_len and an in-kernel window) is an
error unless the caller passes `sparse=`. Every other math-changing key
that is not implemented is a ValueError naming key and value; unknown keys
are listed in the import report (`convert_hf_config`).

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
  `n_in=0` (a bias) the HF tensor is the JAX one flattened; with
  `n_in=None` both layouts are the same array.
  """

  hf_name: str
  jax_shape: tuple[int, ...]
  n_in: int | None = None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.n_in is None:
      return self.jax_shape
    if self.n_in == 0:
      return (math.prod(self.jax_shape),)
    return (math.prod(self.jax_shape[self.n_in:]),
            math.prod(self.jax_shape[:self.n_in]))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in is None:
      return x
    if self.n_in == 0:
      return x.reshape(-1)
    return x.reshape(self.hf_shape[::-1]).T

  def from_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in is None:
      return x
    if self.n_in == 0:
      return x.reshape(self.jax_shape)
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
    if cfg.attention_bias:
      out.update({
          j + "attn.bq": _Tensor(p + "self_attn.q_proj.bias", (h, d), 0),
          j + "attn.bk": _Tensor(p + "self_attn.k_proj.bias", (k, d), 0),
          j + "attn.bv": _Tensor(p + "self_attn.v_proj.bias", (k, d), 0),
          j + "attn.bo": _Tensor(p + "self_attn.o_proj.bias", (m,), 0),
      })
    if cfg.mlp_bias:
      out.update({
          j + "mlp.b_gate": _Tensor(p + "mlp.gate_proj.bias", (f,), 0),
          j + "mlp.b_up": _Tensor(p + "mlp.up_proj.bias", (f,), 0),
          j + "mlp.b_down": _Tensor(p + "mlp.down_proj.bias", (m,), 0),
      })
    if cfg.sparse.has_eviction_head:
      # §2.2: delta maps concat_h v_h (K-major, as `v.reshape(.., K*D)`)
      # to one logit per KV head; HF stores it as Linear(K*D -> K), with a
      # bias iff attention_bias (upstream `bias=config.attention_bias`).
      out[j + "attn.evict_a"] = _Tensor(p + "self_attn.A", (k,))
      out[j + "attn.evict_delta"] = _Tensor(
          p + "self_attn.delta.weight", (k * d, k), 1)
      if cfg.attention_bias:
        out[j + "attn.evict_delta_b"] = _Tensor(p + "self_attn.delta.bias",
                                                (k,))
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
  to the embedding. Biases load when the config has them (attention_bias:
  q/k/v/o and delta; mlp_bias); without attention_bias an all-zero
  `self_attn.delta.bias` is dropped (it changes nothing). `rotary_emb.inv_freq`
  buffers of old checkpoints are ignored (the config defines RoPE).

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
    if cfg.attention_bias or not cfg.sparse.has_eviction_head:
      break  # in the layout, or an unknown tensor
    if np.any(np.asarray(tensors[name])):
      raise ValueError(f"{name} is nonzero but the config has "
                       "attention_bias=false (upstream's delta has a bias "
                       "iff attention_bias)")
    del tensors[name]
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


# What nosa_jax does with each config.json key, by the modeling code the
# config names (`architectures` / `model_type`):
#   llama:   HF `LlamaForCausalLM` and NOSA's `SparseLlamaForCausalLM`
#            (thunlp/NOSA modeling_llama_nosa.py, built on HF Llama: RoPE
#            through transformers' rope functions, biases from
#            attention_bias / mlp_bias, no muP, sparse constants hard-coded).
#   minicpm: MiniCPM's modeling_minicpm.py (muP scale_emb / scale_depth /
#            dim_model_base, its own LongRoPE, sparse_config read).
# Keys that change no math at inference time.
_NO_MATH_KEYS = frozenset((
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype",
    "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "attention_dropout", "pretraining_tp",
    "max_position_embeddings", "initializer_range", "mup_denominator",
    "_attn_implementation", "_attn_implementation_autoset"))
# Keys read here, per family (the rest of a config is reported as unknown).
_READ_KEYS = frozenset((
    "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "hidden_act", "attention_bias", "mlp_bias", "nosa", "nosa_jax",
    "sparse_config", "scale_emb", "scale_depth", "dim_model_base",
    "original_max_position_embeddings", "partial_rotary_factor"))
_ROPE_KEYS = {
    "default": (), "linear": ("factor",),
    "longrope": ("short_factor", "long_factor", "factor", "attention_factor",
                 "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor", "attention_factor", "beta_fast", "beta_slow",
             "original_max_position_embeddings"),
}


def hf_family(hf: Mapping[str, Any]) -> str:
  """`llama` or `minicpm`: whose modeling code defines this config's math.

  Raises:
    ValueError: an architecture that is neither (its math is unknown here).
  """
  archs = list(hf.get("architectures") or ())
  mtype = hf.get("model_type")
  if mtype == "minicpm" or any(a.startswith("MiniCPM") for a in archs):
    return "minicpm"
  other = [a for a in archs if a not in ("LlamaForCausalLM",
                                         "SparseLlamaForCausalLM")]
  if other or mtype not in (None, "llama"):
    raise ValueError(f"architectures={archs} / model_type={mtype!r}: "
                     "nosa_jax imports the Llama family (LlamaForCausalLM, "
                     "SparseLlamaForCausalLM) and MiniCPMForCausalLM only")
  return "llama"


def hf_config(cfg: config_lib.ModelConfig, *, torch_dtype: str | None = None,
              max_position_embeddings: int = 32768) -> dict[str, Any]:
  """`config.json` in the HF layout, NOSA settings under `"nosa"`.

  The standard keys say what the upstream code needs (rope_scaling,
  attention_bias, mlp_bias, MiniCPM's muP keys); `"nosa_jax"` repeats
  the model fields exactly (RoPE scaling with its derived values, muP
  multipliers), and `model_config_from_hf` reads it first, so an export
  re-imports bit-exactly.

  Args:
    cfg: the model config.
    torch_dtype: the stored weights' dtype (default `cfg.param_dtype`).
    max_position_embeddings: written for HF (32768 as in MiniCPM4-8B).

  Returns:
    A JSON-able dict. `architectures` is `SparseLlamaForCausalLM` (the
    upstream remote-code class) for sparse variants, plain
    `LlamaForCausalLM` for `full`, and `MiniCPMForCausalLM` for a `full`
    model with muP multipliers.

  Raises:
    ValueError: a sparse model with muP multipliers (no upstream class has
      both).
  """
  mup = (cfg.embed_scale, cfg.residual_scale, cfg.logits_scale) != (1, 1, 1)
  if mup and cfg.sparse.is_sparse:
    raise ValueError("embed_scale / residual_scale / logits_scale != 1 with "
                     f"variant {cfg.sparse.variant!r}: SparseLlamaForCausalLM "
                     "has no muP, so no upstream class reads this model")
  if mup:
    arch, mtype = "MiniCPMForCausalLM", "minicpm"
  else:
    arch = ("SparseLlamaForCausalLM" if cfg.sparse.is_sparse
            else "LlamaForCausalLM")
    mtype = "llama"
  rs = cfg.rope_scaling
  rope = None
  if rs.rope_type != "default":
    keys = _ROPE_KEYS[rs.rope_type]
    if rs.rope_type == "longrope":  # factor: max_position / original
      keys = tuple(k for k in keys if k != "factor")
    rope = {"rope_type": rs.rope_type}
    for k in keys:
      v = getattr(rs, k)
      rope[k] = list(v) if isinstance(v, tuple) else v
  out = {
      "architectures": [arch],
      "model_type": mtype,
      "hidden_size": cfg.model_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "vocab_size": cfg.vocab_size,
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": max_position_embeddings,
      "initializer_range": cfg.init_std,
      "torch_dtype": torch_dtype or cfg.param_dtype,
      "hidden_act": "silu",
      "attention_bias": cfg.attention_bias,
      "mlp_bias": cfg.mlp_bias,
      "attention_dropout": 0.0,
      "pretraining_tp": 1,
      "nosa": dataclasses.asdict(cfg.sparse),
      "nosa_jax": {
          "rope_scaling": dataclasses.asdict(rs),
          "embed_scale": cfg.embed_scale,
          "residual_scale": cfg.residual_scale,
          "logits_scale": cfg.logits_scale,
      },
  }
  if mup:
    out.update(scale_emb=cfg.embed_scale,
               scale_depth=cfg.residual_scale * math.sqrt(cfg.num_layers),
               dim_model_base=cfg.logits_scale * cfg.model_dim)
  return out


def _rope_scaling_from_hf(hf: Mapping[str, Any], family: str,
                          head_dim: int, report: list[str]
                          ) -> config_lib.RopeScaling:
  """RopeScaling with the values the family's upstream code derives."""
  rs = hf.get("rope_scaling")
  if not rs:
    return config_lib.RopeScaling()
  if not isinstance(rs, Mapping):
    raise ValueError(f"rope_scaling={rs!r} is not an object")
  rs = dict(rs)
  rtype = rs.pop("rope_type", None) or rs.pop("type", None)
  rs.pop("type", None)
  if rtype not in _ROPE_KEYS or (family == "minicpm" and rtype not in
                                 ("default", "linear", "longrope")):
    raise ValueError(
        f"rope_scaling.rope_type={rtype!r} is not implemented for the "
        f"{family} family (implemented: "
        f"{', '.join(_ROPE_KEYS) if family == 'llama' else 'linear, longrope'}"
        "; 'dynamic' rescales by the lengths upstream has cached so far)")
  unknown = sorted(set(rs) - set(_ROPE_KEYS[rtype]))
  if unknown:
    raise ValueError(f"rope_scaling.{unknown[0]}={rs[unknown[0]]!r} "
                     f"({rtype}) is not implemented")
  max_pos = int(hf.get("max_position_embeddings") or 0)
  orig = int(rs.get("original_max_position_embeddings")
             or hf.get("original_max_position_embeddings") or max_pos)
  kw: dict[str, Any] = {"rope_type": rtype}
  if rtype in ("linear", "llama3", "yarn"):
    kw["factor"] = float(rs["factor"])
  if rtype in ("llama3", "yarn"):
    kw["original_max_position_embeddings"] = orig
  if rtype == "llama3":
    kw.update(low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
              high_freq_factor=float(rs.get("high_freq_factor", 4.0)))
  if rtype == "yarn":
    if rs.get("original_max_position_embeddings") and max_pos and (
        kw["factor"] != max_pos / orig):
      raise ValueError(
          f"rope_scaling.factor={kw['factor']} != max_position_embeddings / "
          f"original_max_position_embeddings = {max_pos}/{orig}: "
          "transformers versions disagree on which yarn uses")
    f = kw["factor"]
    kw.update(beta_fast=float(rs.get("beta_fast", 32.0)),
              beta_slow=float(rs.get("beta_slow", 1.0)),
              attention_factor=float(rs.get("attention_factor") or (
                  0.1 * math.log(f) + 1.0 if f > 1 else 1.0)))
  if rtype == "longrope":
    if not orig:
      raise ValueError("rope_scaling longrope needs "
                       "original_max_position_embeddings")
    kw.update(short_factor=tuple(rs["short_factor"]),
              long_factor=tuple(rs["long_factor"]),
              original_max_position_embeddings=orig)
    if len(kw["short_factor"]) != head_dim // 2:
      raise ValueError(f"rope_scaling.short_factor has "
                       f"{len(kw['short_factor'])} entries; head_dim "
                       f"{head_dim} needs {head_dim // 2}")
    if family == "minicpm":
      # MiniCPMLongRoPE: cos / sin times sqrt(1 + ln(s) / ln(orig)), s =
      # max_position_embeddings / orig; the long factors once its cache
      # (first built for max_position_embeddings) exceeds orig.
      scale = max_pos / orig
      att = 1 + math.log(scale) / math.log(orig)
      if att <= 0:
        raise ValueError(f"max_position_embeddings={max_pos} gives "
                         "MiniCPM's LongRoPE a non-real attention factor")
      kw.update(attention_factor=math.sqrt(att),
                long_factor_above=0 if max_pos > orig else orig)
    else:
      # transformers' longrope: f = rope_scaling.factor, else max_pos /
      # orig; cos / sin times sqrt(1 + ln f / ln orig) (1 if f <= 1)
      # unless attention_factor is given. LlamaForCausalLM's RoPE module
      # re-selects the factor set each forward pass (long for sequences
      # longer than orig). NOSA's SparseLlamaForCausalLM carries its own
      # copy of that module (transformers 4.45 era), which re-selects only
      # for "dynamic" types: the set chosen when it is built stays, long
      # iff f > 1.
      f = float(rs["factor"]) if rs.get("factor") else max_pos / orig
      att = rs.get("attention_factor")
      sparse_llama = "SparseLlamaForCausalLM" in (hf.get("architectures")
                                                  or ())
      above = (0 if f > 1 else config_lib.NEVER) if sparse_llama else orig
      kw.update(attention_factor=float(att) if att else (
          math.sqrt(1 + math.log(f) / math.log(orig)) if f > 1 else 1.0),
                long_factor_above=above)
  out = config_lib.RopeScaling(**kw)
  when = ""
  if rtype == "longrope":
    when = (", long factors always" if out.long_factor_above == 0 else
            ", short factors always" if out.long_factor_above
            == config_lib.NEVER else
            f", long factors above {out.long_factor_above} tokens")
  report.append(f"rope_scaling: {rtype} as the {family} code computes it "
                f"(attention_factor={out.attention_factor:.6g}{when})")
  return out


def _sparse_from_hf(hf: Mapping[str, Any], family: str,
                    report: list[str]) -> config_lib.SparseConfig:
  """SparseConfig by the family's semantics (NOSA_SPEC.md §1.1).

  Our own `nosa` block (an export of nosa_jax) is read as written. For the
  llama family the architecture picks `nosa` (SparseLlamaForCausalLM) or
  `full` with the constants NOSA's code hard-codes (SparseConfig's
  defaults); a `sparse_config` block is ignored, as that code ignores it.
  MiniCPM's `sparse_config` (InfLLM-V2 with dense_len, a sliding window
  inside the kernel and optional NoPE scoring) has no exact nosa_jax
  equivalent: it is an error unless the caller passes `sparse=`.
  """
  if isinstance(hf.get("nosa"), Mapping):
    d = dict(hf["nosa"])
    known = {f.name for f in dataclasses.fields(config_lib.SparseConfig)}
    if set(d) - known:
      report.append(f"nosa: ignored unknown fields {sorted(set(d) - known)}")
    report.append("sparse: the config's nosa block (a nosa_jax export)")
    return config_lib.SparseConfig(**{k: v for k, v in d.items()
                                      if k in known})
  sc = hf.get("sparse_config")
  if family == "minicpm":
    if sc:
      raise ValueError(
          f"sparse_config={dict(sc)!r}: MiniCPM's InfLLM-V2 (dense below "
          "dense_len, a sliding window inside the kernel, use_nope scoring) "
          "is not implemented; pass sparse=SparseConfig(variant='full') to "
          "run it dense (what MiniCPM does below dense_len) or another "
          "SparseConfig to choose an approximation yourself")
    report.append("sparse: full (MiniCPM without sparse_config is dense)")
    return config_lib.SparseConfig(variant="full")
  sparse_arch = "SparseLlamaForCausalLM" in (hf.get("architectures") or ())
  if sc:
    report.append("sparse_config: ignored, as NOSA's modeling code ignores "
                  f"it ({dict(sc)})")
  if sparse_arch:
    report.append("sparse: nosa with the constants NOSA's modeling code "
                  "hard-codes (block 64, compression 32/16, top-k 64, "
                  "query top-k 33, 1 sink block, 16 window blocks)")
    return config_lib.SparseConfig(variant="nosa")
  report.append("sparse: full (LlamaForCausalLM is dense)")
  return config_lib.SparseConfig(variant="full")


def convert_hf_config(hf: Mapping[str, Any], **overrides
                      ) -> tuple[config_lib.ModelConfig, list[str]]:
  """ModelConfig from an HF `config.json` dict, and the import report.

  The math follows the modeling code the config names (`hf_family`):
  RoPE scaling, biases, muP and the sparse constants as that code applies
  them. A key that changes the math and is not implemented raises a
  ValueError naming key and value; keys nosa_jax does not know are
  ignored and listed in the report.

  Args:
    hf: the parsed `config.json`.
    **overrides: ModelConfig fields to set (e.g. `param_dtype`, `sparse`);
      an overridden field's key is not checked.

  Returns:
    (the validated ModelConfig, report lines).
  """
  report: list[str] = []
  family = hf_family(hf)
  report.append(f"family: {family} ({hf.get('architectures')}, "
                f"model_type={hf.get('model_type')!r})")
  required = ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "vocab_size")
  absent = [k for k in required if k not in hf]
  if absent:
    raise ValueError(f"config.json lacks {', '.join(absent)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: "
                     "nosa_jax's MLP is SwiGLU (silu)")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"partial_rotary_factor={hf['partial_rotary_factor']!r}"
                     " is not implemented (RoPE rotates the whole head)")
  m, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or m // h)
  if family == "minicpm" and head_dim != m // h:
    raise ValueError(f"head_dim={hf['head_dim']!r}: MiniCPM's code uses "
                     f"hidden_size // num_attention_heads = {m // h}")
  layers = int(hf["num_hidden_layers"])
  mup = {}
  if family == "minicpm":
    # MiniCPMConfig's defaults are 1 for all three; dim_model_base = 1
    # divides the LM-head input by hidden_size.
    scale_emb = float(hf.get("scale_emb", 1))
    scale_depth = float(hf.get("scale_depth", 1))
    base = float(hf.get("dim_model_base", 1))
    mup = dict(embed_scale=scale_emb,
               residual_scale=scale_depth / math.sqrt(layers),
               logits_scale=base / m)
    report.append(f"muP: scale_emb={scale_emb}, scale_depth={scale_depth}, "
                  f"dim_model_base={base} applied as MiniCPM does")
    if hf.get("mlp_bias"):
      report.append("mlp_bias: ignored (MiniCPM's MLP has no bias)")
  else:
    ignored = [k for k in ("scale_emb", "scale_depth", "dim_model_base")
               if k in hf]
    if ignored:
      report.append(f"{', '.join(ignored)}: ignored, as the Llama code "
                    "ignores them")
  exact = hf.get("nosa_jax") if isinstance(hf.get("nosa_jax"),
                                           Mapping) else None
  if exact is not None:
    rope = config_lib.RopeScaling(**exact.get("rope_scaling", {}))
    mup = {k: float(exact[k]) for k in ("embed_scale", "residual_scale",
                                        "logits_scale") if k in exact}
    report.append("rope_scaling, muP: the config's nosa_jax block (exact)")
  elif "rope_scaling" in overrides:
    rope = overrides["rope_scaling"]
  else:
    rope = _rope_scaling_from_hf(hf, family, head_dim, report)
  tie_default = family == "minicpm"  # MiniCPMConfig ties by default
  kwargs = dict(
      vocab_size=int(hf["vocab_size"]), num_layers=layers, model_dim=m,
      num_heads=h, num_kv_heads=int(hf.get("num_key_value_heads") or h),
      head_dim=head_dim, mlp_dim=int(hf["intermediate_size"]),
      rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=rope,
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
      init_std=float(hf.get("initializer_range", 0.02)),
      attention_bias=bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)) and family == "llama",
      **mup)
  if "sparse" not in overrides:
    kwargs["sparse"] = _sparse_from_hf(hf, family, report)
  unknown = sorted(set(hf) - _READ_KEYS - _NO_MATH_KEYS)
  if unknown:
    report.append(f"ignored unknown keys: {', '.join(unknown)}")
  if overrides:
    report.append(f"overridden: {', '.join(sorted(overrides))}")
  kwargs.update(overrides)
  return config_lib.ModelConfig(**kwargs), report


def model_config_from_hf(hf: Mapping[str, Any],
                         **overrides) -> config_lib.ModelConfig:
  """`convert_hf_config` with its report logged (one line each)."""
  cfg, report = convert_hf_config(hf, **overrides)
  for line in report:
    logging.info("config.json import: %s", line)
  return cfg


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


def import_hf(path: str, *, report: list[str] | None = None,
              **overrides) -> tuple[config_lib.ModelConfig, Any]:
  """(ModelConfig, params) from an HF directory (config.json + weights).

  Args:
    path: a directory with `config.json` and `model.safetensors` (or a
      sharded `model.safetensors.index.json`).
    report: if given, the import report (`convert_hf_config`) is appended
      to it; it is logged either way.
    **overrides: ModelConfig fields to override (e.g. `sparse=` for other
      selection constants than the architecture's).
  """
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
  with open(config_path) as f:
    cfg, lines = convert_hf_config(json.load(f), **overrides)
  for line in lines:
    logging.info("config.json import: %s", line)
  if report is not None:
    report.extend(lines)
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

  Without `step`, a newest checkpoint that does not restore is reported in
  one line and skipped for the next older one; it is left in place (the
  next training run sets it aside).

  Args:
    workdir: holds `config.json` and `checkpoints/<step>/`.
    step: the checkpoint step (default: the newest that restores).

  Raises:
    FileNotFoundError: no config.json, no checkpoint, or no such step.
    checkpoint.CheckpointError: no checkpoint restores (or `step` does not).
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
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; "
                            f"steps: {', '.join(map(str, steps))}")
  # The params subtree as orbax stored it inside Checkpointer's `state`.
  abstract = _with_sharding(model_lib.abstract_params(cfg.model)[1])
  item = {"params": ocp.tree.serialize_tree(abstract)}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
  for s in [step] if step is not None else reversed(steps):
    step_dir = os.path.join(ckpt_dir, str(s))
    try:
      with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(item, restore_args=restore_args,
                                        partial_restore=True))
      return cfg, ocp.tree.deserialize_tree(out["params"], abstract), s
    except Exception as e:  # pylint: disable=broad-except
      cause = checkpoint_lib.failure_cause(e, step_dir)
      if step is not None:
        raise checkpoint_lib.CheckpointError(
            f"checkpoint step {s} in {ckpt_dir} does not restore ({cause})"
        ) from None
      logging.warning("checkpoint step %d in %s does not restore (%s); "
                      "using the next older step", s, ckpt_dir, cause)
  raise checkpoint_lib.CheckpointError(f"no checkpoint in {ckpt_dir} "
                                       "restores")


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
