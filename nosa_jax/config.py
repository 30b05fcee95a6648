"""Typed, frozen configuration for models, data and training.

A ConfigDict from `configs/*.py` is turned into these dataclasses exactly once
(`ExperimentConfig.from_dict(config.to_dict())`) in the entry point; the
library never sees a ConfigDict. Frozen dataclasses are hashable, so
`ModelConfig` / `SparseConfig` are safe as `jax.jit` static arguments.

Every invalid value raises `ConfigError` with a one-line message naming the
field and what is allowed; entry points print it and exit without a
traceback. Sparse field names follow NOSA_SPEC.md "Project decisions" 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from nosa_jax import implementations

VARIANTS = ("full", "infllmv2", "dma", "nosa")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
  """An invalid configuration value; the message is one line."""


def _require(cond: bool, field: str, allowed: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def _one_of(value: Any, field: str, allowed: tuple[Any, ...]) -> None:
  _require(value in allowed, field,
           f"must be one of {', '.join(map(str, allowed))}", value)


def _positive_int(obj: Any, prefix: str, *names: str) -> None:
  for name in names:
    v = getattr(obj, name)
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
             f"{prefix}.{name}", "must be a positive integer", v)


def _from_mapping(cls, d: Mapping[str, Any], prefix: str, **nested):
  """Builds dataclass `cls` from `d`, rejecting unknown keys by name."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(
        f"{prefix}.{unknown[0]} is not a known field; known fields: "
        f"{', '.join(sorted(names))}")
  kwargs = dict(d)
  kwargs.update(nested)
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Attention variant and NOSA selection constants (NOSA_SPEC.md §2.0).

  Attributes:
    variant: `full` (dense causal), `infllmv2` (query-aware top-k),
      `dma` (eviction score only, with bias) or `nosa` (two-phase, §2.5).
    implementation: `xla` (pure JAX) or `pallas` (GPU kernels) for the
      block-sparse attention of training / prefill, and for decode
      attention unless `decode_implementation` says otherwise; `mosaic`
      (the Mosaic GPU kernels, bf16 / fp16, D % 64 == 0, C = 64; its
      backward takes D <= 128, and differentiating larger D is an error).
      Kernels run in Pallas interpret mode off the GPU
      (nosa_jax/implementations.py resolves every kernel choice).
    decode_implementation: decode attention over the cached blocks: `auto`
      (the same as `implementation`; `pallas` under `mosaic`), `xla`,
      `pallas` (split-K kernel) or `triton` (the same kernel through
      jax-triton; GPU only).
    score_dtype: `float32` ranks the block scores as computed (project
      decision 2); `bfloat16` rounds them to bf16 first, as upstream's
      stage-1 and pooling kernels store them, so that blocks upstream
      sees as tied tie here too (broken toward the lower index, where
      torch.topk's order is unspecified): closer to the released models'
      selection, not bit-equal (selection.py "Ties").
    score_implementation: how training and prefill selection compute the
      query-aware block scores: `xla` (einsum + softmax + block max) or
      `pallas` (`pallas_kernels.block_scores`, no [T, W] matrix in HBM).
      Decode scores its one query with XLA either way (measured faster,
      `selection.select_decode_blocks`).
      `xla` by default; the paper configs pick `pallas` (configs/common.py;
      timings in experiments/results/kernels/NOTES.md).
    block_size: tokens per KV block (C); paper 64.
    compress_kernel: tokens per compressed-key window; paper 32.
    compress_stride: stride between compressed windows; paper 16.
    topk_blocks: total selected blocks per (query, KV head) (P); paper 64.
    query_topk_blocks: phase-1 query-aware top-k, including the forced
      sink and window blocks; paper 33.
    sink_blocks: always-selected initial blocks; paper 1.
    window_blocks: always-selected blocks before the query's own block
      (the own block is always selected too); paper 16.
    locality_weight: weight of the differentiable locality penalty
      (project decision 5); 0.0 reproduces the paper.
    locality_sample_fraction: share of each sequence's query-block
      segments the penalty is evaluated on per training step, in (0, 1]:
      1.0 is the exact penalty; below it an unbiased estimate of it at
      about that share of its cost (`selection.locality_penalty`).
    query_chunk: queries per chunk in the memory-bounded `xla` path.
  """

  variant: Literal["full", "infllmv2", "dma", "nosa"] = "nosa"
  implementation: Literal["xla", "pallas", "mosaic"] = "xla"
  decode_implementation: Literal["auto", "xla", "pallas", "triton"] = "auto"
  score_implementation: Literal["xla", "pallas"] = "xla"
  score_dtype: Literal["float32", "bfloat16"] = "float32"
  block_size: int = 64
  compress_kernel: int = 32
  compress_stride: int = 16
  topk_blocks: int = 64
  query_topk_blocks: int = 33
  sink_blocks: int = 1
  window_blocks: int = 16
  locality_weight: float = 0.0
  locality_sample_fraction: float = 1.0
  query_chunk: int = 512

  def __post_init__(self):
    p = "model.sparse"
    _one_of(self.variant, f"{p}.variant", VARIANTS)
    impl = implementations.choices
    _one_of(self.implementation, f"{p}.implementation",
            impl("block_sparse_attention"))
    _one_of(self.decode_implementation, f"{p}.decode_implementation",
            impl("decode_attention"))
    _one_of(self.score_implementation, f"{p}.score_implementation",
            impl("block_scores"))
    _one_of(self.score_dtype, f"{p}.score_dtype", ("float32", "bfloat16"))
    _positive_int(self, p, "block_size", "compress_kernel", "compress_stride",
                  "topk_blocks", "query_topk_blocks", "query_chunk")
    for name in ("sink_blocks", "window_blocks"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, f"{p}.{name}",
               "must be a non-negative integer", v)
    _require(self.block_size % self.compress_stride == 0, f"{p}.block_size",
             f"must be divisible by compress_stride={self.compress_stride}",
             self.block_size)
    _require(self.compress_kernel >= self.compress_stride,
             f"{p}.compress_kernel",
             f"must be >= compress_stride={self.compress_stride}",
             self.compress_kernel)
    # A block's eviction score pools windows reaching (kernel - stride)
    # tokens into the next block; the forced window must cover that reach,
    # or a query's selection would read tokens after it (a causality leak).
    reach = self.compress_kernel - self.compress_stride
    _require(self.window_blocks * self.block_size >= reach,
             f"{p}.window_blocks",
             f"must be >= {-(-reach // self.block_size)} so window_blocks * "
             f"block_size covers compress_kernel - compress_stride = {reach}",
             self.window_blocks)
    forced = self.sink_blocks + self.window_blocks + 1
    _require(self.query_topk_blocks >= forced, f"{p}.query_topk_blocks",
             f"must be >= sink_blocks + window_blocks + 1 = {forced}",
             self.query_topk_blocks)
    _require(self.topk_blocks >= self.query_topk_blocks, f"{p}.topk_blocks",
             f"must be >= query_topk_blocks={self.query_topk_blocks}",
             self.topk_blocks)
    _require(isinstance(self.locality_weight, (int, float))
             and self.locality_weight >= 0, f"{p}.locality_weight",
             "must be a number >= 0", self.locality_weight)
    f = self.locality_sample_fraction
    _require(isinstance(f, (int, float)) and not isinstance(f, bool)
             and 0 < f <= 1, f"{p}.locality_sample_fraction",
             "must be a number in (0, 1] (1.0: the exact penalty)", f)

  @property
  def is_sparse(self) -> bool:
    """Whether attention is block-sparse (every variant but `full`)."""
    return self.variant != "full"

  @property
  def query_aware(self) -> bool:
    """Whether selection scores the query against compressed keys (kbar)."""
    return self.variant in ("infllmv2", "nosa")

  @property
  def has_eviction_head(self) -> bool:
    """Whether the variant owns the eviction head (A, delta) and its bias,
    which enters both the attention logits and the query-agnostic scores."""
    return self.variant in ("dma", "nosa")


ROPE_TYPES = ("default", "linear", "longrope", "llama3", "yarn")
# RopeScaling.long_factor_above for "never" (no position reaches it).
NEVER = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF `rope_scaling`), from its published formulas.

  With inv_freq_i = 1 / theta^(2i/D), i < D/2, the rotation angle of
  position p is p * f_i, and cos / sin are multiplied by
  `attention_factor` (so q.k scales by its square):

    default:  f_i = inv_freq_i.
    linear:   f_i = inv_freq_i / factor (position interpolation).
    longrope: f_i = inv_freq_i / ext_i, ext = long_factor when the row's
              sequence length (its largest position + 1) exceeds
              `long_factor_above`, else short_factor (LongRoPE; MiniCPM4).
    llama3:   f_i = inv_freq_i / factor for wavelengths 2 pi / inv_freq_i
              above original_max_position_embeddings / low_freq_factor,
              inv_freq_i below original / high_freq_factor, linearly
              interpolated in 1 / wavelength between.
    yarn:     f_i = inv_freq_i * ((1 - r_i) / factor + r_i), r_i the ramp
              from 1 (dims with more than beta_fast rotations over
              original_max_position_embeddings) to 0 (fewer than beta_slow).

  `hf_io` fills every field from a config.json, including the values the
  upstream code derives (attention_factor, long_factor_above), so the math
  here needs no defaults from elsewhere.

  Attributes:
    rope_type: one of ROPE_TYPES.
    factor: linear / llama3 / yarn scale.
    original_max_position_embeddings: the pre-extension context (llama3,
      yarn, and longrope's report).
    short_factor, long_factor: LongRoPE per-frequency divisors (D/2 each).
    long_factor_above: LongRoPE uses long_factor for sequences longer than
      this many tokens (0: always; NEVER: never).
    attention_factor: multiplies cos and sin.
    low_freq_factor, high_freq_factor: llama3 band edges.
    beta_fast, beta_slow: yarn ramp edges, in rotations.
  """

  rope_type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int = 0
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  long_factor_above: int = 0
  attention_factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0

  def __post_init__(self):
    p = "model.rope_scaling"
    for name in ("short_factor", "long_factor"):  # JSON gives lists
      object.__setattr__(self, name,
                         tuple(float(x) for x in getattr(self, name)))
    _one_of(self.rope_type, f"{p}.rope_type", ROPE_TYPES)
    for name in ("factor", "attention_factor"):
      _require(isinstance(getattr(self, name), (int, float))
               and getattr(self, name) > 0, f"{p}.{name}", "must be > 0",
               getattr(self, name))
    t = self.rope_type
    if t == "longrope":
      _require(len(self.short_factor) == len(self.long_factor) > 0,
               f"{p}.long_factor", "longrope needs short_factor and "
               "long_factor of one length (head_dim / 2)", self.long_factor)
      _require(all(x > 0 for x in self.short_factor + self.long_factor),
               f"{p}.short_factor", "factors must be > 0", self.short_factor)
    else:
      _require(not self.short_factor and not self.long_factor,
               f"{p}.long_factor", f"only longrope takes factors, not {t}",
               self.long_factor)
    if t in ("llama3", "yarn", "longrope"):
      _require(self.original_max_position_embeddings > 0,
               f"{p}.original_max_position_embeddings",
               f"{t} needs it > 0", self.original_max_position_embeddings)
    if t == "llama3":
      _require(self.high_freq_factor > self.low_freq_factor > 0,
               f"{p}.high_freq_factor",
               f"must be > low_freq_factor={self.low_freq_factor} > 0",
               self.high_freq_factor)
    if t == "yarn":
      _require(self.beta_fast > self.beta_slow > 0, f"{p}.beta_fast",
               f"must be > beta_slow={self.beta_slow} > 0", self.beta_fast)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-style decoder shape (NOSA_SPEC.md §1).

  Attributes:
    vocab_size: V.
    num_layers: decoder blocks.
    model_dim: M.
    num_heads: query heads H.
    num_kv_heads: KV heads K; H must be divisible by K.
    head_dim: D (even, for RoPE).
    mlp_dim: F of the SwiGLU MLP.
    rope_theta: RoPE base (NeoX rotate-half convention).
    rope_scaling: RoPE frequency scaling (`RopeScaling`; default none).
    rms_eps: RMSNorm epsilon.
    tie_embeddings: share the embedding with the LM head.
    init_std: normal init std (HF `initializer_range`).
    attention_bias: biases on the q / k / v / o projections and, for dma /
      nosa, on the eviction head's delta (HF `attention_bias`).
    mlp_bias: biases on the gate / up / down projections (HF `mlp_bias`).
    embed_scale: multiplies the token embeddings (MiniCPM `scale_emb`).
    residual_scale: multiplies each attention and MLP output before it is
      added to the residual stream (MiniCPM scale_depth / sqrt(layers)).
    logits_scale: multiplies the final normed state before the LM head
      (MiniCPM dim_model_base / hidden_size).
    dtype: compute dtype; parameters are kept in `param_dtype`.
    param_dtype: parameter storage dtype.
    remat: `none`, `full` (recompute each block) or `dots` (save matmuls).
    remat_keeps_selection: with remat, also keep each layer's block mask of
      the sparse selection (B*K*T*N bytes), so that the backward does not
      repeat the selection (its scores and both top-k) only to rebuild a
      value without gradient. False recomputes it (less memory at very
      long T).
    scan_layers: run the blocks as one `jax.lax.scan` over their parameters
      stacked inside the forward, so the layer stack is compiled once
      instead of unrolled (minutes saved for deep models with Pallas
      kernels), at the cost of one transient copy of the block parameters.
      The parameter layout (one dict per block) is unchanged.
      `collect_stats` forwards always use the Python loop.
    sparse: attention variant and selection constants.
  """

  vocab_size: int = 259
  num_layers: int = 2
  model_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 192
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  init_std: float = 0.02
  attention_bias: bool = False
  mlp_bias: bool = False
  embed_scale: float = 1.0
  residual_scale: float = 1.0
  logits_scale: float = 1.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  remat_keeps_selection: bool = True
  scan_layers: bool = False
  sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)

  def __post_init__(self):
    p = "model"
    _positive_int(self, p, "vocab_size", "num_layers", "model_dim",
                  "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    _require(self.num_heads % self.num_kv_heads == 0, f"{p}.num_heads",
             f"must be divisible by num_kv_heads={self.num_kv_heads}",
             self.num_heads)
    _require(self.head_dim % 2 == 0, f"{p}.head_dim",
             "must be even (RoPE rotates pairs)", self.head_dim)
    _require(self.rope_theta > 0, f"{p}.rope_theta", "must be > 0",
             self.rope_theta)
    _require(self.rms_eps > 0, f"{p}.rms_eps", "must be > 0", self.rms_eps)
    _require(self.init_std > 0, f"{p}.init_std", "must be > 0", self.init_std)
    for name in ("dtype", "param_dtype"):
      _require(getattr(self, name) in DTYPES, f"{p}.{name}",
               f"must be one of {', '.join(DTYPES)}", getattr(self, name))
    _require(self.remat in REMAT_POLICIES, f"{p}.remat",
             f"must be one of {', '.join(REMAT_POLICIES)}", self.remat)
    for name in ("embed_scale", "residual_scale", "logits_scale"):
      v = getattr(self, name)
      _require(isinstance(v, (int, float)) and not isinstance(v, bool)
               and v > 0, f"{p}.{name}", "must be a number > 0", v)
    for name in ("remat_keeps_selection", "scan_layers", "attention_bias",
                 "mlp_bias"):
      _require(isinstance(getattr(self, name), bool), f"{p}.{name}",
               "must be a bool", getattr(self, name))

  @property
  def group_size(self) -> int:
    """G = H / K query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    d = dict(d)
    sparse = _from_mapping(SparseConfig, d.pop("sparse", {}), "model.sparse")
    rope = _from_mapping(RopeScaling, d.pop("rope_scaling", {}),
                         "model.rope_scaling")
    return _from_mapping(cls, d, "model", sparse=sparse, rope_scaling=rope)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from.

  Attributes:
    source: `stdlib` (the running interpreter's standard-library sources, the
      built-in default corpus) or a path: a text file, a `.jsonl` file (field
      `text_field`), a directory of such files, or a pre-tokenized `.npy`
      token file.
    tokenizer: `bytes` (256 bytes + BOS/EOS/PAD) or a path to a
      `tokenizer.json`.
    text_field: the jsonl field holding the text.
    holdout_fraction: fraction of documents kept for the eval split.
    cache_dir: where tokenized corpora are cached ('' = ~/.cache/nosa_jax).
    passkey_fraction: fraction of training windows replaced by synthetic
      passkey documents (`nosa_jax.passkey`; the answer is inside the
      window), so that small models learn the long-range retrieval the
      passkey evaluation measures. 0 = the plain corpus. The eval split is
      never changed.
    recall_fraction: fraction of training windows replaced by synthetic
      associative-recall documents (`nosa_jax.recall`: multi-key
      needle-in-a-haystack and MQAR records over the whole window, keys
      from the training part of the key space). 0 = none. With
      passkey_fraction, the two together are at most 1.
    recall_mqar_share: of the recall windows, the share with the MQAR
      shape (8-64 records, 4-16 asked back); the rest are multi-key NIAH
      (1-4 records, 1-4 asked back).
    recall_segment_tokens: 0 = one recall document per window; else a
      recall window holds 1 to max(1, (seq_len + 1) // this) documents of
      random lengths (`recall.RecallBuilder.training_window`), so record
      to query distances also run short and a window asks back more.
  """

  source: str = "stdlib"
  tokenizer: str = "bytes"
  text_field: str = "text"
  holdout_fraction: float = 0.01
  cache_dir: str = ""
  passkey_fraction: float = 0.0
  recall_fraction: float = 0.0
  recall_mqar_share: float = 0.5
  recall_segment_tokens: int = 0

  def __post_init__(self):
    _require(isinstance(self.source, str) and self.source, "data.source",
             "must be 'stdlib' or a path", self.source)
    _require(0.0 < self.holdout_fraction < 0.5, "data.holdout_fraction",
             "must be in (0, 0.5)", self.holdout_fraction)
    _require(isinstance(self.passkey_fraction, (int, float))
             and not isinstance(self.passkey_fraction, bool)
             and 0.0 <= self.passkey_fraction <= 1.0, "data.passkey_fraction",
             "must be a number in [0, 1]", self.passkey_fraction)
    for name in ("recall_fraction", "recall_mqar_share"):
      value = getattr(self, name)
      _require(isinstance(value, (int, float)) and not isinstance(value, bool)
               and 0.0 <= value <= 1.0, f"data.{name}",
               "must be a number in [0, 1]", value)
    _require(isinstance(self.recall_segment_tokens, int)
             and not isinstance(self.recall_segment_tokens, bool)
             and self.recall_segment_tokens >= 0,
             "data.recall_segment_tokens", "must be an integer >= 0",
             self.recall_segment_tokens)
    _require(self.passkey_fraction + self.recall_fraction <= 1.0,
             "data.recall_fraction", "must be at most 1 - "
             f"data.passkey_fraction ({self.passkey_fraction})",
             self.recall_fraction)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging and checkpointing.

  Attributes:
    seq_len: tokens per training sequence (T).
    batch_size: sequences per step (B), global.
    num_steps: total optimiser steps (a resumed run continues to this).
    learning_rate: peak AdamW learning rate.
    min_lr_ratio: final cosine learning rate as a fraction of the peak.
    warmup_steps: linear warmup steps.
    weight_decay: AdamW decoupled weight decay.
    b1, b2, eps: AdamW moments.
    grad_clip: global-norm clip (0 disables).
    seed: parameter init, data order and dropout-free RNG stream.
    log_every: steps between terminal / TensorBoard lines.
    log_locality: at each log line of a sparse variant, also compute the
      per-layer selection statistics (one forward pass of one sequence,
      compiled on its first call; timing runs turn it off).
    eval_every: steps between held-out evaluations (0 disables).
    eval_batches: batches per evaluation.
    checkpoint_every: steps between checkpoints (0: only at the end).
    keep_checkpoints: how many checkpoints orbax keeps.
    peak_tflops: per-device peak for the MFU estimate (0: guess from the
      device kind; unknown devices print no MFU).
    mesh_shape: device mesh (data, fsdp, tensor); one entry may be -1 to
      take the remaining devices. (-1, 1, 1) is plain data parallelism and
      works unchanged on one device.
    on_divergence: what a non-finite loss does: `stop` (set aside the
      checkpoints that are not good, name the last good one, exit) or
      `rollback` (the same, then resume from it with the learning rate
      times `rollback_lr_scale`, at most `max_rollbacks` times).
    rollback_lr_scale: learning-rate factor of each rollback, in (0, 1).
    max_rollbacks: rollbacks before a diverging run stops anyway.
  """

  seq_len: int = 128
  batch_size: int = 8
  num_steps: int = 100
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 10
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  log_locality: bool = True
  eval_every: int = 50
  eval_batches: int = 4
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  peak_tflops: float = 0.0
  mesh_shape: tuple[int, int, int] = (-1, 1, 1)
  on_divergence: Literal["stop", "rollback"] = "stop"
  rollback_lr_scale: float = 0.5
  max_rollbacks: int = 3

  def __post_init__(self):
    p = "train"
    object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))
    _require(len(self.mesh_shape) == 3
             and all(isinstance(s, int) and (s > 0 or s == -1)
                     for s in self.mesh_shape)
             and self.mesh_shape.count(-1) <= 1, f"{p}.mesh_shape",
             "must be 3 sizes (data, fsdp, tensor), positive or one -1",
             self.mesh_shape)
    _positive_int(self, p, "seq_len", "batch_size", "num_steps", "log_every",
                  "eval_batches", "keep_checkpoints")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, f"{p}.{name}",
               "must be a non-negative integer", v)
    _require(self.learning_rate > 0, f"{p}.learning_rate", "must be > 0",
             self.learning_rate)
    _require(0.0 <= self.min_lr_ratio <= 1.0, f"{p}.min_lr_ratio",
             "must be in [0, 1]", self.min_lr_ratio)
    _require(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0",
             self.weight_decay)
    for name in ("b1", "b2"):
      _require(0.0 <= getattr(self, name) < 1.0, f"{p}.{name}",
               "must be in [0, 1)", getattr(self, name))
    _require(self.eps > 0, f"{p}.eps", "must be > 0", self.eps)
    _require(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0",
             self.grad_clip)
    _require(self.peak_tflops >= 0, f"{p}.peak_tflops", "must be >= 0",
             self.peak_tflops)
    _require(self.warmup_steps < self.num_steps, f"{p}.warmup_steps",
             f"must be < num_steps={self.num_steps}", self.warmup_steps)
    _one_of(self.on_divergence, f"{p}.on_divergence", ("stop", "rollback"))
    _require(0.0 < self.rollback_lr_scale < 1.0, f"{p}.rollback_lr_scale",
             "must be in (0, 1)", self.rollback_lr_scale)
    _require(isinstance(self.max_rollbacks, int) and self.max_rollbacks >= 0,
             f"{p}.max_rollbacks", "must be a non-negative integer",
             self.max_rollbacks)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one training run needs."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
    """Builds and validates from a plain nested dict (ConfigDict.to_dict())."""
    d = dict(d)
    model = ModelConfig.from_dict(d.pop("model", {}))
    data = _from_mapping(DataConfig, d.pop("data", {}), "data")
    train = _from_mapping(TrainConfig, d.pop("train", {}), "train")
    # Keys outside model/data/train (e.g. the config file's `arg`) are
    # bookkeeping for configs/*.py and are ignored here.
    return cls(model=model, data=data, train=train)


