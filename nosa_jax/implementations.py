"""The one implementation switch: where every kernel is chosen (STYLE.md 8).

In the manner of tokamax's `IMPLEMENTATIONS` table: each op that has more
than one implementation is listed once, with its implementations and the
plain config field that picks one. Call sites name the op and the field's
value; `resolve` validates it and settles "auto" for this backend, `kernel`
hands back the Pallas / Triton wrapper with the interpret decision bound, and
`interpret` is that decision (Pallas kernels run in the Pallas interpreter
off the GPU, so every config runs everywhere, slowly off the GPU).

  op                      field (implementations)
  block_sparse_attention  SparseConfig.implementation (xla, pallas,
                          mosaic; mosaic's backward takes D <= 128)
  decode_attention        SparseConfig.decode_implementation (auto, xla,
                          pallas, triton); auto = `implementation`, pallas
                          under mosaic
  block_scores            SparseConfig.score_implementation (xla, pallas)
  block_fetch             HostStore.fetch (auto, loop, pallas, fused); auto
                          = fused on the GPU when decode attention is
                          pallas, else pallas on the GPU, loop elsewhere
  block_prefetch          HostStore.prefetch_copy (fetch, dma): how the
                          lookahead prefetch copies; dma off the GPU runs
                          the serial fetch (its reference)
  dense_attention         none (automatic: cudnn for bf16 / fp16 on the GPU,
                          else xla)

"xla" is the jnp path, written at its call site (a reference, or a chunked
variant tested against one); every other name is a kernel wrapper of
`pallas_kernels`. "triton" (jax-triton) and "cudnn" have no interpret mode
and are refused off the GPU. Kernel *tuning* (block sizes, warps, stages)
is not chosen here: it is passed as keyword options to the wrappers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

import pallas_kernels


@dataclasses.dataclass(frozen=True)
class Op:
  """One op: the field that picks its implementation, and what each runs.

  Attributes:
    field: the config field that sets the requested name (error messages
      name it).
    implementations: name -> what runs (documentation).
    kernels: the names that are a `pallas_kernels` wrapper -> that wrapper.
    gpu_only: names with no interpret mode, refused off the GPU.
    auto: if set, "auto" is also allowed and resolves to
      auto(backend, **context).
  """

  field: str
  implementations: Mapping[str, str]
  kernels: Mapping[str, Callable[..., Any]]
  gpu_only: frozenset[str] = frozenset()
  auto: Optional[Callable[..., str]] = None

  def choices(self) -> tuple[str, ...]:
    """The names the field may hold."""
    return (("auto",) if self.auto else ()) + tuple(self.implementations)


def _auto_decode(backend: str, implementation: str = "xla") -> str:
  del backend  # decode attention follows the training / prefill attention
  # Decode has no Mosaic kernel yet: the Pallas one, as under "pallas".
  return "pallas" if implementation == "mosaic" else implementation


def _auto_fetch(backend: str, decode_attention: str = "xla") -> str:
  # The fused kernel is the Pallas decode kernel with the fetch inside: the
  # default on the GPU when decode attention is that kernel. Otherwise the
  # zero-copy copy kernel before the chosen decode attention on the GPU
  # (the loop's dynamic trip count syncs the GPU with the host each
  # block), and XLA's copy loop off the GPU.
  if backend != "gpu":
    return "loop"
  return "fused" if decode_attention == "pallas" else "pallas"


def serial_fetch() -> str:
  """The block_fetch that copies before the attention (not fused): the
  zero-copy gather kernel on the GPU, XLA's copy loop elsewhere."""
  return _auto_fetch(jax.default_backend())


def _auto_dense(backend: str, dtype: Any = jnp.float32) -> str:
  # XLA's path materialises [B, H, T, T] scores (out of memory at 16k with
  # 32 heads on an H100); cuDNN's fused flash attention takes half
  # precision only.
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if backend == "gpu" and half else "xla"


IMPLEMENTATIONS: dict[str, Op] = {
    "block_sparse_attention": Op(
        field="SparseConfig.implementation",
        implementations={
            "xla": "query chunks of dense masked jnp under jax.checkpoint "
                   "(sparse_attention.sparse_attention)",
            "pallas": "pallas_kernels.block_sparse_attention (fwd, dq, "
                      "dk/dv kernels)",
            "mosaic": "pallas_kernels.block_sparse_attention_mosaic (fwd, "
                      "dq, dk/dv kernels on Mosaic GPU; D <= 128 to "
                      "differentiate)"},
        kernels={"pallas": pallas_kernels.block_sparse_attention,
                 "mosaic": pallas_kernels.block_sparse_attention_mosaic}),
    "decode_attention": Op(
        field="SparseConfig.decode_implementation",
        implementations={
            "xla": "pallas_kernels.sparse_decode_reference (dense masked "
                   "jnp)",
            "pallas": "pallas_kernels.sparse_decode (split-K Pallas kernel)",
            "triton": "pallas_kernels.sparse_decode_triton (the same kernel "
                      "in Triton through jax-triton; GPU only)"},
        kernels={"pallas": pallas_kernels.sparse_decode,
                 "triton": pallas_kernels.sparse_decode_triton},
        gpu_only=frozenset({"triton"}), auto=_auto_decode),
    "block_scores": Op(
        field="SparseConfig.score_implementation",
        implementations={
            "xla": "selection.query_aware_scores (einsum, softmax, block "
                   "max)",
            "pallas": "pallas_kernels.block_scores (no [T, W] matrix in "
                      "HBM)"},
        kernels={"pallas": pallas_kernels.block_scores}),
    "block_fetch": Op(
        field="HostStore.fetch",
        implementations={
            "loop": "a fori_loop of per-block dynamic_slice + device_put "
                    "(XLA)",
            "pallas": "pallas_kernels.gather_blocks (zero-copy tile copies "
                      "from the pinned store)",
            "fused": "pallas_kernels.sparse_decode_fetch (the decode kernel "
                     "reads missing blocks from the store as it attends)"},
        kernels={"pallas": pallas_kernels.gather_blocks,
                 "fused": pallas_kernels.sparse_decode_fetch},
        auto=_auto_fetch),
    "block_prefetch": Op(
        field="HostStore.prefetch_copy",
        implementations={
            "fetch": "the serial fetch's copy (block_fetch's loop or zero-"
                     "copy gather; fused prefetches with the gather) in line",
            "dma": "nosa_jax.inference.copy_engine: copy-engine copies on "
                   "a stream of their own, issued a layer ahead, waited for "
                   "before the layer attends (off the GPU: the serial "
                   "fetch, its reference)"},
        kernels={}),
    "dense_attention": Op(
        field="dense attention (automatic, no field)",
        implementations={
            "xla": "jax.nn.dot_product_attention, XLA path",
            "cudnn": "jax.nn.dot_product_attention, cuDNN flash attention "
                     "(GPU, bf16 / fp16)"},
        kernels={}, gpu_only=frozenset({"cudnn"}), auto=_auto_dense),
}


