"""nosa_jax.metrics: the peak-memory figure the trainer logs."""

from unittest import mock

from absl.testing import absltest

from nosa_jax import metrics


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


class PeakMemoryTest(absltest.TestCase):

  def test_largest_peak_over_devices_in_gib(self):
    devices = [_Device({"peak_bytes_in_use": 3 * 2**30}),
               _Device({"peak_bytes_in_use": 5 * 2**29}),
               _Device({"bytes_in_use": 1})]
    with mock.patch.object(metrics.jax, "local_devices", lambda: devices):
      self.assertEqual(metrics.peak_memory_gib(), 3.0)

  def test_none_without_allocator_statistics(self):
    with mock.patch.object(metrics.jax, "local_devices",
                           lambda: [_Device(None), _Device({})]):
      self.assertIsNone(metrics.peak_memory_gib())
    if metrics.jax.default_backend() == "cpu":  # the CPU keeps none
      self.assertIsNone(metrics.peak_memory_gib())


if __name__ == "__main__":
  absltest.main()