# ----------------------------------------------------------------------------
# Resuming a run under a changed config.
# ----------------------------------------------------------------------------

# Fields a resumed run may change: none of them touches a parameter or
# optimizer shape, the state tree or the data order. Every other field is
# fixed by the run's checkpoints (model shape and variant, selection
# constants, parameter dtype, data source and tokenizer, seq_len, batch
# size, seed). The penalty's sample fraction changes the noise of its
# estimate, not its expectation (selection.locality_penalty).
RESUME_MUTABLE = frozenset({
    "model.dtype", "model.remat", "model.remat_keeps_selection",
    "model.scan_layers", "model.sparse.implementation",
    "model.sparse.decode_implementation", "model.sparse.score_implementation",
    "model.sparse.query_chunk", "model.sparse.locality_sample_fraction",
    "data.cache_dir", "train.num_steps",
    "train.learning_rate", "train.min_lr_ratio", "train.warmup_steps",
    "train.weight_decay", "train.b1", "train.b2", "train.eps",
    "train.grad_clip", "train.log_every", "train.log_locality",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.peak_tflops", "train.mesh_shape",
    "train.on_divergence", "train.rollback_lr_scale", "train.max_rollbacks"})


class ResumeRefused(ConfigError):
  """A resumed run's config changes a field its checkpoints fix."""


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def flat_fields(cfg: ExperimentConfig) -> dict[str, Any]:
  """{dotted field name: value} of a config, e.g. `train.seq_len`."""
  return _flat(dataclasses.asdict(cfg))


def config_diff(stored: Mapping[str, Any], cfg: ExperimentConfig
                ) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (stored value, new value)} for the fields that differ.

  `stored` is a run's config.json; fields it lacks (written by older code)
  count as their defaults.
  """
  try:
    stored = dataclasses.asdict(ExperimentConfig.from_dict(stored))
  except (ConfigError, TypeError):
    pass  # a field since removed: compare as written
  old = _flat({k: stored[k] for k in ("model", "data", "train")
               if k in stored})
  new = flat_fields(cfg)
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def resume_conflicts(changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
  """The changed fields a resumed run may not change."""
  fixed = [k for k in changes if k not in RESUME_MUTABLE]
  if "train.grad_clip" in changes:
    old, new = changes["train.grad_clip"]
    if ((old or 0) > 0) != (new > 0):  # clipping on/off changes the tree
      fixed.append("train.grad_clip")
  return fixed


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {old!r} -> {new!r}"
                   for k, (old, new) in changes.items())
