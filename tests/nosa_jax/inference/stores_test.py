"""KV stores: the host store's placement, slot diff and option checks.

The stores' numbers are checked through the engine (engine_test: both
stores reproduce the forward); here, what only the host store has.
"""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import testing
from nosa_jax.inference import engine
from nosa_jax.inference import host_memory
from nosa_jax.inference import stores


class HostStoreTest(absltest.TestCase):

  def test_store_is_pinned_host_and_capacity(self):
    cfg, _, params = testing.tiny_model_with_bias("nosa")
    tokens = testing.random_tokens(jax.random.key(0), 2, 40)
    store = stores.HostStore()
    state, _ = engine.prefill(params, cfg, tokens, jnp.array([40, 7]), 64,
                              store=store)
    for layer in state.layers:
      kv = layer.kv
      self.assertEqual(kv.k_host.sharding.memory_kind, "pinned_host")
      self.assertEqual(kv.v_host.sharding.memory_kind, "pinned_host")
      self.assertEqual(kv.k_host.shape, (2, 2, 4, 16, 16))  # B K N C D
      self.assertEqual(kv.k_slot.sharding.memory_kind, "device")
      self.assertEqual(kv.k_slot.shape, (2, 2, 4, 16, 16))  # P = min(8, 4)
      # Slot 0 holds the tail of the 7-token prompt; 40 = 2.5 blocks too.
      np.testing.assert_array_equal(kv.slot_map[:, :, 0], [[2, 2], [0, 0]])
      np.testing.assert_array_equal(kv.slot_map[:, :, 1:], -1)
    state, _, _ = engine.decode_step(params, cfg, state, tokens[:, 0])
    self.assertEqual(state.layers[0].kv.k_host.sharding.memory_kind,
                     "pinned_host")
    need = host_memory.host_store_bytes(cfg, 2, 64)
    self.assertEqual(need, 2 * 2 * 2 * 2 * 64 * 16 * 4)
    with self.assertRaisesRegex(ValueError, f"needs {need} bytes"):
      engine.prefill(params, cfg, tokens, jnp.array([40, 7]), 64,
                     store=store, host_memory_limit=need - 1)
    # The empty state (grouped prefill, benchmarks) has prefill's types.
    empty = engine.empty_state(params, cfg, 2, 40, 64, store)
    kind = lambda x: (str(jax.typeof(x)), x.sharding.memory_kind)
    self.assertEqual(jax.tree.map(kind, empty), jax.tree.map(kind, state))
    np.testing.assert_array_equal(empty.layers[0].kv.slot_map, -1)

  def test_diff(self):
    old = jnp.array([[[5, -1, 2, 7]]])
    sel = jnp.array([[[1, 2, 3, 8]]])  # 8 = own block, new
    new_map, load, fetch = stores.diff_slots(old, sel, jnp.array([8]))
    np.testing.assert_array_equal(new_map, [[[1, 3, 2, 8]]])
    np.testing.assert_array_equal(load, [[[1, 3, -1, 8]]])
    np.testing.assert_array_equal(fetch, [[[True, True, False, False]]])
    # Fewer selected than slots: unassigned free slots keep their block.
    new_map, _, fetch = stores.diff_slots(
        old, jnp.array([[[0, 2, -1, -1]]]), jnp.array([2]))
    np.testing.assert_array_equal(new_map, [[[0, -1, 2, 7]]])
    np.testing.assert_array_equal(fetch, [[[True, False, False, False]]])

  def test_diff_keep_values(self):
    # 6 slots, selection of 3: misses take empty slots first, then the
    # lowest keep values; slots holding a selected block are never taken.
    old = jnp.array([[[4, 9, -1, 6, 2, 5]]])
    keep = jnp.array([[[0.5, -3.0, 7.0, 1.0, 9.0, -1.0]]])
    sel = jnp.array([[[1, 2, 3]]])  # 2 resident; 1 and 3 missing
    new_map, load, fetch = stores.diff_slots(old, sel, jnp.array([3]), keep)
    np.testing.assert_array_equal(new_map, [[[4, 3, 1, 6, 2, 5]]])
    np.testing.assert_array_equal(load, [[[-1, 3, 1, -1, -1, -1]]])
    # 3 is the own block (new, not fetched); 1 is fetched into the empty
    # slot.
    np.testing.assert_array_equal(fetch, [[[False, False, True, False, False,
                                            False]]])

  def test_prefetch_slots(self):
    # Slot 0 was selected at the previous step (position 9) and slot 1
    # holds a guessed block: both kept. Guessed 7 is resident, 11 comes
    # twice, 20 is not below the window: 1 and 11 load, the empty slot
    # first, then the least recently selected.
    new_map, load = stores.prefetch_slots(
        jnp.asarray([[[5, 7, -1, 2]]]), jnp.asarray([[[9, 3, -1, 4]]]),
        jnp.asarray([[[7, 11, 11, 1, 20]]]), jnp.asarray([10]),
        jnp.asarray([15]))
    np.testing.assert_array_equal(load, [[[-1, -1, 1, 11]]])
    np.testing.assert_array_equal(new_map, [[[5, 7, 1, 11]]])
    # No free slot: nothing loads.
    new_map, load = stores.prefetch_slots(
        jnp.asarray([[[5, 6]]]), jnp.asarray([[[9, 9]]]),
        jnp.asarray([[[1, 2]]]), jnp.asarray([10]), jnp.asarray([15]))
    np.testing.assert_array_equal(load, -1)
    np.testing.assert_array_equal(new_map, [[[5, 6]]])

  def test_options_validation(self):
    with self.assertRaisesRegex(ValueError, "HostStore.fetch='dma'"):
      stores.HostStore(fetch="dma")
    with self.assertRaisesRegex(ValueError,
                                "HostStore.prefetch_copy='sm' is invalid"):
      stores.HostStore(prefetch_copy="sm")
    with self.assertRaisesRegex(ValueError, "cache_blocks"):
      stores.HostStore(cache_blocks=0)
    with self.assertRaisesRegex(ValueError, "gather_programs"):
      stores.HostStore(gather_programs=0)
    cfg, _, _ = testing.tiny_model_with_bias("nosa")
    with self.assertRaisesRegex(ValueError, "below topk_blocks"):
      stores.HostStore(cache_blocks=2).check(cfg, 1, 1024)


if __name__ == "__main__":
  absltest.main()
