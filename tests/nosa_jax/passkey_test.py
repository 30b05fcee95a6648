"""Tests for nosa_jax.passkey and the passkey training mix of nosa_jax.data."""

import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import passkey

BYTES = data.ByteTokenizer()


class PasskeyExampleTest(parameterized.TestCase):

  @parameterized.product(length=[156, 157, 300, 1000],
                         depth=[0.0, 0.3, 0.5, 1.0])
  def test_layout(self, length, depth):
    e = passkey.PasskeyBuilder(BYTES).example(length, depth, "12345")
    self.assertLen(e.tokens, length)
    self.assertEqual(e.tokens[0], BYTES.bos_id)
    self.assertEqual(BYTES.decode(e.answer), " 12345")
    self.assertEqual(BYTES.decode(e.tokens[e.needle_start:e.needle_end]),
                     passkey.NEEDLE.format(key="12345"))
    self.assertTrue(BYTES.decode(e.prompt).endswith(passkey.QUESTION))
    self.assertTrue(BYTES.decode(e.prompt).startswith(passkey.INTRO))

  def test_depth_orders_needles_and_hits_the_ends(self):
    b = passkey.PasskeyBuilder(BYTES)
    starts = [b.example(2000, d, "12345").needle_start
              for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    self.assertEqual(starts, sorted(starts))
    self.assertEqual(starts[0], 1 + len(b.intro))
    last = b.example(2000, 1.0, "12345")
    self.assertEqual(last.needle_end, last.answer_start - len(b.question))
    mid = b.example(2000, 0.5, "12345")
    filler = 2000 - b.fixed_length("12345")
    # Snapped to a sentence end: within one sentence of the exact depth.
    self.assertLess(abs(mid.needle_start - 1 - len(b.intro) - filler / 2),
                    max(len(s) for s in passkey.FILLER_SENTENCES))

  def test_corpus_filler_is_used_verbatim(self):
    b = passkey.PasskeyBuilder(BYTES)
    filler = np.arange(300, dtype=np.int32) % 200
    e = b.example(400, 0.5, "12345", filler)
    n = 400 - b.fixed_length("12345")
    got = np.concatenate([e.tokens[1 + len(b.intro):e.needle_start],
                          e.tokens[e.needle_end:e.answer_start
                                   - len(b.question)]])
    np.testing.assert_array_equal(got, filler[:n])

  def test_too_short_and_bad_depth_raise(self):
    b = passkey.PasskeyBuilder(BYTES)
    with self.assertRaisesRegex(ValueError, "length=100 is too short"):
      b.example(100, 0.5, "12345")
    with self.assertRaisesRegex(ValueError, r"depth=1.5 must be in \[0, 1\]"):
      b.example(300, 1.5, "12345")

  def test_training_windows_pack_several_documents(self):
    b = passkey.PasskeyBuilder(BYTES)
    counts = set()
    for seed in range(30):
      rng = np.random.default_rng(seed)
      corpus = (np.arange(8193) % 90 + 33).astype(np.int32)
      w = b.training_document(8193, rng, corpus)
      self.assertLen(w, 8193)
      starts = np.flatnonzero(w == BYTES.bos_id)
      counts.add(len(starts))
      for s, e in zip(starts, list(starts[1:]) + [len(w)], strict=True):
        text = BYTES.decode(w[s:e])
        self.assertTrue(text.startswith(passkey.INTRO))
        key = text[-5:]
        self.assertIn(passkey.NEEDLE.format(key=key), text)
    self.assertEqual(counts, {1, 2, 3, 4})  # 8193 // SEGMENT_TOKENS = 4
    one = b.training_document(300, np.random.default_rng(0))
    self.assertEqual(np.sum(one == BYTES.bos_id), 1)

  def test_make_examples_order_and_seed(self):
    ex = passkey.make_examples(BYTES, [200, 300], [0.1, 0.9], 3, seed=1)
    self.assertEqual([(e.length, e.depth) for e in ex[::3]],
                     [(200, 0.1), (200, 0.9), (300, 0.1), (300, 0.9)])
    self.assertTrue(all(len(e.key) == 5 and e.key[0] != "0" for e in ex))
    again = passkey.make_examples(BYTES, [200, 300], [0.1, 0.9], 3, seed=1)
    self.assertEqual([e.key for e in ex], [e.key for e in again])
    self.assertGreater(len({e.key for e in ex}), 6)

  def test_hf_tokenizer(self):
    try:
      import tokenizers as tk  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest("optional package 'tokenizers' is not installed")
    raw = tk.Tokenizer(tk.models.BPE())
    raw.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([passkey.INTRO, passkey.QUESTION]
                            + list(passkey.FILLER_SENTENCES) * 10, trainer)
    path = os.path.join(self.create_tempdir().full_path, "tokenizer.json")
    raw.save(path)
    tok = data.load_tokenizer(path)
    for e in passkey.make_examples(tok, [120, 500], [0.2, 0.8], 2):
      self.assertLen(e.tokens, e.length)
      self.assertEqual(tok.decode(e.answer).strip(), e.key)
      self.assertIn(f"The pass key is {e.key}.", tok.decode(e.tokens))


class SyntheticMixStreamTest(absltest.TestCase):

  def _stream(self, fraction, seq_len=256):
    tokens = (np.arange(20_000) % 97 + 100).astype(np.uint16)
    return data.SyntheticMixStream(tokens, seq_len, seed=3, tokenizer=BYTES,
                                   passkey_fraction=fraction)

  def test_fraction_and_determinism(self):
    stream = self._stream(0.5)
    batch = stream.batch_at(10, 400)
    self.assertEqual(batch.shape, (400, 257))
    is_pk = np.array([BYTES.decode(r).startswith(passkey.INTRO)
                      for r in batch])
    self.assertBetween(is_pk.mean(), 0.4, 0.6)
    plain = data.TokenStream(stream.tokens, 256, seed=3).batch_at(10, 400)
    np.testing.assert_array_equal(batch[~is_pk], plain[~is_pk])
    # Position i gives the same row whatever the batch it is read in.
    np.testing.assert_array_equal(stream.batch_at(15, 4), batch[5:9])
    for row in batch[is_pk][:20]:
      text = BYTES.decode(row)
      key = text[-5:]
      self.assertIn(f"The pass key is {key}.", text)

  def test_seq_len_too_short(self):
    with self.assertRaisesRegex(
        config_lib.ConfigError,
        r"data.passkey_fraction=0.5 is invalid with train.seq_len=64"):
      self._stream(0.5, seq_len=64)

  def test_config_validation_and_load_datasets(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data.passkey_fraction=1.5 is invalid"):
      config_lib.DataConfig(passkey_fraction=1.5)
    root = self.create_tempdir().full_path
    for i in range(8):
      with open(os.path.join(root, f"d{i}.txt"), "w") as f:
        f.write(f"document {i} " * 300)
    cfg = config_lib.DataConfig(source=root, holdout_fraction=0.3,
                                cache_dir=self.create_tempdir().full_path,
                                passkey_fraction=1.0)
    ds = data.load_datasets(cfg, seq_len=200, seed=0)
    self.assertIsInstance(ds.train, data.SyntheticMixStream)
    self.assertNotIsInstance(ds.eval, data.SyntheticMixStream)
    self.assertTrue(all(BYTES.decode(r).startswith(passkey.INTRO)
                        for r in ds.train.batch_at(0, 4)))


if __name__ == "__main__":
  absltest.main()
