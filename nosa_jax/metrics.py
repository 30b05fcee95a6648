"""TensorBoard event files without TensorFlow, plus throughput helpers.

`MetricWriter` writes scalars, histograms and text through tensorboard's own
`EventFileWriter` (only the `tensorboard` package is needed; flax's and clu's
writers import TensorFlow). `flops_per_token` and `peak_flops` give the MFU
estimate printed by the trainer.
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.summary.writer import event_file_writer

from nosa_jax import config as config_lib


class MetricWriter:
  """Appends summaries to one event file under `logdir`."""

  def __init__(self, logdir: str):
    self._writer = event_file_writer.EventFileWriter(logdir)

  def _add(self, step: int, value: summary_pb2.Summary.Value) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.value.append(value)
    self._writer.add_event(event)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    for tag, v in values.items():
      self._add(step, summary_pb2.Summary.Value(tag=tag,
                                                simple_value=float(v)))

  def histogram(self, step: int, tag: str, values: np.ndarray,
                bins: int = 64) -> None:
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
      return
    counts, edges = np.histogram(values, bins=bins)
    hist = summary_pb2.HistogramProto(
        min=float(values.min()), max=float(values.max()),
        num=float(values.size), sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()),
        bucket_limit=[float(e) for e in edges[1:]],
        bucket=[float(c) for c in counts])
    self._add(step, summary_pb2.Summary.Value(tag=tag, histo=hist))

  def text(self, step: int, tag: str, text: str) -> None:
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[text.encode()],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
    self._add(step, summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                              tensor=tensor))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class NullWriter:
  """What processes other than the first write: nothing."""

  def scalars(self, step, values):
    del step, values

  def histogram(self, step, tag, values, bins=64):
    del step, tag, values, bins

  def text(self, step, tag, text):
    del step, tag, text

  def flush(self):
    pass

  def close(self):
    pass


def flops_per_token(cfg: config_lib.ModelConfig, seq_len: int,
                    num_params: int) -> float:
  """Training FLOPs per token: 6 N (matmuls) + attention score/value FLOPs.

  Attention counts 6 * 2 * L * H * D * (attended keys): the mean causal
  context T/2 for `full`, the selected budget (capped by T/2) for sparse
  variants. Embedding lookups are excluded from N (they are gathers).
  """
  n = num_params - cfg.vocab_size * cfg.model_dim * (
      1 if cfg.tie_embeddings else 0)
  keys = seq_len / 2
  if cfg.sparse.is_sparse:
    keys = min(keys, cfg.sparse.topk_blocks * cfg.sparse.block_size)
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys
  return 6.0 * n + attn


# Dense bf16 peak per device, FLOP/s; used only for the MFU estimate.
_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12,
               "h800": 989e12, "a800": 312e12}


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float:
  """Per-device peak FLOP/s, or 0.0 when unknown (e.g. a CPU)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops
  return 0.0


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def peak_memory_gib() -> float | None:
  """Largest peak bytes in use over this process's devices, in GiB.

  None where the backend keeps no allocator statistics (the CPU).
  """
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
           for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 2**30 if peaks else None
