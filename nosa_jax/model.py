"""Llama-style decoder with pluggable NOSA attention (NOSA_SPEC.md §1, §2).

Flax NNX modules used functionally: build once, `nnx.split` into
(graphdef, params), and call `apply(graphdef, params, tokens)` inside plain
`jax.jit` steps. The attention variant comes from `SparseConfig.variant`:
`full` is dense causal attention; `infllmv2`, `dma` and `nosa` go through
`sparse_attention.nosa_attention` (the one place sparse variants plug in).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nosa_jax import attention
from nosa_jax import config as config_lib
from nosa_jax import layers
from nosa_jax import selection
from nosa_jax import sparse_attention

Aux = dict[str, Any]
# attend(q_BTHD, k_BTKD, v_BTKD, bias_BTK or None) -> (out_BTHD, aux): the
# attention proper of one layer, given its RoPE'd projections. Training
# passes `training_attention`; decode passes its engine's (cache + selection).
Attend = Callable[..., tuple[jax.Array, Any]]

# Block parameters used only as `w.astype(cfg.dtype)` in a matmul.
MATMUL_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The embedding and the LM head are, likewise, only used in cfg.dtype.
EMBEDDINGS = ("embed", "lm_head")


# ----------------------------------------------------------------------------
# The layer math, once: pure functions over a parameter tree (an nnx.State,
# or the same tree of plain arrays). The NNX modules below and the decode
# engine (nosa_jax/inference) both call these.
# ----------------------------------------------------------------------------


def _w(p, dtype) -> jax.Array:
  """A parameter (nnx.Param or plain array) in the compute dtype."""
  return jnp.asarray(p[...]).astype(dtype)


def _opt(p: Any, name: str, dtype) -> jax.Array | None:
  """An optional parameter (a bias) in `dtype`, or None if absent."""
  return _w(p[name], dtype) if name in p else None


def embed(params: Any, cfg: config_lib.ModelConfig,
          tokens_BT: jax.Array) -> jax.Array:
  """Token embeddings x_BTM in the compute dtype, times cfg.embed_scale."""
  x_BTM = jnp.take(params["embed"][...], tokens_BT, axis=0).astype(cfg.dtype)
  if cfg.embed_scale != 1.0:  # MiniCPM's scale_emb (muP)
    x_BTM = x_BTM * jnp.asarray(cfg.embed_scale, x_BTM.dtype)
  return x_BTM


def attention_inputs(p_attn: Any, cfg: config_lib.ModelConfig,
                     x_BTM: jax.Array, positions_BT: jax.Array):
  """q, k (RoPE applied), v and, for dma / nosa, the eviction bias (§2.2).

  RoPE follows cfg.rope_scaling (`layers.rope_angles`: LongRoPE picks its
  factor set from each row's largest position). With cfg.attention_bias the
  projections (and delta) add their biases, as HF Llama's `attention_bias`.

  Returns:
    (q_BTHD, k_BTKD, v_BTKD, bias_BTK or None); bias is fp32.
  """
  dt = x_BTM.dtype
  q_BTHD = jnp.einsum("BTM,MHD->BTHD", x_BTM, _w(p_attn["wq"], dt))
  k_BTKD = jnp.einsum("BTM,MKD->BTKD", x_BTM, _w(p_attn["wk"], dt))
  v_BTKD = jnp.einsum("BTM,MKD->BTKD", x_BTM, _w(p_attn["wv"], dt))
  if cfg.attention_bias:
    q_BTHD = q_BTHD + _w(p_attn["bq"], dt)[None, None]
    k_BTKD = k_BTKD + _w(p_attn["bk"], dt)[None, None]
    v_BTKD = v_BTKD + _w(p_attn["bv"], dt)[None, None]
  q_BTHD = layers.apply_rope(q_BTHD, positions_BT, cfg.rope_theta,
                             cfg.rope_scaling)
  k_BTKD = layers.apply_rope(k_BTKD, positions_BT, cfg.rope_theta,
                             cfg.rope_scaling)
  bias_BTK = None
  if cfg.sparse.has_eviction_head:
    # b = A * softplus(delta(concat_h v_h) + delta_b), Eq. 4.
    bias_BTK = selection.eviction_bias(
        v_BTKD, p_attn["evict_a"][...], p_attn["evict_delta"][...],
        p_attn["evict_delta_b"][...] if cfg.attention_bias else None)
  return q_BTHD, k_BTKD, v_BTKD, bias_BTK


def block(p_block: Any, cfg: config_lib.ModelConfig, x_BTM: jax.Array,
          positions_BT: jax.Array, attend: Attend) -> tuple[jax.Array, Any]:
  """One pre-norm decoder block: x + s attn(norm(x)); x + s mlp(norm(x)).

  s = cfg.residual_scale (1, or MiniCPM's scale_depth / sqrt(layers)).

  Args:
    p_block: the block's parameters (params["blocks"][i]).
    cfg: the model config.
    x_BTM: the residual stream.
    positions_BT: absolute positions of the T tokens.
    attend: the attention proper (see `Attend`).

  Returns:
    (x_BTM leaving the block, attend's aux).
  """
  dt = x_BTM.dtype
  h_BTM = layers.rms_norm(x_BTM, p_block["attn_norm"]["scale"][...],
                          cfg.rms_eps)
  out_BTHD, aux = attend(*attention_inputs(p_block["attn"], cfg, h_BTM,
                                           positions_BT))
  a = p_block["attn"]
  o_BTM = jnp.einsum("BTHD,HDM->BTM", out_BTHD, _w(a["wo"], dt))
  if cfg.attention_bias:
    o_BTM = o_BTM + _w(a["bo"], dt)[None, None]
  scale = (lambda y: y) if cfg.residual_scale == 1.0 else (
      lambda y: y * jnp.asarray(cfg.residual_scale, dt))
  x_BTM = x_BTM + scale(o_BTM)
  h_BTM = layers.rms_norm(x_BTM, p_block["mlp_norm"]["scale"][...],
                          cfg.rms_eps)
  m = p_block["mlp"]
  return x_BTM + scale(layers.swiglu(
      h_BTM, _w(m["w_gate"], dt), _w(m["w_up"], dt), _w(m["w_down"], dt),
      _opt(m, "b_gate", dt), _opt(m, "b_up", dt), _opt(m, "b_down", dt))), aux


def logits(params: Any, cfg: config_lib.ModelConfig,
           x_BTM: jax.Array) -> jax.Array:
  """Final RMSNorm and the (tied) LM head; fp32 logits [..., V].

  The normed state is multiplied by cfg.logits_scale first (MiniCPM's
  dim_model_base / hidden_size).
  """
  x_BTM = layers.rms_norm(x_BTM, params["final_norm"]["scale"][...],
                          cfg.rms_eps)
  if cfg.logits_scale != 1.0:
    x_BTM = x_BTM * jnp.asarray(cfg.logits_scale, x_BTM.dtype)
  head_MV = (params["embed"][...].T if cfg.tie_embeddings
             else params["lm_head"][...])
  return jnp.einsum("...M,MV->...V", x_BTM, head_MV.astype(x_BTM.dtype),
                    preferred_element_type=jnp.float32)


def training_attention(sp: config_lib.SparseConfig,
                       collect_stats: bool = False,
                       penalty_key: jax.Array | None = None) -> Attend:
  """The causal attention of the training forward (and of prefill).

  `full`: dense causal attention. Sparse variants: selection + block-sparse
  attention (`sparse_attention.nosa_attention`). aux holds
  `locality_penalty` (sampled with `penalty_key` when
  `sp.locality_sample_fraction` < 1, else exact), and with collect_stats
  the selection statistics and the bias.
  """
  def attend(q_BTHD, k_BTKD, v_BTKD, bias_BTK):
    if not sp.is_sparse:
      return attention.causal_attention(q_BTHD, k_BTKD, v_BTKD), {}
    out_BTHD, aux = sparse_attention.nosa_attention(
        q_BTHD, k_BTKD, v_BTKD, bias_BTK, sp, penalty_key=penalty_key)
    if not collect_stats:
      return out_BTHD, {"locality_penalty": aux["locality_penalty"]}
    if bias_BTK is not None:
      aux = dict(aux, bias_BTK=bias_BTK)
    return out_BTHD, aux
  return attend


def serving_params(params: Any, cfg: config_lib.ModelConfig) -> Any:
  """`params` with the MATMUL_WEIGHTS and EMBEDDINGS cast once to cfg.dtype.

  The layer math casts exactly these to the compute dtype at every use, so
  the results are bit-identical while a decode step reads half the weight
  bytes of fp32 training parameters. Norm scales and the eviction head
  (used in fp32) are kept.
  """
  dt = jnp.dtype(cfg.dtype)
  cast_names = frozenset(MATMUL_WEIGHTS + EMBEDDINGS)

  def cast(path, x):
    names = {getattr(k, "key", None) for k in path}
    if names & cast_names and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dt)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------
# Thin NNX shells: they own the parameters and call the functions above.
# ----------------------------------------------------------------------------


class Attention(nnx.Module):
  """GQA attention parameters with, for dma/nosa, the eviction head (§2.2)."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    m, h, k, d = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, pdt = cfg.init_std, jnp.dtype(cfg.param_dtype)
    self.wq = layers.normal_param(rngs, (m, h, d), std, pdt)
    self.wk = layers.normal_param(rngs, (m, k, d), std, pdt)
    self.wv = layers.normal_param(rngs, (m, k, d), std, pdt)
    self.wo = layers.normal_param(rngs, (h, d, m), std, pdt)
    if cfg.attention_bias:  # zero at init, as HF's _init_weights
      self.bq = nnx.Param(jnp.zeros((h, d), pdt))
      self.bk = nnx.Param(jnp.zeros((k, d), pdt))
      self.bv = nnx.Param(jnp.zeros((k, d), pdt))
      self.bo = nnx.Param(jnp.zeros((m,), pdt))
    if cfg.sparse.has_eviction_head:
      # b = A * softplus(delta(concat_h v_h)); A = 0 at init so the model
      # starts as InfLLM-V2 and A moves first (§2.2). delta is stored
      # [K*D, K]; the HF layout `delta.weight` [K, K*D] is its transpose.
      self.evict_a = nnx.Param(jnp.zeros((k,), pdt))
      self.evict_delta = layers.normal_param(rngs, (k * d, k), std, pdt)
      if cfg.attention_bias:
        self.evict_delta_b = nnx.Param(jnp.zeros((k,), pdt))


class Block(nnx.Module):
  """Pre-norm decoder block; its forward is `block`."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.attn_norm = layers.RMSNorm(cfg.model_dim, cfg.rms_eps, pdt,
                                    rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.model_dim, cfg.rms_eps, pdt, rngs=rngs)
    self.mlp = layers.MLP(cfg.model_dim, cfg.mlp_dim, cfg.init_std, dt, pdt,
                          rngs=rngs, bias=cfg.mlp_bias)

  def __call__(self, x_BTM: jax.Array, positions_BT: jax.Array,
               collect_stats: bool = False,
               penalty_key: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    return block(nnx.state(self, nnx.Param), self.cfg, x_BTM, positions_BT,
                 training_attention(self.cfg.sparse, collect_stats,
                                    penalty_key))


def _layer_keys(key: jax.Array | None, num_layers: int) -> jax.Array | None:
  """[L] keys fold_in(key, i), one per layer's penalty draw (or None)."""
  if key is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(num_layers))


def _remat_policy(cfg: config_lib.ModelConfig):
  """The jax.checkpoint policy of `cfg.remat`.

  With `cfg.remat_keeps_selection` the block mask of the selection is saved
  (B*K*T*N bytes per layer): recomputing it in the backward repeats the
  whole selection, its scores and both top-k, per layer (timed in
  experiments/results/training/NOTES.md), for a value that carries no
  gradient.
  """
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if not cfg.remat_keeps_selection:
    return {"full": None, "dots": dots}[cfg.remat]  # None: save nothing
  keep = jax.checkpoint_policies.save_only_these_names(
      sparse_attention.SELECTION_CHECKPOINT_NAME)
  return {"full": keep,
          "dots": jax.checkpoint_policies.save_from_both_policies(dots, keep),
          }[cfg.remat]


class Transformer(nnx.Module):
  """Decoder-only LM: embed -> blocks -> RMSNorm -> (tied) LM head."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs,
               make_blocks: bool = True):
    """`make_blocks=False` leaves `blocks` empty (`init` fills them)."""
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = layers.normal_param(rngs, (cfg.vocab_size, cfg.model_dim),
                                     cfg.init_std, pdt)
    self.blocks = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers * make_blocks)])
    self.final_norm = layers.RMSNorm(cfg.model_dim, cfg.rms_eps, pdt,
                                     rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.normal_param(rngs, (cfg.model_dim, cfg.vocab_size),
                                         cfg.init_std, pdt)

  def __call__(self, tokens_BT: jax.Array,
               positions_BT: jax.Array | None = None, *,
               collect_stats: bool = False,
               penalty_key: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Logits for every position.

    Args:
      tokens_BT: int token ids.
      positions_BT: absolute positions for RoPE (default 0..T-1 per row).
        The sparse selection sees the T tokens as a whole sequence
        (0..T-1, its keys are these tokens); a chunk of a longer sequence
        selects against its whole key prefix through
        `sparse_attention.nosa_attention(..., positions_T)` (an engine's
        chunked prefill).
      collect_stats: also return per-layer selection statistics (slower;
        used at logging steps, never inside the train step).
      penalty_key: PRNG key of the sampled locality penalty (the train
        step's); layer i draws with fold_in(penalty_key, i). None: the
        exact penalty (`selection.locality_penalty`).

    Returns:
      (logits_BTV in fp32, aux) where aux has `locality_penalty` (mean
      over layers) and, with collect_stats, `layers`: one dict per layer.
    """
    cfg = self.cfg
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]),
                                      tokens_BT.shape)
    top = nnx.state(self, nnx.Param)
    x_BTM = embed(top, cfg, tokens_BT)
    penalty = jnp.zeros((), jnp.float32)
    layer_stats = []
    keys = _layer_keys(penalty_key, cfg.num_layers)
    if cfg.scan_layers and not collect_stats:
      x_BTM, penalty = self._scan_blocks(x_BTM, positions_BT, keys)
    else:
      for i, blk in enumerate(self.blocks):
        key = None if keys is None else keys[i]
        if cfg.remat != "none" and not collect_stats:
          run = nnx.remat(lambda b, x, p, key: b(x, p, penalty_key=key),
                          policy=_remat_policy(cfg))
          x_BTM, aux = run(blk, x_BTM, positions_BT, key)
        else:
          x_BTM, aux = blk(x_BTM, positions_BT, collect_stats, key)
        penalty = penalty + jnp.asarray(aux.pop("locality_penalty", 0.0),
                                        jnp.float32)
        layer_stats.append(aux)
    logits_BTV = logits(top, cfg, x_BTM)
    # Mean over layers, so `locality_weight` does not scale with depth.
    out: Aux = {"locality_penalty": penalty / cfg.num_layers}
    if collect_stats:
      out["layers"] = layer_stats
    return logits_BTV, out

  def _scan_blocks(self, x_BTM: jax.Array, positions_BT: jax.Array,
                   keys: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """All blocks as one `lax.scan` step, compiled once (`scan_layers`).

    The parameters stay one dict per layer (decode, checkpoints, HF export
    and the sharding rules index `params["blocks"][i]`); they are stacked
    along a new leading layer axis here, inside the forward, and the
    gradient of the stack flows back to every layer's own arrays. The
    penalty is accumulated in the carry in layer order, the same sum as
    the Python loop. Cost: the stack is a copy of the block parameters
    (the matmul weights in the compute dtype, the rest in param dtype) that
    lives until the backward pass has read it, and the gradient is first
    built stacked, then split per layer.

    Args:
      x_BTM: the embedded tokens.
      positions_BT: their positions.
      keys: [L] penalty keys per layer (`_layer_keys`) or None.

    Returns:
      (x_BTM after the last block, locality penalty summed over layers).
    """
    splits = [nnx.split(blk) for blk in self.blocks]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits):
      raise ValueError("model.scan_layers=True needs structurally identical "
                       "blocks; got blocks with different graphdefs")
    dt = jnp.dtype(self.cfg.dtype)

    def stack(path, *xs):
      # The matmul weights are cast to the compute dtype where they are
      # used; casting before the stack gives the same numbers and halves
      # the stacked copy (and its gradient) for bf16 compute.
      name = jax.tree_util.keystr(path[-2:-1], simple=True)
      cast = name in MATMUL_WEIGHTS
      return jnp.stack([x.astype(dt) if cast else x for x in xs])

    stacked = jax.tree.map_with_path(stack, *(state for _, state in splits))

    def step(carry, xs):
      (x_BTM, penalty), (p_block, key) = carry, xs
      attend = training_attention(self.cfg.sparse, penalty_key=key)
      x_BTM, aux = block(p_block, self.cfg, x_BTM, positions_BT, attend)
      penalty = penalty + jnp.asarray(aux.get("locality_penalty", 0.0),
                                      jnp.float32)
      return (x_BTM, penalty), None

    if self.cfg.remat != "none":
      # Same policy as the loop's per-block nnx.remat. prevent_cse=False is
      # safe inside scan (the loop boundary already blocks CSE) and is
      # what the JAX docs recommend there.
      step = jax.checkpoint(step, policy=_remat_policy(self.cfg),
                            prevent_cse=False)
    carry = (x_BTM, jnp.zeros((), jnp.float32))
    (x_BTM, penalty), _ = jax.lax.scan(step, carry, (stacked, keys))
    return x_BTM, penalty


