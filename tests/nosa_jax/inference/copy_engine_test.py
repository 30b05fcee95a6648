"""The copy-engine FFI extension: build, errors, and copies inside a jit.

`CopyTest` runs issue / wait inside jitted functions: on the CPU over a
stand-in runtime (fake_dma: copies are memcpy, so the address arithmetic,
the pinned_host operands, the aliasing and the FIFO pairing are checked,
not asynchrony), and on the GPU (`-m gpu`, NOSA_TEST_GPU=1) over CUDA.
"""

import ctypes
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from nosa_jax.inference import copy_engine
from tests.nosa_jax.inference import fake_dma

_ON_GPU = jax.default_backend() == "gpu"
_NO_COMPILER = not fake_dma.compilers_present()


class ReferenceTest(absltest.TestCase):

  def test_reference_copies_planned_rows_and_skips_negative(self):
    src_RX = jnp.arange(5 * 4, dtype=jnp.float32).reshape(5, 4)
    dst = jnp.full((3 * 4,), -1.0)
    plan = jnp.array([[4, 0], [-1, 1], [2, 2]], jnp.int32)
    got = np.asarray(copy_engine.issue_reference(dst, src_RX, plan))
    np.testing.assert_array_equal(got.reshape(3, 4),
                                  [[16, 17, 18, 19], [-1] * 4, [8, 9, 10, 11]])


@pytest.mark.skipif(_NO_COMPILER, reason="no C / C++ compiler")
class BuildTest(absltest.TestCase):

  def test_builds_exports_handlers_and_reports_a_missing_runtime(self):
    path = copy_engine.build(self.create_tempdir().full_path)
    lib = ctypes.CDLL(path)
    for name in ("NosaDmaIssue", "NosaDmaIssueFrom", "NosaDmaWait",
                 "NosaDmaIssueCpu", "nosa_dma_init", "nosa_dma_counters"):
      self.assertTrue(hasattr(lib, name), name)
    lib.nosa_dma_init.argtypes = [ctypes.c_char_p, ctypes.c_int]
    self.assertEqual(lib.nosa_dma_init(b"/no/such/libcudart.so", 0), -1)
    self.assertEqual(copy_engine.build(self.create_tempdir().full_path)
                     .rsplit("/", 1)[1], path.rsplit("/", 1)[1])


class ErrorsTest(absltest.TestCase):

  @pytest.mark.skipif(_ON_GPU, reason="off-GPU message")
  def test_load_off_the_gpu_says_why(self):
    engine, why = copy_engine.load()
    self.assertIsNone(engine)
    self.assertIn("needs a CUDA GPU", why)

  def test_bad_plan_and_row_size_are_refused(self):
    eng = copy_engine.CopyEngine(lib=None, batch=False)
    dst = jnp.zeros((1024,), jnp.uint8)
    with self.assertRaisesRegex(ValueError, "plan must be"):
      eng.issue(dst, jnp.zeros((4, 3), jnp.int32), src_address=0,
                row_bytes=256)
    with self.assertRaisesRegex(ValueError, "row_bytes=300"):
      eng.issue(dst, jnp.zeros((4, 2), jnp.int32), src_address=0,
                row_bytes=300)


