"""Shared pieces of the configs: defaults, the NOSA constants, `parse_arg`.

Every config's `get_config(arg)` starts from `base_config()`, which holds
every field of `nosa_jax.config.ExperimentConfig` with its default, so a
mistyped `--config.train.lenght=...` override fails loudly.
"""

import dataclasses

import ml_collections

from nosa_jax import config as config_lib

# NOSA_SPEC.md §2.0: block 64, compression 32/16, budget 64 blocks, sink 1,
# window 16, query top-k 33 (sink + window + own block + 15 free picks).
PAPER_SPARSE = dict(block_size=64, compress_kernel=32, compress_stride=16,
                    topk_blocks=64, query_topk_blocks=33, sink_blocks=1,
                    window_blocks=16)

# CPU scale: 16-token blocks, compression 8/4, 8-block budget of which 5 are
# query-aware (1 sink + 2 window + own + 1 free pick); 256-token sequences
# have 16 blocks, so selection really drops half of them.
SMALL_SPARSE = dict(block_size=16, compress_kernel=8, compress_stride=4,
                    topk_blocks=8, query_topk_blocks=5, sink_blocks=1,
                    window_blocks=2, query_chunk=128)


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dataclasses.asdict(config_lib.ExperimentConfig()))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `file.py:variant=full,runlocal` into a ConfigDict (big_vision).

  A bare name is a boolean flag; `k=v` takes the type of the default.
  Unknown names raise a one-line error listing the allowed ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not known; allowed: "
                       f"{', '.join(sorted(defaults))}")
    if not sep:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Selects the attention variant (full / infllmv2 / dma / nosa)."""
  config.model.sparse.variant = variant


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to something that runs on a laptop CPU in a minute.

  Keeps the variant and the vocabulary-independent structure (GQA, tied
  head, sparsity), shrinks every size.
  """
  m = config.model
  m.num_layers, m.model_dim, m.mlp_dim = 2, 64, 128
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
  m.vocab_size, m.dtype, m.remat = 259, "float32", "none"
  m.sparse.update(SMALL_SPARSE)
  m.sparse.implementation = "xla"  # Pallas interpret mode is slow on a CPU
  m.sparse.score_implementation = "xla"
  config.data.source, config.data.tokenizer = "stdlib", "bytes"
  t = config.train
  t.seq_len, t.batch_size, t.num_steps = 256, 4, 20
  t.warmup_steps, t.log_every, t.eval_every = 2, 5, 10
  t.eval_batches, t.checkpoint_every = 2, 10


def nosa_config(arg: str | None, *, num_layers: int, model_dim: int,
                mlp_dim: int, tie_embeddings: bool,
                batch_size: int) -> ml_collections.ConfigDict:
  """The paper-scale configs: GQA 32/2 x 128, vocab 73448, paper sparsity.

  Long-context continual pretraining at 16k tokens (NOSA_SPEC.md §7), bf16
  compute with fp32 parameters and per-block remat. The layers run as one
  `lax.scan` (`scan_layers`): unrolled, 28 blocks with the Pallas kernels
  took over 5 minutes to compile on the GPU.
  """
  arg = parse_arg(arg, variant="nosa", runlocal=False)
  config = base_config()
  m = config.model
  m.vocab_size = 73448  # MiniCPM4 tokenizer (§1.1)
  m.num_layers, m.model_dim, m.mlp_dim = num_layers, model_dim, mlp_dim
  # H_q / H_kv / d = 32 / 2 / 128: forced by the InfLLM-V2 kernels and NOSI
  # (NOSA_SPEC.md §1.2).
  m.num_heads, m.num_kv_heads, m.head_dim = 32, 2, 128
  m.tie_embeddings = tie_embeddings
  m.rope_theta, m.rms_eps = 10000.0, 1e-6
  m.dtype, m.param_dtype, m.remat = "bfloat16", "float32", "full"
  m.scan_layers = True
  m.sparse.update(PAPER_SPARSE)
  m.sparse.query_chunk = 1024
  m.sparse.implementation = "pallas"  # the Triton kernels (GPU)
  # Query-aware scores by the block_scores kernel: a faster 28-layer 16k
  # step than the XLA scores (experiments/results/training/NOTES.md).
  m.sparse.score_implementation = "pallas"
  apply_variant(config, arg.variant)

  t = config.train
  t.seq_len, t.batch_size, t.num_steps = 16384, batch_size, 10000
  t.learning_rate, t.warmup_steps, t.min_lr_ratio = 3e-4, 200, 0.1
  t.log_every, t.eval_every, t.eval_batches = 10, 500, 8
  t.checkpoint_every, t.keep_checkpoints = 500, 3
  if arg.runlocal:
    runlocal(config)
  return config
