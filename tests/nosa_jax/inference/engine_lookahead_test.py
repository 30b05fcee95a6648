"""The decode engine's lookahead: prefetch into spare host-store slots and
query-chunked prefill. Both change what moves when, never the result: each
is checked against the device store / the whole prefill of engine_test's
shared case (a file of its own so that xdist's per-file split balances).
"""

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import testing
from nosa_jax.inference import copy_engine
from nosa_jax.inference import engine
from nosa_jax.inference import stores
from tests import tolerances
from tests.nosa_jax.inference import fake_dma
from tests.nosa_jax.inference import engine_test as shared

_model, _reference, _run = shared._model, shared._reference, shared._run  # pylint: disable=protected-access
LENGTHS, STEPS, DEVICE = shared.LENGTHS, shared.STEPS, shared.DEVICE


class ChunkedPrefillTest(parameterized.TestCase):
  """Query-chunked prefill builds the whole prefill's state (both stores)."""

  @parameterized.named_parameters(
      ("device_nosa", "nosa", DEVICE),
      ("host_infllmv2", "infllmv2", stores.HostStore(fetch="loop")))
  def test_chunked_equals_whole(self, variant, store):
    cfg, _, params = _model(variant)
    lengths, steps = np.array([70, 33, 48]), 3
    width, max_len = lengths.max(), lengths.max() + steps
    tokens = testing.random_tokens(jax.random.key(7), 3, max_len)
    rows, tol = np.arange(3), tolerances.tol(np.float32)
    runs = []
    for chunked in (False, True):
      fn = (functools.partial(engine.prefill_chunked, chunk=32) if chunked
            else engine.prefill)
      state, logits = fn(params, cfg, tokens[:, :width],
                         jnp.asarray(lengths), max_len, store=store)
      out = [np.asarray(logits)]
      for i in range(steps):
        state, logits, _ = engine.decode_step(params, cfg, state,
                                              tokens[rows, lengths + i])
        out.append(np.asarray(logits))
      runs.append((out, state))
    (want, want_state), (got, got_state) = runs
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      np.testing.assert_allclose(g, w, **tol, err_msg=f"step {i}")
    np.testing.assert_array_equal(got_state.lengths_B, want_state.lengths_B)
    for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state),
                    strict=True):
      np.testing.assert_allclose(np.asarray(g, np.float32),
                                 np.asarray(w, np.float32), **tol)

  def test_errors(self):
    cfg, _, params = _model("nosa")
    tokens = jnp.zeros((1, 20), jnp.int32)
    with self.assertRaisesRegex(ValueError, "multiple of block_size=16"):
      engine.prefill_chunked(params, cfg, tokens, [20], 24, chunk=20)
    full = testing.tiny_model_config("full")
    with self.assertRaisesRegex(ValueError, "needs a sparse variant"):
      engine.prefill_chunked(params, full, tokens, [20], 24, chunk=16)


@dataclasses.dataclass(eq=False)  # hashed by identity: a jit static
class _TableGuess:
  """A prefetch guess read from a table [steps, L, B, K, Q] by step (the
  step from the first row's position, `first` at step 0)."""

  table: np.ndarray
  first: int

  def __call__(self, pred_BKP, pos_B, n, layer):
    del pred_BKP, n
    return jnp.asarray(self.table)[pos_B[0] - self.first, layer]


def _prefetch_run(params, cfg, tokens, lengths, steps, guess,
                  prefetch_copy="fetch"):
  """Host store with 2 x topk slots, prefetching: per-step logits, infos."""
  sp = cfg.sparse
  store = stores.HostStore(fetch="loop", cache_blocks=2 * sp.topk_blocks,
                           prefetch_copy=prefetch_copy)
  rows = np.arange(len(lengths))
  state, _ = engine.prefill(params, cfg, tokens[:, :lengths.max()],
                            jnp.asarray(lengths), lengths.max() + steps,
                            store=store)
  out = []
  for i in range(steps):
    state, logits_BV, info = engine.decode_step(
        params, cfg, state, tokens[rows, lengths + i], prefetch=True,
        guess=guess)
    if (i + 1) % sp.block_size == 0:
      state = engine.write_back(cfg, state)
    out.append((np.asarray(logits_BV),
                {k: np.asarray(v) for k, v in info.items()}))
  return out