@pytest.mark.skipif(not _ON_GPU and _NO_COMPILER, reason="no C compiler")
class CopyTest(absltest.TestCase):

  def _engine(self, batch):
    if _ON_GPU:
      engine, why = copy_engine.load(batch=batch)
      self.assertIsNotNone(engine, why)
      return engine
    return fake_dma.engine(batch)

  def _run(self, batch, from_operand=False):
    engine = self._engine(batch)
    rows, row_elems, n = 64, 1024, 12
    rng = np.random.default_rng(0)
    src_np = rng.standard_normal((rows, row_elems)).astype(np.float32)
    src = jax.device_put(src_np, jax.memory.Space.Host)
    plan_np = np.stack([rng.choice(rows, n, replace=False),
                        rng.permutation(n)], 1).astype(np.int32)
    plan_np[3, 0] = -1  # skipped: the destination row keeps its value
    plan = jnp.asarray(plan_np)
    dst = jnp.full((n * row_elems,), 7.0, jnp.float32)
    address = src.unsafe_buffer_pointer()

    @jax.jit
    def step(d, p, x, src):
      if from_operand:
        d, = engine.issue_from([(d, src)], p, row_bytes=row_elems * 4)
      else:
        d = engine.issue(d, p, src_address=address, row_bytes=row_elems * 4)
      d, x = jax.lax.optimization_barrier((d, x))
      y = jnp.tanh(x @ x)  # between issue and wait
      return engine.wait(d), y

    engine.counters(reset=True)
    got, _ = step(dst, plan, jnp.ones((256, 256)), src)
    want = copy_engine.issue_reference(dst, jnp.asarray(src_np), plan)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    counts = engine.counters(reset=True)
    self.assertEqual((counts["calls"], counts["copies"], counts["waits"],
                      counts["pending"]), (1, n - 1, 1, 0))
    del src

  def test_loop_copies_equal_reference(self):
    self._run(batch=False)

  def test_batch_copies_equal_reference(self):
    self._run(batch=True)

  def test_issue_from_a_pinned_host_operand(self):
    self._run(batch=True, from_operand=True)

  def test_issue_from_two_pairs_one_plan(self):
    engine = self._engine(True)
    rng = np.random.default_rng(1)
    k_np, v_np = (rng.standard_normal((32, 256)).astype(np.float32)
                  for _ in range(2))
    k_src, v_src = (jax.device_put(x, jax.memory.Space.Host)
                    for x in (k_np, v_np))
    plan = jnp.asarray(np.stack([rng.choice(32, 6, replace=False),
                                 rng.permutation(6)], 1).astype(np.int32))

    @jax.jit
    def step(kd, vd, p, ks, vs):
      kd, vd = engine.issue_from([(kd, ks), (vd, vs)], p, row_bytes=1024)
      return engine.wait(kd, vd)

    zeros = jnp.zeros((6 * 256,), jnp.float32)
    kd, vd = step(zeros, zeros, plan, k_src, v_src)
    for got, src in ((kd, k_np), (vd, v_np)):
      np.testing.assert_array_equal(
          np.asarray(got), np.asarray(copy_engine.issue_reference(
              zeros, jnp.asarray(src), plan)))

  def test_out_of_range_rows_and_unpaired_waits_are_refused(self):
    engine = self._engine(True)
    src = jax.device_put(np.zeros((4, 256), np.float32), jax.memory.Space.Host)
    dst = jnp.zeros((2 * 256,), jnp.float32)

    def copy(plan):
      return jax.jit(lambda d, s, p: engine.wait(
          engine.issue_from([(d, s)], p, row_bytes=1024)[0]))(dst, src, plan)

    with self.assertRaisesRegex(Exception, "source row 9 outside"):
      jax.block_until_ready(copy(jnp.array([[9, 0]], jnp.int32)))
    with self.assertRaisesRegex(Exception, "destination row 5 outside"):
      jax.block_until_ready(copy(jnp.array([[1, 5]], jnp.int32)))
    # A wait on buffers that are not the oldest issue's destinations.
    other = jnp.zeros((2 * 256,), jnp.float32)

    @jax.jit
    def crossed(d, o, s, p):
      d, = engine.issue_from([(d, s)], p, row_bytes=1024)
      return d, engine.wait(o + 1.0)

    with self.assertRaisesRegex(Exception, "not the oldest issue's"):
      jax.block_until_ready(crossed(dst, other, src,
                                    jnp.array([[1, 0]], jnp.int32)))
    self.assertEqual(engine.drop_pending(), 1)  # the issue left unpaired
    self.assertEqual(engine.counters(reset=True)["pending"], 0)

  def test_host_operand_attribute_is_opt_in(self):
    engine = self._engine(True)
    src = jax.device_put(np.arange(4 * 256, dtype=np.float32).reshape(4, 256),
                         jax.memory.Space.Host)
    dst, plan = jnp.zeros((2 * 256,), jnp.float32), jnp.array([[3, 1]],
                                                               jnp.int32)

    for env, attr in ((None, False), ("1", True)):

      def copy(d, k, v, p):  # a new function: no trace reused across envs
        return engine.wait(*engine.issue_from([(d, k), (d + 0, v)], p,
                                              row_bytes=1024))

      with mock.patch.dict(os.environ, {} if env is None else
                           {copy_engine.HOST_OPERANDS_ENV: env}):
        lowered = jax.jit(copy).lower(dst, src, src, plan)
        self.assertEqual('operands_memory_spaces = "{2:5,4:5}"'
                         in lowered.as_text(), attr)
        got, _ = jax.jit(copy)(dst, src, src, plan)
        np.testing.assert_array_equal(np.asarray(got)[256:],
                                      np.asarray(src)[3])

  @pytest.mark.skipif(_ON_GPU, reason="the stand-in runtime says it")
  def test_a_source_moved_to_the_device_is_refused(self):
    engine = self._engine(True)
    src = jax.device_put(np.zeros((4, 256), np.float32), jax.memory.Space.Host)
    dst = jnp.zeros((2 * 256,), jnp.float32)
    fake_dma.set_memory_type(2)  # cudaMemoryTypeDevice
    try:
      with self.assertRaisesRegex(Exception, "is not pinned host memory"):
        jax.block_until_ready(jax.jit(lambda d, s, p: engine.wait(
            engine.issue_from([(d, s)], p, row_bytes=1024)[0]))(
                dst, src, jnp.array([[1, 0]], jnp.int32)))
    finally:
      fake_dma.set_memory_type(1)
    engine.drop_pending()


if __name__ == "__main__":
  absltest.main()
