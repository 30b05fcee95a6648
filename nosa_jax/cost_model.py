"""Decode cost model: predicted bytes, times and throughput per decode step.

PERFORMANCE.md "Decode cost model" as pure functions of a `ModelConfig`
(no JAX, no allocation), so benchmarks and notebooks predict a figure before
measuring it. Per decode step, B sequences, n_l layers, K KV heads, head dim
D, blocks of C tokens, P selected blocks, gamma = fraction of this step's
selected blocks already on the GPU:

  S_sel        = n_l * K * P * C * 2 * D * bytes    selected K+V / sequence
  PCIe / step  = B * (1 - gamma) * S_sel            (offload only)
  serial       = B / (T_gpu + T_pcie)               NOSI: fetch, then compute
  overlapped   = B / max(T_gpu, T_pcie)             the ideal engine
  PCIe ceiling = BW_pcie / ((1 - gamma) * S_sel)    any B, any context

Choices (each also said where it is made):
  * Values are `cfg.dtype` wide, weights and KV alike: a serving copy of the
    fp32 master weights is cast once (the bytes a bf16 engine reads;
    `model.serving_params`). A step given fp32 parameters casts them at
    every use, so it reads twice the weight bytes modelled here.
  * T_gpu is a roofline, max(HBM bytes / BW_hbm, FLOPs / peak): memory and
    math overlap inside the kernels of a step. Decode is memory-bound at the
    batches that fit, so the FLOP term only matters at very large B.
  * HBM bytes per step: the weights once (the embedding table is a gather of
    B rows and is skipped unless tied to the LM head) plus, per sequence,
    the KV read by attention: the whole context for `full`; the selected
    blocks, their fp32 eviction bias and the fp32 compressed keys / window
    means scored by selection for the sparse modes (§4.1 of NOSA_SPEC.md
    keeps these on the GPU also when offloading).
  * Selection can pick no more blocks than the context has:
    P_eff = min(P, ceil(context / C)) in `decode_cost` and the memory
    functions; `selected_kv_bytes` is the formula with P as given.
  * Ignored: activations, logits, writing the new token's K/V, the
    write-back of a completed block to the host (one token's K/V per step on
    average, on the other PCIe direction), kernel launch / host overhead.
"""

from __future__ import annotations

import dataclasses
import math

from nosa_jax import config as config_lib

