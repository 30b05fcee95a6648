"""hf_io: safetensors bytes, HF layout round trips, errors, the export CLI.

The HF state dicts here are built by hand from the JAX params (numpy
transposes, no torch, independent of `to_hf_state_dict`), and a numpy HF
Llama forward pass checks that they really are the HF layout: torch Linear
[out, in], rotate-half RoPE without permutation, `repeat_kv` head order.
"""

import functools
import json
import os
import shutil
import struct
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from flax import nnx
import ml_dtypes
import numpy as np

from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import hf_io
from nosa_jax import model
from nosa_jax import selection
from nosa_jax import testing
from nosa_jax import train
from nosa_jax.inference import engine
from nosa_jax.inference import stores
from tests import tolerances

REPO = __file__.rsplit("/tests/", 1)[0]
BF16 = np.dtype(ml_dtypes.bfloat16)

_VARIANTS = (("full_untied", "full", False), ("full_tied", "full", True),
             ("nosa_untied", "nosa", False), ("nosa_tied", "nosa", True))


def _random_params(cfg, seed=0):
  """Params with every leaf random (A != 0, so the eviction head counts)."""
  _, params = model.init(cfg, seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  new = [(1.0 if x.ndim == 1 else 0.0)
         + 0.05 * jax.random.normal(k, x.shape, x.dtype)
         for k, x in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(treedef, new)


def _hand_hf(params, cfg, fused=False):
  """The HF state dict of `params`, written out with numpy by hand."""
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  m, h, k, d = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  sd = {"model.embed_tokens.weight": p["embed"],
        "model.norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = p["lm_head"].T  # [M, V] -> [V, M]
  for i in range(cfg.num_layers):
    b, pre = p["blocks"][i], f"model.layers.{i}."
    a = b["attn"]
    # torch Linear weight [out, in]; out index (head, d), head-major.
    q = np.transpose(a["wq"], (1, 2, 0)).reshape(h * d, m)
    kk = np.transpose(a["wk"], (1, 2, 0)).reshape(k * d, m)
    v = np.transpose(a["wv"], (1, 2, 0)).reshape(k * d, m)
    gate, up = b["mlp"]["w_gate"].T, b["mlp"]["w_up"].T
    if fused:
      sd[pre + "self_attn.qkv_proj.weight"] = np.concatenate([q, kk, v])
      sd[pre + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
    else:
      sd.update({pre + "self_attn.q_proj.weight": q,
                 pre + "self_attn.k_proj.weight": kk,
                 pre + "self_attn.v_proj.weight": v,
                 pre + "mlp.gate_proj.weight": gate,
                 pre + "mlp.up_proj.weight": up})
    sd[pre + "self_attn.o_proj.weight"] = np.transpose(
        a["wo"], (2, 0, 1)).reshape(m, h * d)
    sd[pre + "mlp.down_proj.weight"] = b["mlp"]["w_down"].T
    sd[pre + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    sd[pre + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
    if cfg.sparse.has_eviction_head:
      sd[pre + "self_attn.A"] = a["evict_a"]
      sd[pre + "self_attn.delta.weight"] = a["evict_delta"].T
  return sd


def _hf_llama_forward(sd, cfg, tokens_BT):
  """HF LlamaForCausalLM (dense) in float64 numpy, from the HF state dict."""
  hf = {"hidden_size": cfg.model_dim, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_layers, "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta}
  return _hf_forward(sd, hf, tokens_BT)


def _np_rope(hf, family, d, seq_len):
  """(inv_freq [D/2], cos/sin multiplier) of the upstream RoPE, float64.

  Transcribed from the published formulas as the upstream code applies
  them: transformers' rope functions for Llama (the LongRoPE factor set
  chosen per forward pass by its largest position); for NOSA's
  SparseLlama the set its own RoPE module is built with (long iff the
  factor max_position / original exceeds 1); MiniCPM's MiniCPMLongRoPE
  (chosen by its cos/sin cache length, first built for
  max_position_embeddings, and a cos/sin factor from the ratio
  max_position_embeddings / original).
  """
  theta = hf.get("rope_theta", 10000.0)
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  rs = hf.get("rope_scaling")
  if not rs:
    return inv, 1.0
  kind = rs.get("rope_type", rs.get("type"))
  max_pos = hf["max_position_embeddings"]
  orig = rs.get("original_max_position_embeddings", max_pos)
  if kind == "linear":
    return inv / rs["factor"], 1.0
  if kind == "longrope":
    if family == "minicpm":
      cached = max(max_pos, seq_len)
      ext = rs["long_factor"] if cached > orig else rs["short_factor"]
      att = np.sqrt(1 + np.log(max_pos / orig) / np.log(orig))
    else:
      f = max_pos / orig
      long = f > 1 if family == "nosa" else seq_len > orig
      ext = rs["long_factor"] if long else rs["short_factor"]
      att = np.sqrt(1 + np.log(f) / np.log(orig)) if f > 1 else 1.0
    return inv / np.asarray(ext), att
  if kind == "llama3":
    f, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    out = []
    for x in inv:
      wl = 2 * np.pi / x
      if wl < orig / hi:
        out.append(x)
      elif wl > orig / lo:
        out.append(x / f)
      else:
        sm = (orig / wl - lo) / (hi - lo)
        out.append((1 - sm) * x / f + sm * x)
    return np.asarray(out), 1.0
  if kind == "yarn":
    f = rs["factor"]
    dim_of = lambda rot: (d * np.log(orig / (rot * 2 * np.pi))
                          / (2 * np.log(theta)))
    lo = max(np.floor(dim_of(rs.get("beta_fast", 32))), 0)
    hi = min(np.ceil(dim_of(rs.get("beta_slow", 1))), d - 1)
    if lo == hi:
      hi += 0.001
    ramp = np.clip((np.arange(d // 2) - lo) / (hi - lo), 0, 1)
    keep = 1 - ramp
    att = rs.get("attention_factor") or (0.1 * np.log(f) + 1 if f > 1
                                         else 1.0)
    return inv / f * (1 - keep) + inv * keep, att
  raise ValueError(kind)


def _hf_forward(sd, hf, tokens_BT):
  """The upstream model's logits [B, T, V] in float64 numpy, dense.

  From the HF config dict and state dict alone: Llama or MiniCPM (muP:
  embeddings times scale_emb, branches times scale_depth / sqrt(L), LM-head
  input over hidden / dim_model_base), RoPE scaling (`_np_rope`, one
  forward pass of length T), projection / MLP biases when the state dict
  has them, and the NOSA eviction bias b = A softplus(delta(v)) added to
  every key's logits (what NOSA attends while the context fits its
  budget).
  """
  sd = {n: np.asarray(x, np.float64) for n, x in sd.items()}
  b, t = tokens_BT.shape
  minicpm = hf.get("model_type") == "minicpm"
  m, h = hf["hidden_size"], hf["num_attention_heads"]
  k = hf.get("num_key_value_heads", h)
  d = m // h if minicpm else hf.get("head_dim") or m // h
  n_layers = hf["num_hidden_layers"]
  family = ("minicpm" if minicpm else "nosa" if "SparseLlamaForCausalLM"
            in hf.get("architectures", ()) else "llama")
  inv_freq, att = _np_rope(hf, family, d, t)
  emb_TD = np.tile(np.arange(t)[:, None] * inv_freq[None], 2)
  cos_TD, sin_TD = np.cos(emb_TD) * att, np.sin(emb_TD) * att
  rotate_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., :d // 2]],
                                         -1)
  rope = lambda x: x * cos_TD + rotate_half(x) * sin_TD
  eps = hf.get("rms_norm_eps", 1e-6)
  rms = lambda x, w: w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

  def linear(x, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y

  heads = lambda x, n: x.reshape(b, t, n, d).transpose(0, 2, 1, 3)
  mask_TT = np.triu(np.full((t, t), -np.inf), 1)
  branch = (hf.get("scale_depth", 1) / np.sqrt(n_layers) if minicpm
            else 1.0)
  x = sd["model.embed_tokens.weight"][tokens_BT]
  if minicpm:
    x = x * hf.get("scale_emb", 1)
  for i in range(n_layers):
    p = f"model.layers.{i}."
    y = rms(x, sd[p + "input_layernorm.weight"])
    q = rope(heads(linear(y, p + "self_attn.q_proj"), h))
    kk = rope(heads(linear(y, p + "self_attn.k_proj"), k))
    v_BTKD = linear(y, p + "self_attn.v_proj").reshape(b, t, k, d)
    v = v_BTKD.transpose(0, 2, 1, 3)
    kk, v = np.repeat(kk, h // k, axis=1), np.repeat(v, h // k, axis=1)
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(d) + mask_TT
    if p + "self_attn.A" in sd:
      z = linear(v_BTKD.reshape(b, t, k * d), p + "self_attn.delta")
      bias_BKT = (sd[p + "self_attn.A"] * np.logaddexp(0, z)).transpose(
          0, 2, 1)
      s = s + np.repeat(bias_BKT, h // k, axis=1)[:, :, None, :]
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    x = x + branch * linear(o.transpose(0, 2, 1, 3).reshape(b, t, h * d),
                            p + "self_attn.o_proj")
    y = rms(x, sd[p + "post_attention_layernorm.weight"])
    g = linear(y, p + "mlp.gate_proj")
    x = x + branch * linear(g / (1 + np.exp(-g))
                            * linear(y, p + "mlp.up_proj"),
                            p + "mlp.down_proj")
  x = rms(x, sd["model.norm.weight"])
  if minicpm:
    x = x / (m / hf.get("dim_model_base", 1))
  return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def _random_hf_checkpoint(hf, seed):
  """A random state dict in the upstream naming for the config dict `hf`.

  Biases per attention_bias (q/k/v/o, and delta for NOSA) and, for Llama,
  mlp_bias; the NOSA eviction head for SparseLlamaForCausalLM.
  """
  rng = np.random.default_rng(seed)
  minicpm = hf.get("model_type") == "minicpm"
  m, h = hf["hidden_size"], hf["num_attention_heads"]
  k = hf.get("num_key_value_heads", h)
  d = m // h if minicpm else hf.get("head_dim") or m // h
  f, v = hf["intermediate_size"], hf["vocab_size"]
  rand = lambda *shape: (0.2 * rng.normal(size=shape)).astype(np.float32)
  sd = {"model.embed_tokens.weight": rand(v, m),
        "model.norm.weight": 1 + rand(m)}
  tied = hf.get("tie_word_embeddings", minicpm)
  if not tied:
    sd["lm_head.weight"] = rand(v, m)
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj": (h * d, m), "self_attn.k_proj": (k * d, m),
              "self_attn.v_proj": (k * d, m), "self_attn.o_proj": (m, h * d),
              "mlp.gate_proj": (f, m), "mlp.up_proj": (f, m),
              "mlp.down_proj": (m, f)}
    for name, shape in shapes.items():
      sd[p + name + ".weight"] = rand(*shape)
      if (hf.get("attention_bias") and name.startswith("self_attn")) or (
          hf.get("mlp_bias") and not minicpm and name.startswith("mlp")):
        sd[p + name + ".bias"] = rand(shape[0])
    sd[p + "input_layernorm.weight"] = 1 + rand(m)
    sd[p + "post_attention_layernorm.weight"] = 1 + rand(m)
    if "SparseLlamaForCausalLM" in hf.get("architectures", ()):
      sd[p + "self_attn.A"] = rand(k) * 5
      sd[p + "self_attn.delta.weight"] = rand(k, k * d)
      if hf.get("attention_bias"):
        sd[p + "self_attn.delta.bias"] = rand(k)
  return sd


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(cfg, params, tokens_BT):
  graphdef, _ = model.abstract_params(cfg)
  return model.apply(graphdef, params, tokens_BT)[0]


def _logits(cfg, params, tokens_BT):
  return np.asarray(_logits_jit(cfg, params, tokens_BT))


def _assert_params_equal(test, a, b):
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    test.assertEqual(x.dtype, y.dtype)
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------
# safetensors.
# ----------------------------------------------------------------------------


class SafetensorsTest(absltest.TestCase):

  def test_round_trip_dtypes_and_metadata(self):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "bf16": rng.normal(size=(4, 5)).astype(BF16),
        "f16": rng.normal(size=(1, 2, 2)).astype(np.float16),
        "i32": np.arange(3, dtype=np.int32),
        "scalar": np.float32(7.5).reshape(()),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.normal(size=(3, 4)).astype(np.float32).T,
    }
    path = os.path.join(self.create_tempdir().full_path, "x.safetensors")
    hf_io.write_safetensors(path, tensors, {"format": "pt", "note": "hi"})
    out = hf_io.read_safetensors(path)
    self.assertEqual(sorted(out), sorted(tensors))
    for name, x in tensors.items():
      self.assertEqual((out[name].dtype, out[name].shape), (x.dtype, x.shape))
      np.testing.assert_array_equal(out[name], x)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["x.safetensors"])
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      meta = json.loads(f.read(n))["__metadata__"]
    self.assertEqual(meta, {"format": "pt", "note": "hi"})

  def test_byte_layout_matches_hand_built_header(self):
    a = np.array([1.5, -2.0], BF16)  # bf16 1.5 = 0x3FC0, -2 = 0xC000
    b = np.array([[1, 2], [3, 4]], np.float32)
    path = os.path.join(self.create_tempdir().full_path, "x.safetensors")
    hf_io.write_safetensors(path, {"b": b, "a": a}, {"format": "pt"})
    with open(path, "rb") as f:
      raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    self.assertEqual(n % 8, 0)  # data 8-byte aligned, as HF pads
    self.assertEqual(json.loads(raw[8:8 + n]), {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]},
    })
    self.assertEqual(raw[8 + n:],
                     b"\xc0\x3f\x00\xc0" + struct.pack("<4f", 1, 2, 3, 4))

  def test_reads_hand_built_file(self):
    # Entries in another order, data out of name order, no padding.
    header = {"w": {"dtype": "F16", "shape": [3], "data_offsets": [4, 10]},
              "__metadata__": {"format": "pt"},
              "v": {"dtype": "I64", "shape": [], "data_offsets": [10, 18]},
              "u": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [0, 4]}}
    blob = json.dumps(header).encode()
    data = (b"\x80\x3f\x00\x40" + struct.pack("<3e", 0.5, 1, -1)
            + struct.pack("<q", -3))
    path = os.path.join(self.create_tempdir().full_path, "hand.safetensors")
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob + data)
    out = hf_io.read_safetensors(path)
    self.assertEqual(sorted(out), ["u", "v", "w"])
    np.testing.assert_array_equal(out["u"], np.array([[1, 2]], BF16))
    np.testing.assert_array_equal(out["w"], np.array([0.5, 1, -1], "f2"))
    self.assertEqual((out["v"].shape, int(out["v"])), ((), -3))

  def test_sharded_directory(self):
    root = self.create_tempdir().full_path
    x, y = np.ones((2, 2), np.float32), np.arange(3, dtype=np.int32)
    hf_io.write_safetensors(os.path.join(root, "s-1.safetensors"), {"x": x})
    hf_io.write_safetensors(os.path.join(root, "s-2.safetensors"), {"y": y})
    with open(os.path.join(root, hf_io.INDEX_FILE), "w") as f:
      json.dump({"metadata": {}, "weight_map": {
          "x": "s-1.safetensors", "y": "s-2.safetensors"}}, f)
    out = hf_io.read_safetensors(root)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["y"], y)

  def test_bad_offsets_are_named(self):
    blob = json.dumps({"t": {"dtype": "F32", "shape": [4],
                             "data_offsets": [0, 8]}}).encode()
    path = os.path.join(self.create_tempdir().full_path, "bad.safetensors")
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob + bytes(8))
    with self.assertRaisesRegex(ValueError, r"tensor 't'.*expected 16 bytes"):
      hf_io.read_safetensors(path)


# ----------------------------------------------------------------------------
# HF layout.
# ----------------------------------------------------------------------------


class HfLayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_export_import_gives_identical_logits(self, variant, tied):
    cfg = testing.tiny_model_config(variant, tie_embeddings=tied)
    params = _random_params(cfg)
    out = self.create_tempdir().full_path
    hf_io.export_hf(params, cfg, out, dtype="float32")
    cfg2, params2 = hf_io.import_hf(out)
    self.assertEqual(cfg2, cfg)
    _assert_params_equal(self, params2, params)
    tokens_BT = testing.random_tokens(jax.random.key(1), 2, 40)
    np.testing.assert_array_equal(_logits(cfg2, params2, tokens_BT),
                                  _logits(cfg, params, tokens_BT))

  def test_bfloat16_export_rounds_once(self):
    cfg = testing.tiny_model_config("nosa")
    params = _random_params(cfg)
    out = self.create_tempdir().full_path
    hf_io.export_hf(params, cfg, out)  # default bfloat16
    self.assertEqual(hf_io.read_safetensors(out)["model.norm.weight"].dtype,
                     BF16)
    _, params2 = hf_io.import_hf(out)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype),
                           params)
    _assert_params_equal(self, params2, rounded)

  @parameterized.named_parameters(
      *_VARIANTS, ("nosa_untied_fused", "nosa", False, True),
      ("full_tied_fused", "full", True, True))
  def test_hand_built_state_dict_imports(self, variant, tied, fused=False):
    cfg = testing.tiny_model_config(variant, tie_embeddings=tied)
    params = _random_params(cfg)
    sd = _hand_hf(params, cfg, fused=fused)
    if tied:
      sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # allowed
    imported = hf_io.from_hf_state_dict(sd, cfg)
    _assert_params_equal(self, imported, params)
    if not fused:
      exported = hf_io.to_hf_state_dict(params, cfg)
      if tied:
        del sd["lm_head.weight"]  # tied exports omit it
      self.assertEqual(sorted(exported), sorted(sd))
      for name, x in sd.items():
        np.testing.assert_array_equal(exported[name], x, err_msg=name)

  @parameterized.named_parameters(("untied", False), ("tied", True))
  def test_numpy_hf_llama_forward_matches(self, tied):
    cfg = testing.tiny_model_config("full", tie_embeddings=tied)
    params = _random_params(cfg)
    tokens_BT = np.asarray(testing.random_tokens(jax.random.key(2), 2, 24))
    sd = _hand_hf(params, cfg)
    want_BTV = _hf_llama_forward(sd, cfg, tokens_BT)
    got_BTV = _logits(cfg, hf_io.from_hf_state_dict(sd, cfg), tokens_BT)
    np.testing.assert_allclose(got_BTV, want_BTV,
                               **tolerances.tol(np.float32))

  def test_eviction_head_layout(self):
    # HF: b = A * softplus(delta(v.transpose(1, 2).flatten(2, 3))), where v
    # is [B, T, K, D] before the flatten, i.e. K-major (§2.2).
    cfg = testing.tiny_model_config("nosa")
    params = _random_params(cfg)
    sd = _hand_hf(params, cfg)
    rng = np.random.default_rng(0)
    v_BTKD = rng.normal(size=(2, 5, cfg.num_kv_heads, cfg.head_dim))
    z = v_BTKD.reshape(2, 5, -1) @ sd["model.layers.0.self_attn.delta.weight"].T
    want_BTK = sd["model.layers.0.self_attn.A"] * np.logaddexp(0, z)
    attn = hf_io.from_hf_state_dict(sd, cfg)["blocks"][0]["attn"]
    got_BTK = selection.eviction_bias(jnp.asarray(v_BTKD, jnp.float32),
                                      attn["evict_a"][...],
                                      attn["evict_delta"][...])
    np.testing.assert_allclose(got_BTK, want_BTK, **tolerances.tol(np.float32))

  def test_unknown_and_missing_in_one_error(self):
    cfg = testing.tiny_model_config("nosa")
    sd = _hand_hf(_random_params(cfg), cfg)
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    sd["extra.weight"] = np.zeros(1, np.float32)
    del sd["model.norm.weight"], sd["model.layers.1.mlp.up_proj.weight"]
    del sd["model.layers.1.self_attn.A"]
    with self.assertRaises(ValueError) as e:
      hf_io.from_hf_state_dict(sd, cfg)
    self.assertEqual(
        str(e.exception),
        "unknown tensors: extra.weight, model.layers.0.self_attn.q_proj.bias; "
        "missing tensors: model.layers.1.mlp.up_proj.weight, "
        "model.layers.1.self_attn.A, model.norm.weight")

  def test_untied_config_needs_lm_head(self):
    cfg = testing.tiny_model_config("full")
    sd = _hand_hf(_random_params(cfg), cfg)
    del sd["lm_head.weight"]
    with self.assertRaisesRegex(ValueError,
                                r"^missing tensors: lm_head\.weight$"):
      hf_io.from_hf_state_dict(sd, cfg)

  def test_tied_config_rejects_a_different_lm_head(self):
    cfg = testing.tiny_model_config("full", tie_embeddings=True)
    sd = _hand_hf(_random_params(cfg), cfg)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    with self.assertRaisesRegex(ValueError, "lm_head.weight differs"):
      hf_io.from_hf_state_dict(sd, cfg)

  @parameterized.named_parameters(("split", False), ("fused", True))
  def test_shape_mismatch_names_tensor_and_shapes(self, fused):
    cfg = testing.tiny_model_config("full")
    sd = _hand_hf(_random_params(cfg), cfg, fused=fused)
    name = ("model.layers.1.self_attn.qkv_proj.weight" if fused
            else "model.layers.1.self_attn.k_proj.weight")
    want = (128, 64) if fused else (32, 64)
    sd[name] = np.zeros((want[0], 63), np.float32)
    with self.assertRaisesRegex(
        ValueError, rf"{name.replace('.', '[.]')} expected \({want[0]}, 64\) "
        rf"got \({want[0]}, 63\)"):
      hf_io.from_hf_state_dict(sd, cfg)

  def test_export_rejects_params_of_another_config(self):
    params = _random_params(testing.tiny_model_config("full"))
    with self.assertRaisesRegex(ValueError, r"missing parameters.*evict_a"):
      hf_io.to_hf_state_dict(params, testing.tiny_model_config("nosa"))


class HfConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_round_trip(self, variant, tied):
    cfg = testing.tiny_model_config(variant, tie_embeddings=tied,
                                    rope_theta=5e5, rms_eps=1e-5)
    hf = json.loads(json.dumps(hf_io.hf_config(cfg)))
    self.assertEqual(hf["model_type"], "llama")
    self.assertEqual(hf["nosa"]["block_size"], cfg.sparse.block_size)
    self.assertEqual(hf_io.model_config_from_hf(hf), cfg)

  def test_released_style_config(self):
    # What a released NOSA-8B-like config.json holds: Llama fields, LongRoPE,
    # no sparse block (the upstream code hard-codes the paper's constants).
    long = [1.0 + i / 8 for i in range(64)]
    hf = {"architectures": ["SparseLlamaForCausalLM"], "model_type": "llama",
          "hidden_size": 4096, "intermediate_size": 16384,
          "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 2, "vocab_size": 73448,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "max_position_embeddings": 32768,
          "rope_scaling": {"rope_type": "longrope", "long_factor": long,
                           "short_factor": long,
                           "original_max_position_embeddings": 32768},
          "bos_token_id": 1, "torch_dtype": "bfloat16"}
    cfg = hf_io.model_config_from_hf(hf, param_dtype="bfloat16")
    self.assertEqual((cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings,
                      cfg.param_dtype), (128, 2, False, "bfloat16"))
    self.assertEqual(cfg.sparse, config_lib.SparseConfig(variant="nosa"))
    # max_position == original: factor 1, so NOSA's RoPE module is built
    # with the short factors and keeps them.
    self.assertEqual((cfg.rope_scaling.rope_type,
                      cfg.rope_scaling.attention_factor,
                      cfg.rope_scaling.long_factor_above),
                     ("longrope", 1.0, config_lib.NEVER))

  def test_minicpm_sparse_config(self):
    # MiniCPM reads sparse_config, but its InfLLM-V2 (dense_len, a window
    # inside the kernel) is not nosa_jax's infllmv2: an error, unless the
    # caller chooses the sparse config.
    hf = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
          "hidden_size": 64, "intermediate_size": 128, "vocab_size": 300,
          "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2,
          "sparse_config": {"kernel_size": 32, "kernel_stride": 16,
                            "init_blocks": 1, "block_size": 64,
                            "window_size": 2048, "topk": 64}}
    with self.assertRaisesRegex(ValueError, "sparse_config="):
      hf_io.model_config_from_hf(hf)
    cfg = hf_io.model_config_from_hf(
        hf, sparse=config_lib.SparseConfig(variant="full"))
    self.assertEqual((cfg.sparse.variant, cfg.tie_embeddings,
                      cfg.logits_scale), ("full", True, 1 / 64))

  def test_unsupported_architecture(self):
    hf = hf_io.hf_config(testing.tiny_model_config())
    with self.assertRaisesRegex(ValueError, "hidden_act='relu'"):
      hf_io.model_config_from_hf(dict(hf, hidden_act="relu"))