class PrefetchTest(parameterized.TestCase):
  """Prefetch into spare slots changes what moves when, never the output."""

  def _check_counts(self, info):
    pre, hit, waste = (info[k] for k in ("prefetched", "prefetch_hits",
                                         "prefetch_wasted"))
    np.testing.assert_array_equal(pre[0], 0)  # layer 0: no earlier input
    np.testing.assert_array_equal(hit + waste, pre)
    return pre.sum(), hit.sum(), waste.sum()

  # "dma": the copy-engine extension (copies issued a layer ahead, waited
  # for before the layer attends); on the CPU over a memcpy stand-in for
  # the CUDA runtime (tests/nosa_jax/inference/fake_dma.py).
  @parameterized.named_parameters(("model_guess", False, "fetch"),
                                  ("oracle", True, "fetch"),
                                  ("model_guess_dma", False, "dma"))
  def test_outputs_equal_the_device_store(self, oracle, prefetch_copy):
    dma = None
    if prefetch_copy == "dma":
      if jax.default_backend() == "gpu":
        dma = copy_engine.current()[0]
      elif fake_dma.compilers_present():
        dma = fake_dma.engine()  # the extension over a memcpy runtime
      else:
        self.skipTest("no C compiler for the stand-in CUDA runtime")
      dma.counters(reset=True)
    cfg, _, params = _model("nosa")
    tokens, _, want, want_idx, _ = _reference("nosa")
    guess = (_TableGuess(np.stack([idx for idx, _ in want_idx]),
                         int(LENGTHS[0])) if oracle else None)
    got = _prefetch_run(params, cfg, tokens, LENGTHS, STEPS, guess,
                        prefetch_copy)
    tol = tolerances.tol(np.float32)
    loaded = 0
    for i, (logits_BV, info) in enumerate(got):
      np.testing.assert_allclose(logits_BV, want[i + 1], **tol,
                                 err_msg=f"step {i}")
      np.testing.assert_array_equal(info["selected"], want_idx[i][0])
      pre, _, waste = self._check_counts(info)
      loaded += pre
      if oracle:
        self.assertEqual(waste, 0)
        if i > 0:  # after the cold start nothing later layers need misses
          np.testing.assert_array_equal(info["fetched"][1:], 0)
    self.assertGreater(loaded, 0, "no prefetch at all: a vacuous case")
    if dma is not None:  # the loads went through the extension
      counts = dma.counters(reset=True)
      self.assertEqual(counts["pending"], 0)
      self.assertEqual(counts["calls"], counts["waits"])
      self.assertEqual(counts["copies"], 2 * loaded)  # K and V

  def test_wrong_guesses_cost_loads_not_answers(self):
    # Contexts of 19-20 blocks against a budget of 8, guessing exactly the
    # blocks the selection leaves out: every load is wasted, the misses are
    # fetched on the critical path, and the logits are the device store's.
    cfg, _, params = _model("nosa")
    sp = cfg.sparse
    lengths, steps = np.array([300, 290]), 8
    tokens = testing.random_tokens(jax.random.key(5), 2, 320)
    want, want_idx, _ = _run(params, cfg, tokens, DEVICE, steps, lengths)
    table = []
    for i, (idx_LBKP, _) in enumerate(want_idx):
      below_B = (lengths + i) // sp.block_size - sp.window_blocks
      out = np.full(idx_LBKP.shape, -1, np.int32)
      for li, bi, k in np.ndindex(*idx_LBKP.shape[:3]):
        left = sorted(set(range(below_B[bi])) - set(idx_LBKP[li, bi, k]))
        out[li, bi, k, :len(left)] = left[:out.shape[-1]]
      table.append(out)
    got = _prefetch_run(params, cfg, tokens, lengths, steps,
                        _TableGuess(np.stack(table), int(lengths[0])))
    tol = tolerances.tol(np.float32)
    wasted = 0
    for i, (logits_BV, info) in enumerate(got):
      np.testing.assert_allclose(logits_BV, want[i + 1], **tol,
                                 err_msg=f"step {i}")
      pre, hit, waste = self._check_counts(info)
      self.assertEqual(hit, 0)
      wasted += waste
    self.assertGreater(wasted, 0)

  def test_errors(self):
    cfg, _, params = _model("nosa")
    state, _ = engine.prefill(params, cfg, jnp.zeros((1, 4), jnp.int32),
                              jnp.asarray([4]), 8)
    with self.assertRaisesRegex(ValueError, "prefetch=True needs the host"):
      engine.decode_step(params, cfg, state, jnp.zeros((1,), jnp.int32),
                         prefetch=True)
    full = testing.tiny_model_config("full")
    with self.assertRaisesRegex(ValueError, "prefetch=True needs a sparse"):
      engine.decode_step(None, full, None, None, prefetch=True)


if __name__ == "__main__":
  absltest.main()
