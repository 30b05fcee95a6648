r"""Sample from a trained NOSA model (NOSA_SPEC.md §4), KV on GPU or host.

  python -m experiments.generate --workdir=/tmp/nosa_tiny --prompt="def "
  python -m experiments.generate --workdir=/tmp/run --prompt="import os" \
      --max_new_tokens=256 --temperature=0.8 --top_p=0.95 \
      --implementation=pallas
  # random weights, no checkpoint (smoke test of the engine):
  python -m experiments.generate --config=configs/tiny.py --prompt="hi"
  # KV cache in pinned host memory, selected blocks on the GPU:
  python -m experiments.generate --workdir=/tmp/nosa_tiny --prompt="def " \
      --offload=host --cache_blocks=16

Prints the prompt and its continuation, then the decode throughput (prefill
excluded) and per layer the mean step-to-step selection overlap gamma
(--offload=none) or the block-cache hit rate (--offload=host).
"""

import dataclasses
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli
from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import hf_io
from nosa_jax import implementations
from nosa_jax import model
from nosa_jax import train
from nosa_jax.inference import engine
from nosa_jax.inference import host_memory
from nosa_jax.inference import stores

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to load.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Without --workdir: a config file, random weights.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass; 1 disables it.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling (and random-init) seed.")
_IMPL = flags.DEFINE_enum("implementation", None, ["xla", "pallas"],
                          "Attention implementation (default: the config's).")
_OFFLOAD = flags.DEFINE_enum(
    "offload", "none", ["none", "host"],
    "KV placement: 'none' = GPU-resident cache; 'host' = pinned host store "
    "with a GPU block cache (sparse variants only).")
_CACHE_BLOCKS = flags.DEFINE_integer(
    "cache_blocks", None, "--offload=host: GPU slots per (layer, sequence, "
    "KV head); default topk_blocks.")

_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Prefill the prompt in query chunks of this many "
    "tokens (a multiple of the block size; sparse variants): bounds the "
    "prefill's device memory for long prompts.")
_PREFETCH = flags.DEFINE_bool(
    "prefetch", False, "--offload=host with --cache_blocks above topk: load "
    "each layer's guessed selection (from the previous layer's input) into "
    "spare slots before it runs.")
_PREFETCH_COPY = flags.DEFINE_enum(
    "prefetch_copy", "fetch", ["fetch", "dma"],
    "--prefetch: how the guessed blocks are copied: 'fetch' (the serial "
    "fetch's copy, in line) or 'dma' (copy engines on their own stream, "
    "nosa_jax.inference.copy_engine; GPU, built with g++ at first use).")


def main(argv):
  del argv
  host_memory.allow_pinned_host_memory()  # before JAX starts its GPU client
  train.quiet_library_logs()
  try:
    if _WORKDIR.value:
      cfg, params, step = hf_io.load_workdir(_WORKDIR.value)
      source = f"{_WORKDIR.value} step {step}"
    elif _CONFIG.value is not None:
      cfg = config_lib.ExperimentConfig.from_dict(_CONFIG.value.to_dict())
      params = model.init(cfg.model, _SEED.value)[1]
      source = "random weights"
    else:
      sys.exit("give --workdir (a training run) or --config (random weights)")
    mcfg = cfg.model
    if _IMPL.value:
      mcfg = dataclasses.replace(mcfg, sparse=dataclasses.replace(
          mcfg.sparse, implementation=_IMPL.value))
    tok = data.load_tokenizer(cfg.data.tokenizer)
    # Training documents start with BOS (nosa_jax.data), so prompts do too.
    prompt = [tok.bos_id] + tok.encode(_PROMPT.value).tolist()
    if len(prompt) + _MAX_NEW.value > cfg.train.seq_len:
      logging.warning(
          "the prompt (%d tokens) + --max_new_tokens=%d pass the trained "
          "context of %d tokens (train.seq_len): the model never saw those "
          "positions", len(prompt), _MAX_NEW.value, cfg.train.seq_len)
    for warning in filter(None, [implementations.interpret_warning(
        mcfg.sparse)]):
      logging.warning("%s", warning)
    store = (stores.HostStore(cache_blocks=_CACHE_BLOCKS.value,
                              prefetch_copy=_PREFETCH_COPY.value)
             if _OFFLOAD.value == "host" else stores.DeviceStore())
    (out,), stats = engine.generate(
        params, mcfg, [prompt], _MAX_NEW.value, store=store,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
        eos_id=tok.eos_id, pad_id=tok.pad_id, seed=_SEED.value,
        return_stats=True, prefill_chunk=_PREFILL_CHUNK.value,
        prefetch=_PREFETCH.value)
    label, per_layer = (("block-cache hit rate", stats["hit_rate"])
                        if store.writes_back else
                        ("gamma", stats["gamma_per_layer"]))
  except (OSError, ValueError) as e:  # ConfigError is a ValueError
    sys.exit(f"generate error: {e}")
  print(f"[{source}, {mcfg.sparse.variant}/{mcfg.sparse.implementation}, "
        f"offload={_OFFLOAD.value}]")
  print(tok.decode(prompt) + tok.decode(out))
  values = " ".join(f"{g:.3f}" for g in per_layer)
  print(f"\n{len(out)} tokens; decode {stats['decode_tokens_per_s']:.1f} "
        f"tokens/s over {stats['decode_steps']} steps (prefill "
        f"{stats['prefill_s'] * 1e3:.0f} ms, excluded); {label} per layer: "
        f"{values}")
  if _PREFETCH.value:
    loaded, hits = sum(stats["prefetched_blocks"]), sum(stats["prefetch_hits"])
    print(f"prefetch: {loaded} blocks loaded ahead, {hits} of them attended "
          f"({loaded - hits} wasted)")


if __name__ == "__main__":
  cli.run(main, "generate")
