"""Sampling: greedy, temperature and the nucleus support; prompt packing."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax.inference import sampling


class SamplingTest(absltest.TestCase):

  def test_greedy_and_top_p_support(self):
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.vmap(
        lambda k, t, p: sampling.sample_tokens(logits, k, t, p)[0],
        in_axes=(0, None, None))
    np.testing.assert_array_equal(draw(keys, 0.0, 1.0), 1)
    np.testing.assert_array_equal(draw(keys, 1.0, 1e-6), 1)
    # top_p = 0.7: the mass before token 2 is 0.5 < 0.7, before token 3 it
    # is 0.8, so the support is {1, 2}.
    self.assertEqual(set(np.asarray(draw(keys, 1.0, 0.7)).tolist()), {1, 2})
    self.assertEqual(set(np.asarray(draw(keys, 1.0, 1.0)).tolist()),
                     {0, 1, 2, 3})

  def test_sampling_arguments_out_of_range_are_refused(self):
    sampling.check_sampling(0.0, 1.0)
    sampling.check_sampling(0.7, 0.9)
    for t, p, msg in [(-1.0, 1.0, r"^temperature=-1.0 is invalid: must be >= "
                       r"0 \(0 = greedy\)$"),
                      (float("nan"), 1.0, "temperature=nan"),
                      (1.0, 5.0, r"^top_p=5.0 is invalid: must be in \(0, 1\]"),
                      (1.0, 0.0, "top_p=0.0")]:
      with self.assertRaisesRegex(ValueError, msg):
        sampling.check_sampling(t, p)

  def test_prepare_prompts_and_trim(self):
    tokens, lengths, s, pad, eos = sampling.prepare_prompts(
        [[5, 6, 7], [8]], 20, 16, eos_id=9)
    np.testing.assert_array_equal(lengths, [3, 1])
    self.assertEqual(tokens.shape, (2, 16))  # padded to a whole block
    self.assertEqual((s, pad, eos), (32, 9, 9))  # 3 + 20 - 1 -> 2 blocks
    np.testing.assert_array_equal(tokens[1, 1:], 9)
    steps = [jnp.array([1, 9]), jnp.array([9, 0]), jnp.array([2, 0])]
    self.assertEqual(sampling.trim_at_eos(steps, 9), [[1, 9], [9]])
    with self.assertRaisesRegex(ValueError, "none empty"):
      sampling.prepare_prompts([[1], []], 4, 16)
    with self.assertRaisesRegex(ValueError, "max_new_tokens=0"):
      sampling.prepare_prompts([[1]], 0, 16)


if __name__ == "__main__":
  absltest.main()