# ----------------------------------------------------------------------------
# Released-checkpoint semantics: RoPE scaling, biases, muP, sparse constants.
# ----------------------------------------------------------------------------

_ORIG = 16  # original_max_position_embeddings: the tests run past it
_FACTORS = ([1.0, 1.2, 1.5, 2.0, 3.0, 4.5, 7.0, 10.0],  # D = 16
            [1.1, 1.6, 2.0, 3.0, 5.0, 8.0, 11.0, 16.0])


def _upstream_config(name):
  """A tiny config.json as upstream writes it, by name: the family and the
  rope type, with biases for the Llama ones and muP for MiniCPM."""
  base = {"hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 61, "rms_norm_eps": 1e-6, "rope_theta": 500.0,
          "max_position_embeddings": 64, "hidden_act": "silu",
          "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
  short, long = _FACTORS
  longrope = {"rope_type": "longrope", "short_factor": short,
              "long_factor": long, "original_max_position_embeddings": _ORIG}
  if name.startswith("minicpm"):
    # MiniCPM4-style: LongRoPE (max_position 64 > original 16: the long
    # factors from the start and cos/sin times sqrt(1 + ln 4 / ln 16)),
    # muP, a sparse_config block the tests override.
    return dict(base, architectures=["MiniCPMForCausalLM"],
                model_type="minicpm", rope_scaling=longrope,
                scale_emb=12, scale_depth=1.4, dim_model_base=8,
                tie_word_embeddings=False, attention_bias=True,
                use_cache=True)
  rope = {"longrope": longrope,
          "linear": {"type": "linear", "factor": 4.0},
          "llama3": {"rope_type": "llama3", "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": _ORIG},
          "yarn": {"rope_type": "yarn", "factor": 4.0,
                   "original_max_position_embeddings": _ORIG}
          }[name.split("_")[-1]]
  arch = ("SparseLlamaForCausalLM" if name.startswith("nosa")
          else "LlamaForCausalLM")
  return dict(base, architectures=[arch], model_type="llama", head_dim=16,
              rope_scaling=rope, attention_bias=True, mlp_bias=True,
              tie_word_embeddings=False, scale_emb=12,
              sparse_config={"window_size": 2048})


_CHECKPOINTS = ("llama_longrope", "llama_linear", "llama_llama3",
                "llama_yarn", "nosa_longrope", "minicpm_longrope")


class ReleasedCheckpointTest(parameterized.TestCase):
  """A tiny checkpoint per RoPE type, written here in the upstream naming
  and config format, imports with the upstream math (against a numpy
  transcription), past original_max_position_embeddings, in the forward
  and in prefill + decode."""

  def _write(self, name, seed=0):
    hf = _upstream_config(name)
    sd = _random_hf_checkpoint(hf, seed)
    out = self.create_tempdir().full_path
    hf_io.write_safetensors(os.path.join(out, hf_io.WEIGHTS_FILE), sd,
                            {"format": "pt"})
    with open(os.path.join(out, hf_io.CONFIG_FILE), "w") as f:
      json.dump(hf, f)
    return out, hf, sd

  def _import(self, out, name):
    # MiniCPM's InfLLM-V2 sparse_config has no exact equivalent; these
    # MiniCPM tests run it dense, what MiniCPM does below dense_len.
    if name.startswith("minicpm"):
      return hf_io.import_hf(out, sparse=config_lib.SparseConfig("full"))
    return hf_io.import_hf(out)

  @parameterized.parameters(*_CHECKPOINTS, ("nosa_longrope", True))
  def test_prefill_and_decode_match_upstream(self, name, host=False):
    out, hf, sd = self._write(name)
    cfg, params = self._import(out, name)
    # Both KV stores decode through the model's functions.
    store = stores.HostStore() if host else stores.DeviceStore()
    t, prompt = 40, 28  # both past _ORIG: one LongRoPE factor set
    tokens = np.asarray(testing.random_tokens(jax.random.key(3), 2, t,
                                              vocab=61))
    want_BTV = _hf_forward(sd, hf, tokens)
    np.testing.assert_allclose(_logits(cfg, params, tokens), want_BTV,
                               **tolerances.tol(np.float32))
    state, logits_BV = engine.prefill(params, cfg, tokens[:, :prompt],
                                      jnp.asarray([prompt, prompt]), t,
                                      store=store)
    got = [logits_BV]
    for i in range(prompt, t - 1):
      state, logits_BV, _ = engine.decode_step(params, cfg, state,
                                               tokens[:, i])
      got.append(logits_BV)
    np.testing.assert_allclose(np.stack(got, 1), want_BTV[:, prompt - 1:-1],
                               **tolerances.tol(np.float32))

  @parameterized.parameters("llama_longrope", "minicpm_longrope",
                            "nosa_longrope")
  def test_short_sequence(self, name):
    # Below original_max_position_embeddings Llama's LongRoPE takes the
    # short factors; MiniCPM's and NOSA's (max_position 64 > 16) still the
    # long ones.
    out, hf, sd = self._write(name, seed=1)
    cfg, params = self._import(out, name)
    tokens = np.asarray(testing.random_tokens(jax.random.key(4), 1, 12,
                                              vocab=61))
    np.testing.assert_allclose(_logits(cfg, params, tokens),
                               _hf_forward(sd, hf, tokens),
                               **tolerances.tol(np.float32))

  @parameterized.parameters("nosa_longrope", "minicpm_longrope",
                            "llama_yarn")
  def test_export_import_is_bit_exact(self, name):
    out, _, _ = self._write(name)
    cfg, params = self._import(out, name)
    again = self.create_tempdir().full_path
    hf_io.export_hf(params, cfg, again, dtype="float32")
    cfg2, params2 = hf_io.import_hf(again)
    self.assertEqual(cfg2, cfg)
    _assert_params_equal(self, params2, params)
    tokens = testing.random_tokens(jax.random.key(5), 2, 30, vocab=61)
    np.testing.assert_array_equal(_logits(cfg2, params2, tokens),
                                  _logits(cfg, params, tokens))

  def test_import_report_and_semantics(self):
    cfg, report = hf_io.convert_hf_config(
        dict(_upstream_config("nosa_longrope"), some_new_key=3))
    text = "\n".join(report)
    # NOSA's code hard-codes its constants and ignores sparse_config; the
    # Llama code ignores muP keys.
    self.assertEqual(cfg.sparse, config_lib.SparseConfig(variant="nosa"))
    self.assertIn("sparse_config: ignored", text)
    self.assertIn("scale_emb: ignored", text)
    self.assertIn("ignored unknown keys: some_new_key", text)
    self.assertEqual((cfg.embed_scale, cfg.attention_bias, cfg.mlp_bias),
                     (1.0, True, True))
    rs = cfg.rope_scaling
    self.assertEqual((rs.rope_type, rs.long_factor_above), ("longrope", 0))
    llama, _ = hf_io.convert_hf_config(_upstream_config("llama_longrope"))
    self.assertEqual(llama.rope_scaling.long_factor_above, 16)
    self.assertAlmostEqual(rs.attention_factor,
                           np.sqrt(1 + np.log(4) / np.log(16)))
    mini, report = hf_io.convert_hf_config(
        _upstream_config("minicpm_longrope"),
        sparse=config_lib.SparseConfig("full"))
    self.assertEqual((mini.embed_scale, mini.residual_scale,
                      mini.logits_scale, mini.rope_scaling.long_factor_above),
                     (12.0, 1.4 / np.sqrt(2), 8 / 64, 0))
    self.assertIn("muP", "\n".join(report))

  @parameterized.named_parameters(
      ("minicpm_sparse_config", "minicpm_longrope",
       {"sparse_config": {"window_size": 2048, "dense_len": 8192}},
       "sparse_config=.*dense_len"),
      ("dynamic", "llama_linear",
       {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
       "rope_scaling.rope_type='dynamic'"),
      ("yarn_mscale", "llama_yarn",
       {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}},
       "rope_scaling.mscale=0.7"),
      ("minicpm_llama3", "minicpm_longrope",
       {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
       "rope_type='llama3' is not implemented for the minicpm"),
      ("partial_rotary", "llama_linear", {"partial_rotary_factor": 0.5},
       "partial_rotary_factor=0.5"),
      ("activation", "llama_linear", {"hidden_act": "gelu"},
       "hidden_act='gelu'"),
      ("architecture", "llama_linear",
       {"architectures": ["Qwen2ForCausalLM"]}, "Qwen2ForCausalLM"),
      ("minicpm_head_dim", "minicpm_longrope", {"head_dim": 8},
       "head_dim=8"))
  def test_math_changing_keys_are_errors(self, name, change, pattern):
    hf = dict(_upstream_config(name), **change)
    with self.assertRaisesRegex(ValueError, pattern):
      hf_io.convert_hf_config(hf)


# ----------------------------------------------------------------------------
# Workdirs, params-only orbax, the CLI.
# ----------------------------------------------------------------------------


class ExportTest(absltest.TestCase):

  def test_orbax_params_round_trip(self):
    cfg = testing.tiny_model_config("nosa", tie_embeddings=True)
    params = _random_params(cfg)
    out = os.path.join(self.create_tempdir().full_path, "orbax_params")
    hf_io.export_orbax_params(params, out)
    _assert_params_equal(self, hf_io.load_orbax_params(out, cfg), params)

  def test_load_workdir_errors(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(FileNotFoundError, "no config.json"):
      hf_io.load_workdir(workdir)
    checkpoint.write_json_atomic(os.path.join(workdir, "config.json"), {})
    with self.assertRaisesRegex(FileNotFoundError, "no checkpoint in"):
      hf_io.load_workdir(workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

  def test_cli_end_to_end(self):
    cfg = testing.tiny_config("nosa", cache_dir=self.create_tempdir().full_path,
                              num_steps=2, checkpoint_every=0)
    workdir = self.create_tempdir().full_path
    # The workdir of a run stopped before its first step (a checkpoint of
    # step 0): the export reads any trainer workdir the same way, and no
    # train step is compiled. (evaluation_test loads a trained workdir.)
    with testing.training_interrupted_at(0), self.assertRaises(
        KeyboardInterrupt):
      train.train_and_evaluate(cfg, workdir)
    out = os.path.join(self.create_tempdir().full_path, "export")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--workdir={workdir}",
         f"--out={out}", "--dtype=float32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertIn("Exported step 0", run.stdout)
    self.assertIn(os.path.join(out, "model.safetensors"), run.stdout)

    # The reference: the full train state restored the trainer's way.
    _, like, _ = train.init_state(cfg)
    state, _ = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints")).restore(None, like)
    cfg2, params = hf_io.import_hf(out)
    self.assertEqual(cfg2, cfg.model)
    _assert_params_equal(self, params, state["params"])
    _assert_params_equal(
        self, hf_io.load_orbax_params(os.path.join(out, "orbax_params"),
                                      cfg.model), state["params"])

    # Bad --workdir / --out: tests/experiments/cli_test.py.

    # A damaged newest checkpoint: readers say so in one line and read the
    # one before it, leaving the directory as it is.
    ckdir = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckdir, "0"), os.path.join(ckdir, "1"))
    testing.damage_checkpoint(os.path.join(ckdir, "1"))
    with self.assertLogs(level="WARNING") as logs:
      self.assertEqual(hf_io.load_workdir(workdir)[2], 0)
    self.assertRegex(logs.output[0], r"checkpoint step 1 in .* does not "
                     r"restore \(ValueError: OUT_OF_RANGE.*\); using the next "
                     "older step")
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                "checkpoint step 1 in .* does not restore"):
      hf_io.load_workdir(workdir, 1)
    self.assertEqual(sorted(os.listdir(ckdir)), ["0", "1"])


if __name__ == "__main__":
  absltest.main()
