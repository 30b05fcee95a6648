"""Pallas GPU kernels (Triton lowering), each beside its pure-jnp reference.

Imports only jax and numpy (STYLE.md rule 1).
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention_reference)
from pallas_kernels.block_sparse_attention_mosaic import (
    block_sparse_attention_mosaic)
from pallas_kernels.block_gather import gather_blocks
from pallas_kernels.block_gather import gather_blocks_reference
from pallas_kernels.block_scores import ScoreBlockSizes
from pallas_kernels.block_scores import block_scores
from pallas_kernels.block_scores import block_scores_reference
from pallas_kernels.common import BlockSizes
from pallas_kernels.sparse_decode import DecodeBlockSizes
from pallas_kernels.sparse_decode import decode_bytes_read
from pallas_kernels.sparse_decode import num_decode_splits
from pallas_kernels.sparse_decode import sparse_decode
from pallas_kernels.sparse_decode import sparse_decode_fetch
from pallas_kernels.sparse_decode import sparse_decode_fetch_reference
from pallas_kernels.sparse_decode import sparse_decode_reference
from pallas_kernels.sparse_decode_triton import sparse_decode_triton

__all__ = [
    "BlockSizes",
    "DecodeBlockSizes",
    "decode_bytes_read",
    "num_decode_splits",
    "sparse_decode",
    "sparse_decode_fetch",
    "sparse_decode_fetch_reference",
    "sparse_decode_reference",
    "sparse_decode_triton",
    "block_sparse_attention",
    "block_sparse_attention_mosaic",
    "block_sparse_attention_reference",
    "gather_blocks",
    "gather_blocks_reference",
    "ScoreBlockSizes",
    "block_scores",
    "block_scores_reference",
]
