"""Dense causal attention: jax.nn path vs the written-out fp32 oracle."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import attention
from tests import tolerances


class CausalAttentionTest(parameterized.TestCase):

  @parameterized.product(group=[1, 4], dtype=[jnp.float32, jnp.bfloat16])
  def test_matches_reference(self, group, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    b, t, k, d = 2, 37, 2, 16
    q = jax.random.normal(keys[0], (b, t, k * group, d), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, d), dtype)
    v = jax.random.normal(keys[2], (b, t, k, d), dtype)
    got = attention.causal_attention(q, kk, v)
    want = attention.causal_attention_reference(q, kk, v)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32),
                               **tolerances.tol(dtype))

  def test_reference_is_causal_softmax(self):
    # Position 0 attends only to itself: output equals v[0] for every head.
    q = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    k = jax.random.normal(jax.random.key(2), (1, 4, 1, 8))
    v = jax.random.normal(jax.random.key(3), (1, 4, 1, 8))
    out = attention.causal_attention_reference(q, k, v)
    np.testing.assert_allclose(out[0, 0], jnp.broadcast_to(v[0, 0], (2, 8)),
                               atol=1e-6)


if __name__ == "__main__":
  absltest.main()
