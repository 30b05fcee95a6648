"""Inference: one decode engine over two KV stores (NOSA_SPEC.md §4).

  engine.py       prefill (whole or query-chunked), decode_step (optional
                  lookahead prefetch), write_back, generate; the selection
                  state (bias, compressed keys, window means, key buffer)
                  and its per-token update. Layer math is the model's.
  stores.py       where K/V live: DeviceStore (all in device memory) or
                  HostStore (pinned host memory + a device block cache:
                  slot map, diff, fetch, prefetch, write-back). The engine
                  calls a store; a store never calls the engine.
  sampling.py     greedy / temperature / top-p sampling, prompt packing.
  host_memory.py  XLA's pinned-host cap and the host store capacity check.

Decode-time selection (one query per sequence) is in `nosa_jax.selection`,
beside the training selection: the one rule of the spec in one place.
"""