MODES = ("full", "sparse_resident", "offload")

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_F32 = 4  # bias, compressed keys and window means are fp32 (inference)
_I32 = 4  # slot map entries


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Bandwidths and peak math of one accelerator and its host link.

  Attributes:
    hbm_bytes_per_s: device-memory read bandwidth.
    pcie_bytes_per_s: pinned host -> device bandwidth (bulk or zero-copy
      gather, whichever the engine achieves).
    peak_flops: dense bf16 matmul FLOP/s.
  """

  hbm_bytes_per_s: float
  pcie_bytes_per_s: float
  peak_flops: float

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"Hardware.{f.name}={v!r} is invalid: must be > 0")


# Ceilings measured on the project's H100 80GB HBM3 (PERFORMANCE.md,
# "Ceilings"): HBM read 3.08 TB/s, pinned host -> device ~50 GB/s (bulk
# 47-55, zero-copy CUDA gather 51), bf16 matmul ~700 TFLOP/s (580-800
# measured; 989 nominal). Benchmarks re-measure them in the same run: the
# machines are shared and the figures drift.
H100 = Hardware(hbm_bytes_per_s=3.08e12, pcie_bytes_per_s=50e9,
                peak_flops=700e12)
# H200: the measured ~4.3 TB/s HBM; link and math as on the H100 (assumed).
H200 = Hardware(hbm_bytes_per_s=4.3e12, pcie_bytes_per_s=50e9,
                peak_flops=700e12)
# The paper's Fig. 2(a) machine (quoted, not measured here): an A100/A800
# with 2.0 TB/s HBM and 31.5 GB/s PCIe 4.0; 312 TFLOP/s is the A100 nominal.
PAPER_A100 = Hardware(hbm_bytes_per_s=2.0e12, pcie_bytes_per_s=31.5e9,
                      peak_flops=312e12)


@dataclasses.dataclass(frozen=True)
class DecodeCost:
  """Predicted cost of one decode step of B sequences.

  Attributes:
    t_gpu_s: device time, max(HBM time, FLOP time).
    t_pcie_s: host -> device transfer time (0 unless offloading).
    serial_tokens_per_s: B / (t_gpu + t_pcie), fetch then compute (NOSI).
    overlapped_tokens_per_s: B / max(t_gpu, t_pcie), transfers fully hidden.
    pcie_ceiling_tokens_per_s: BW_pcie / ((1 - gamma) * S_sel), the bound
      no batch size lifts; inf when nothing crosses PCIe.
    hbm_bytes_per_step: bytes read from device memory.
    pcie_bytes_per_step: bytes copied host -> device.
    flops_per_step: matmul and attention FLOPs.
  """

  t_gpu_s: float
  t_pcie_s: float
  serial_tokens_per_s: float
  overlapped_tokens_per_s: float
  pcie_ceiling_tokens_per_s: float
  hbm_bytes_per_step: float
  pcie_bytes_per_step: float
  flops_per_step: float


# ------------------------------------------------------------------------------
# Argument checks (one-line ValueErrors).
# ------------------------------------------------------------------------------


def _check_mode(mode: str, cfg: config_lib.ModelConfig) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is invalid: must be one of "
                     f"{', '.join(MODES)}")
  if mode != "full" and not cfg.sparse.is_sparse:
    raise ValueError(f"mode={mode!r} needs a sparse variant (infllmv2, dma, "
                     "nosa); cfg.sparse.variant is 'full'")


def _check_int(name: str, value, minimum: int) -> None:
  if (not isinstance(value, int) or isinstance(value, bool)
      or value < minimum):
    raise ValueError(f"{name}={value!r} is invalid: must be an integer >= "
                     f"{minimum}")


def _check_gamma(gamma) -> None:
  if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
    raise ValueError(f"gamma={gamma!r} is invalid: must be in [0, 1]")


# ------------------------------------------------------------------------------
# Sizes.
# ------------------------------------------------------------------------------


def bytes_per_value(cfg: config_lib.ModelConfig) -> int:
  """Bytes of one weight / K / V value: the compute dtype (`cfg.dtype`)."""
  return _BYTES[cfg.dtype]


def num_params(cfg: config_lib.ModelConfig) -> int:
  """Parameter count of `model.Transformer(cfg)`, without building it."""
  m, h, k, d, f = (cfg.model_dim, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.mlp_dim)
  attn = 2 * m * h * d + 2 * m * k * d  # wq, wo; wk, wv
  if cfg.sparse.has_eviction_head:
    attn += k + k * d * k  # A [K], delta [K*D, K]
  if cfg.attention_bias:  # bq, bk, bv, bo (+ the eviction head's delta)
    attn += h * d + 2 * k * d + m + (k if cfg.sparse.has_eviction_head
                                     else 0)
  mlp = 3 * m * f + ((2 * f + m) if cfg.mlp_bias else 0)
  layer = attn + mlp + 2 * m  # SwiGLU, two RMSNorm scales
  embed = cfg.vocab_size * m * (1 if cfg.tie_embeddings else 2)
  return cfg.num_layers * layer + embed + m  # + final norm


def weight_bytes(cfg: config_lib.ModelConfig) -> int:
  """Bytes of all weights in `cfg.dtype`: what the GPU holds."""
  return num_params(cfg) * bytes_per_value(cfg)


def weight_bytes_read(cfg: config_lib.ModelConfig) -> int:
  """Weight bytes one decode step reads from HBM.

  An untied embedding table is a gather of B rows (negligible) and is not
  read whole; a tied one is, as the LM head.
  """
  skipped = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.model_dim
  return (num_params(cfg) - skipped) * bytes_per_value(cfg)


def effective_topk(cfg: config_lib.ModelConfig, context_len: int) -> int:
  """P_eff = min(P, ceil(context / C)): blocks a step can select."""
  _check_int("context_len", context_len, 1)
  c = cfg.sparse.block_size
  return min(cfg.sparse.topk_blocks, -(-context_len // c))


def selected_kv_bytes(cfg: config_lib.ModelConfig,
                      topk_blocks: int | None = None) -> int:
  """S_sel = n_l * K * P * C * 2 * D * bytes: selected K+V per sequence.

  Args:
    cfg: the model; C is `cfg.sparse.block_size`, bytes from `cfg.dtype`.
    topk_blocks: P; `cfg.sparse.topk_blocks` when None.

  Returns:
    Bytes of the K and V blocks one sequence's step attends to.
  """
  p = cfg.sparse.topk_blocks if topk_blocks is None else topk_blocks
  _check_int("topk_blocks", p, 1)
  return (cfg.num_layers * cfg.num_kv_heads * p * cfg.sparse.block_size
          * 2 * cfg.head_dim * bytes_per_value(cfg))


def dense_kv_bytes(cfg: config_lib.ModelConfig, context_len: int) -> int:
  """K+V of `context_len` tokens of one sequence, all layers."""
  _check_int("context_len", context_len, 1)
  return (cfg.num_layers * cfg.num_kv_heads * context_len * 2 * cfg.head_dim
          * bytes_per_value(cfg))


def _capacity(cfg: config_lib.ModelConfig, context_len: int) -> int:
  c = cfg.sparse.block_size
  return -(-context_len // c) * c  # the cache holds whole blocks


def _num_windows(cfg: config_lib.ModelConfig, length: int) -> int:
  kern, stride = cfg.sparse.compress_kernel, cfg.sparse.compress_stride
  return 0 if length < kern else (length - kern) // stride + 1


def selection_state_bytes(cfg: config_lib.ModelConfig,
                          context_len: int) -> int:
  """Per-sequence selection state on the GPU (NOSA_SPEC.md §4.1).

  fp32 per-token eviction bias and window means (dma / nosa) and fp32
  compressed keys (infllmv2 / nosa), for a cache of whole blocks.
  """
  s = _capacity(cfg, context_len)
  w = _num_windows(cfg, s)
  per_head = 0
  if cfg.sparse.has_eviction_head:
    per_head += s * _F32 + w * _F32  # bias per token, ebar per window
  if cfg.sparse.query_aware:
    per_head += w * cfg.head_dim * _F32  # kbar
  return cfg.num_layers * cfg.num_kv_heads * per_head


def pcie_bytes_per_step(cfg: config_lib.ModelConfig, batch: int,
                        gamma: float, context_len: int | None = None
                        ) -> float:
  """B * (1 - gamma) * S_sel: host -> device bytes of one offloaded step.

  With `context_len`, S_sel counts P_eff = min(P, ceil(context / C))
  blocks (what `decode_cost` uses); without it, the full budget P.
  """
  _check_int("batch", batch, 1)
  _check_gamma(gamma)
  p = None if context_len is None else effective_topk(cfg, context_len)
  return batch * (1.0 - gamma) * selected_kv_bytes(cfg, p)


def host_bytes(cfg: config_lib.ModelConfig, batch: int,
               context_len: int) -> int:
  """Pinned host memory of the offloaded K/V store (whole blocks)."""
  _check_int("batch", batch, 1)
  return batch * dense_kv_bytes(cfg, _capacity(cfg, context_len))


def gpu_bytes_per_sequence(cfg: config_lib.ModelConfig, context_len: int,
                           mode: str) -> int:
  """GPU memory one sequence needs on top of the weights.

  full: the dense K/V cache. sparse_resident: the dense cache plus the
  selection state. offload: P_eff slots of K/V, the slot map, the rolling
  key buffer (query-aware variants) and the selection state; the dense
  store is on the host (`host_bytes`).
  """
  _check_mode(mode, cfg)
  s = _capacity(cfg, context_len)
  if mode == "full":
    return dense_kv_bytes(cfg, s)
  state = selection_state_bytes(cfg, context_len)
  if mode == "sparse_resident":
    return dense_kv_bytes(cfg, s) + state
  p = effective_topk(cfg, context_len)
  slots = selected_kv_bytes(cfg, p)
  slot_map = cfg.num_layers * cfg.num_kv_heads * p * _I32
  key_buf = 0
  if cfg.sparse.query_aware:
    key_buf = (cfg.num_layers * cfg.num_kv_heads * cfg.sparse.compress_kernel
               * cfg.head_dim * bytes_per_value(cfg))
  return slots + slot_map + key_buf + state


def max_batch(cfg: config_lib.ModelConfig, context_len: int,
              gpu_bytes: float, mode: str) -> int:
  """Largest batch whose weights and per-sequence state fit in `gpu_bytes`.

  Activations, XLA workspace and fragmentation are not counted: pass the
  usable budget (e.g. 0.9 x the device memory). Offload's host store is
  bounded separately (`host_bytes`). Returns 0 when not even the weights
  (plus one sequence) fit.
  """
  _check_mode(mode, cfg)
  if not (isinstance(gpu_bytes, (int, float)) and gpu_bytes >= 0):
    raise ValueError(f"gpu_bytes={gpu_bytes!r} is invalid: must be >= 0")
  free = gpu_bytes - weight_bytes(cfg)
  if free <= 0:
    return 0
  return int(free // gpu_bytes_per_sequence(cfg, context_len, mode))


# ------------------------------------------------------------------------------
# Time and throughput.
# ------------------------------------------------------------------------------


def decode_cost(cfg: config_lib.ModelConfig, batch: int, context_len: int,
                gamma: float, hw: Hardware = H100, *,
                mode: str) -> DecodeCost:
  """Predicted time and throughput of one decode step.

  Args:
    cfg: the model (variant, sizes, dtype, selection budget).
    batch: B sequences decoded together.
    context_len: tokens already in each sequence's cache.
    gamma: fraction of the selected blocks already on the GPU (offload; the
      other modes ignore it, but it is still checked).
    hw: bandwidths and peak FLOP/s.
    mode: `full` (dense attention over the resident cache),
      `sparse_resident` (NOSA selection, cache on the GPU) or `offload`
      (cache on the host, missing blocks fetched every step).

  Returns:
    A `DecodeCost`.
  """
  _check_mode(mode, cfg)
  _check_int("batch", batch, 1)
  _check_int("context_len", context_len, 1)
  _check_gamma(gamma)
  if not isinstance(hw, Hardware):
    raise ValueError(f"hw={hw!r} is invalid: must be a cost_model.Hardware")
  n_l, h, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
  weights = weight_bytes_read(cfg)
  # Matmul FLOPs: 2 per weight read per token (norms are noise).
  flops = 2.0 * batch * weights / bytes_per_value(cfg)
  if mode == "full":
    kv_seq = dense_kv_bytes(cfg, context_len)
    keys = context_len
    sel_bytes = 0
  else:
    p = effective_topk(cfg, context_len)
    sel_bytes = selected_kv_bytes(cfg, p)
    keys = min(context_len, p * cfg.sparse.block_size)
    w = _num_windows(cfg, context_len)
    kv_seq = sel_bytes
    if cfg.sparse.has_eviction_head:  # bias of the attended keys, ebar
      kv_seq += n_l * cfg.num_kv_heads * (p * cfg.sparse.block_size + w) * _F32
    if cfg.sparse.query_aware:  # every compressed key is scored every step
      kv_seq += n_l * cfg.num_kv_heads * w * d * _F32
      flops += 2.0 * batch * n_l * h * d * w
  flops += 4.0 * batch * n_l * h * d * keys  # q.k and p.v
  hbm = weights + batch * kv_seq
  t_gpu = max(hbm / hw.hbm_bytes_per_s, flops / hw.peak_flops)
  pcie = batch * (1.0 - gamma) * sel_bytes if mode == "offload" else 0.0
  t_pcie = pcie / hw.pcie_bytes_per_s
  per_seq_pcie = pcie / batch
  ceiling = (hw.pcie_bytes_per_s / per_seq_pcie if per_seq_pcie > 0
             else math.inf)
  return DecodeCost(
      t_gpu_s=t_gpu, t_pcie_s=t_pcie,
      serial_tokens_per_s=batch / (t_gpu + t_pcie),
      overlapped_tokens_per_s=batch / max(t_gpu, t_pcie),
      pcie_ceiling_tokens_per_s=ceiling, hbm_bytes_per_step=float(hbm),
      pcie_bytes_per_step=float(pcie), flops_per_step=float(flops))


def gpu_bound_gamma(cfg: config_lib.ModelConfig, batch: int,
                    context_len: int, hw: Hardware = H100) -> float:
  """The gamma above which overlapped offload is no longer PCIe-bound.

  Solves t_pcie(gamma) = t_gpu; 0.0 when even gamma = 0 is GPU-bound. For
  the KV bytes alone this is 1 - BW_pcie / BW_hbm (0.984 on the H100: a
  missed byte costs ~60 resident ones); weights and selection state lower it.
  """
  cost = decode_cost(cfg, batch, context_len, 0.0, hw, mode="offload")
  return max(0.0, 1.0 - cost.t_gpu_s / cost.t_pcie_s)
