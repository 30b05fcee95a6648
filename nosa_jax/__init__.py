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

Imports are one-way: experiments -> nosa_jax -> pallas_kernels.
"""

__version__ = "0.1.0"