def _op(op: str) -> Op:
  if op not in IMPLEMENTATIONS:
    raise ValueError(f"op={op!r} is not in the implementation table: "
                     f"{', '.join(IMPLEMENTATIONS)}")
  return IMPLEMENTATIONS[op]


def choices(op: str) -> tuple[str, ...]:
  """The names `op`'s field may hold (config validation uses these)."""
  return _op(op).choices()


def interpret() -> bool:
  """The interpret flag of every Pallas kernel call: True off the GPU."""
  return jax.default_backend() != "gpu"


def check(op: str, requested: str) -> None:
  """Raises a one-line ValueError unless `requested` is a name of `op`."""
  entry = _op(op)
  if requested not in entry.choices():
    raise ValueError(f"{entry.field}={requested!r} is invalid: must be one "
                     f"of {', '.join(entry.choices())}")


def resolve(op: str, requested: str, **context: Any) -> str:
  """The implementation `op` runs for the field value `requested`.

  Args:
    op: a key of `IMPLEMENTATIONS`.
    requested: the field's value; "auto" where the op allows it.
    **context: what the op's "auto" rule reads (decode_attention:
      `implementation`, SparseConfig's; block_fetch: `decode_attention`,
      the resolved decode implementation; dense_attention: `dtype`).

  Returns:
    An implementation name of `op` (never "auto").

  Raises:
    ValueError (one line, naming the field): an unknown name, or a GPU-only
    one (triton, cudnn) off the GPU.
  """
  check(op, requested)
  entry = _op(op)
  backend = jax.default_backend()
  if requested == "auto":
    requested = entry.auto(backend, **context)
  if requested in entry.gpu_only and backend != "gpu":
    others = [n for n in entry.implementations if n not in entry.gpu_only]
    raise ValueError(f"{entry.field}={requested!r} needs a GPU (the backend "
                     f"is {backend!r}); off the GPU use one of "
                     f"{', '.join(others)}")
  return requested


def from_config(op: str, sp: Any) -> str:
  """`resolve` of the SparseConfig field that picks `op`.

  decode_attention follows `sp.implementation` while
  `sp.decode_implementation` is "auto".

  Args:
    op: block_sparse_attention, decode_attention or block_scores.
    sp: a `config.SparseConfig`.
  """
  if op == "block_sparse_attention":
    return resolve(op, sp.implementation)
  if op == "decode_attention":
    return resolve(op, sp.decode_implementation,
                   implementation=sp.implementation)
  if op == "block_scores":
    return resolve(op, sp.score_implementation)
  raise ValueError(f"op={op!r} is not set by a SparseConfig field")


def interpret_warning(sp: Any) -> str | None:
  """A warning when a `config.SparseConfig` picks Pallas kernels that run in
  interpret mode here (off the GPU): correct, but many times slower than
  xla. None when there is nothing to say."""
  if not interpret():
    return None
  picked = [f"model.sparse.{name}={getattr(sp, name)}" for name in (
      "implementation", "decode_implementation", "score_implementation")
            if getattr(sp, name) in ("pallas", "mosaic")]
  if not picked:
    return None
  return (f"{', '.join(picked)}: the Pallas kernels run in interpret mode "
          f"on {jax.default_backend()} (correct, but many times slower than "
          "xla); use xla off the GPU")


def kernel(op: str, implementation: str,
           **options: Any) -> Callable[..., Any]:
  """The kernel wrapper of `op`'s `implementation`, options bound.

  Pallas wrappers get `interpret=interpret()`; the GPU-only ones (triton)
  take no interpret flag. `options` are the wrapper's other keyword
  arguments (block_size, block sizes, warps, stages, ...); passing
  `interpret` is an error (the decision is `interpret`'s).

  Raises:
    ValueError: `implementation` is not a name of `op`, is GPU-only off the
      GPU, or is a jnp path (no kernel: the caller runs it).
  """
  if "interpret" in options:
    raise TypeError("interpret is decided by implementations.interpret()")
  implementation = resolve(op, implementation)
  entry = _op(op)
  if implementation not in entry.kernels:
    raise ValueError(f"{entry.field}={implementation!r} runs in jnp at its "
                     f"call site, not a kernel; kernels: "
                     f"{', '.join(entry.kernels)}")
  if implementation not in entry.gpu_only:
    options["interpret"] = interpret()
  return functools.partial(entry.kernels[implementation], **options)
