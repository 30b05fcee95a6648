"""RMSNorm, RoPE and SwiGLU against direct numpy formulas."""

from absl.testing import absltest
import numpy as np

from nosa_jax import layers
from tests import tolerances


class LayersTest(absltest.TestCase):

  def test_rms_norm(self):
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
    want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(layers.rms_norm(x, scale, 1e-6), want,
                               **tolerances.tol(np.float32))

  def test_rope_matches_complex_rotation(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(2, 7))
    # Rotate-half pairs (i, i + D/2) as the complex number x_i + i x_{i+D/2}.
    z = x[..., :4] + 1j * x[..., 4:]
    freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    z = z * np.exp(1j * pos[:, :, None, None] * freq)
    want = np.concatenate([z.real, z.imag], -1)
    np.testing.assert_allclose(layers.apply_rope(x, pos, 10000.0), want,
                               atol=1e-4, rtol=1e-4)

  def test_rope_relative(self):
    # <rope(q, m), rope(k, n)> depends only on m - n.
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
    dot = lambda m, n: float(np.sum(
        layers.apply_rope(q, np.array([[m]]), 1e4)
        * layers.apply_rope(k, np.array([[n]]), 1e4)))
    self.assertAlmostEqual(dot(10, 3), dot(107, 100), places=4)
    self.assertNotAlmostEqual(dot(10, 3), dot(10, 4), places=3)

  def test_swiglu(self):
    rng = np.random.default_rng(3)
    x, g, u, d = (rng.normal(size=s).astype(np.float32)
                  for s in [(2, 3, 4), (4, 6), (4, 6), (6, 4)])
    silu = lambda a: a / (1 + np.exp(-a))
    want = (silu(x @ g) * (x @ u)) @ d
    np.testing.assert_allclose(layers.swiglu(x, g, u, d), want,
                               atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
