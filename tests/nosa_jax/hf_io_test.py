"""hf_io: safetensors bytes, HF layout round trips, errors, the export CLI.

The HF state dicts here are built by hand from the JAX params (numpy
transposes, no torch, independent of `to_hf_state_dict`), and a numpy HF
Llama forward pass checks that they really are the HF layout: torch Linear
[out, in], rotate-half RoPE without permutation, `repeat_kv` head order.
"""

import functools
import json
import os
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
  sd = {n: np.asarray(x, np.float64) for n, x in sd.items()}
  b, t = tokens_BT.shape
  h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
  emb_TD = np.tile(np.arange(t)[:, None] * inv_freq[None], 2)
  cos_TD, sin_TD = np.cos(emb_TD), np.sin(emb_TD)
  rotate_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., :d // 2]],
                                         -1)
  rope = lambda x: x * cos_TD + rotate_half(x) * sin_TD
  rms = lambda x, w: w * x / np.sqrt(np.mean(x * x, -1, keepdims=True)
                                     + cfg.rms_eps)
  linear = lambda x, name: x @ sd[name].T
  heads = lambda x, n: x.reshape(b, t, n, d).transpose(0, 2, 1, 3)
  mask_TT = np.triu(np.full((t, t), -np.inf), 1)
  x = sd["model.embed_tokens.weight"][tokens_BT]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    y = rms(x, sd[p + "input_layernorm.weight"])
    q = rope(heads(linear(y, p + "self_attn.q_proj.weight"), h))
    kk = rope(heads(linear(y, p + "self_attn.k_proj.weight"), k))
    v = heads(linear(y, p + "self_attn.v_proj.weight"), k)
    kk, v = np.repeat(kk, h // k, axis=1), np.repeat(v, h // k, axis=1)
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(d) + mask_TT
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    x = x + linear(o.transpose(0, 2, 1, 3).reshape(b, t, h * d),
                   p + "self_attn.o_proj.weight")
    y = rms(x, sd[p + "post_attention_layernorm.weight"])
    g = linear(y, p + "mlp.gate_proj.weight")
    x = x + linear(g / (1 + np.exp(-g)) * linear(y, p + "mlp.up_proj.weight"),
                   p + "mlp.down_proj.weight")
  x = rms(x, sd["model.norm.weight"])
  return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


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
    hf = {"architectures": ["SparseLlamaForCausalLM"], "model_type": "llama",
          "hidden_size": 4096, "intermediate_size": 16384,
          "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 2, "vocab_size": 73448,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0]},
          "bos_token_id": 1, "torch_dtype": "bfloat16"}
    with self.assertLogs("absl", "WARNING") as logs:
      cfg = hf_io.model_config_from_hf(hf, param_dtype="bfloat16")
    self.assertIn("LongRoPE", "".join(logs.output))
    self.assertEqual((cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings,
                      cfg.param_dtype), (128, 2, False, "bfloat16"))
    self.assertEqual(cfg.sparse, config_lib.SparseConfig(variant="nosa"))

  def test_minicpm_sparse_config(self):
    hf = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 300,
          "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2,
          "sparse_config": {"kernel_size": 32, "kernel_stride": 16,
                            "init_blocks": 1, "block_size": 64,
                            "window_size": 2048, "topk": 64}}
    sparse = hf_io.model_config_from_hf(hf).sparse
    self.assertEqual((sparse.variant, sparse.window_blocks,
                      sparse.query_topk_blocks), ("infllmv2", 32, 49))

  def test_unsupported_architecture(self):
    hf = hf_io.hf_config(testing.tiny_model_config())
    with self.assertRaisesRegex(ValueError, "attention_bias=true"):
      hf_io.model_config_from_hf(dict(hf, attention_bias=True))


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

    def error(workdir, out):
      run = subprocess.run(
          [sys.executable, "-m", "experiments.export", f"--workdir={workdir}",
           f"--out={out}"], cwd=REPO, env=env, capture_output=True,
          text=True, timeout=60)  # an unwritable --out once hung here
      self.assertEqual(run.returncode, 1, run.stderr[-2000:])
      return run.stderr.strip().splitlines()[-1]

    self.assertEqual(error(f"{out}/no", f"{out}2"),
                     f"export error: no config.json in {out}/no: not a "
                     "training workdir")
    in_the_way = os.path.join(out, "model.safetensors")
    self.assertEqual(error(workdir, in_the_way), f"export error: --out="
                     f"{in_the_way} is a file, not a directory")
    self.assertRegex(error(workdir, workdir), "clashes with the training "
                     "workdir")


if __name__ == "__main__":
  absltest.main()
