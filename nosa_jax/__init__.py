"""nosa-jax: NOSA (Native and Offloadable Sparse Attention) in JAX/Flax.

Huang et al., "NOSA: Native and Offloadable Sparse Attention",
arXiv 2510.13602. The method is specified in NOSA_SPEC.md (shared with the
team); the repository map is in WORKSPACE.md.

Dimension alphabet, used in einsum subscripts and as shape suffixes
(`q_BTHD`, `mask_BKTN`):

  B batch            T query positions      S key / cache positions
  H query heads      K KV heads             G = H / K query heads per KV head
  D head dim         M model dim            F MLP hidden dim
  V vocab            C tokens per KV block  N number of KV blocks
  P selected blocks  W compressed-key windows

Where each concept of the paper lives:

  eviction bias b = A * softplus(delta(v))     model.attention_inputs,
                                               selection.eviction_bias
  compressed keys, window means, block pooling selection
  query-aware / query-agnostic scores,         selection (training: masks
    two-phase top-k, forced sink/window/own      over all queries; decode:
                                                 select_decode_blocks)
  block-sparse attention with the bias         sparse_attention (xla) and
                                               pallas_kernels
  locality penalty and statistics, gamma       selection, sparse_attention
  the layer math (norms, QKV, RoPE, MLP, head) model (one function each,
                                               used by training and decode)
  prefill / decode step / generate loop        inference.engine
  where the KV cache lives (HBM, or pinned     inference.stores
    host memory + device block cache, diff,
    fetch, write-back)
  decode cost model (T_gpu, T_pcie, gamma)     cost_model
  which kernel runs (xla / pallas / triton,    implementations (the one
    fetch mode, interpret off the GPU)           switch)

Imports are one-way: experiments -> nosa_jax -> pallas_kernels.
"""

__version__ = "0.1.0"