# ----------------------------------------------------------------------------
# Functional interface.
# ----------------------------------------------------------------------------


def init(cfg: config_lib.ModelConfig, seed: int,
         shardings_for: Callable[[Any], Any] | None = None
         ) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, params as a pure pytree) of a fresh model.

  Built piece by piece: the embedding / final norm / head, then every block
  with key fold_in(key(seed), layer + 1) (the top uses layer 0). With
  `shardings_for` each piece is one jitted program (the blocks' compiled
  once and run per layer): one program for the whole model took over 4
  minutes to compile on the GPU at 28 layers (XLA compiles each layer's
  RNG anew). Without it the pieces run eagerly (no compile; the same
  numbers up to the rounding of fused ops). The jitted values depend only
  on `cfg` and `seed`, never on the mesh.

  Args:
    cfg: the model config.
    seed: the parameter seed.
    shardings_for: maps a tree of shape structs to its shardings (e.g.
      `sharding.tree_shardings(tree, mesh)`, or `lambda tree: None` for the
      default placement); each piece is then created by a jitted program
      directly in its shards, so a large model never sits on one device.
      None: eager, default placement.
  """
  key = jax.random.key(seed)
  if shardings_for is None:  # eager: no compile (tests build many configs)
    top, block = _top_params, _block_params
  else:
    def sharded(fn):
      out = shardings_for(jax.eval_shape(functools.partial(fn, cfg), key))
      return jax.jit(fn, static_argnums=0, out_shardings=out)
    top, block = sharded(_top_params), sharded(_block_params)
  graphdef, _ = abstract_params(cfg)
  flat = dict(nnx.to_flat_state(top(cfg, jax.random.fold_in(key, 0))))
  for i in range(cfg.num_layers):
    for path, value in nnx.to_flat_state(
        block(cfg, jax.random.fold_in(key, i + 1))):
      flat[("blocks", i) + tuple(path)] = value
  return graphdef, nnx.from_flat_state(flat)


def _top_params(cfg: config_lib.ModelConfig, key: jax.Array) -> Any:
  """Embedding, final norm and head of a fresh model (no blocks)."""
  model = Transformer(cfg, rngs=nnx.Rngs(params=key), make_blocks=False)
  return nnx.split(model, nnx.Param)[1]


def _block_params(cfg: config_lib.ModelConfig, key: jax.Array) -> Any:
  return nnx.split(Block(cfg, rngs=nnx.Rngs(params=key)), nnx.Param)[1]



def abstract_params(cfg: config_lib.ModelConfig) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, ShapeDtypeStruct params) without allocating (jax.eval_shape)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
  return nnx.split(model, nnx.Param)


def apply(graphdef: nnx.GraphDef, params: Any, tokens_BT: jax.Array,
          positions_BT: jax.Array | None = None, *,
          collect_stats: bool = False,
          penalty_key: jax.Array | None = None) -> tuple[jax.Array, Aux]:
  """Pure forward pass: `Transformer(tokens)` from (graphdef, params)."""
  model = nnx.merge(graphdef, params)
  return model(tokens_BT, positions_BT, collect_stats=collect_stats,
               penalty_key=penalty_key)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
