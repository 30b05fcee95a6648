"""Tests for nosa_jax.recall and the recall training mix of nosa_jax.data."""

import re

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import evaluation
from nosa_jax import recall
from nosa_jax import testing

BYTES = data.ByteTokenizer()
_RECORD = re.compile(r" <([a-z]{4}):(\d{4})>")


def _corpus(n=20_000):
  return (np.arange(n) % 97 + 100).astype(np.uint16)


class KeysTest(absltest.TestCase):

  def test_heldout_keys_are_an_eighth_and_disjoint(self):
    rng = np.random.default_rng(0)
    train = set(recall.random_keys(rng, 400, heldout=False))
    held = set(recall.random_keys(rng, 400, heldout=True))
    self.assertLen(train, 400)
    self.assertEmpty(train & held)
    self.assertTrue(all(recall.is_heldout_key(k) for k in held))
    sample = recall.random_keys(np.random.default_rng(1), 2000, heldout=False)
    self.assertFalse(any(recall.is_heldout_key(k) for k in sample))
    frac = np.mean([recall.is_heldout_key(f"{a}{b}{c}d")
                    for a in "abcdefgh" for b in "abcdefgh" for c in "abcd"])
    self.assertBetween(frac, 0.08, 0.18)


class TrainingDocumentTest(parameterized.TestCase):

  @parameterized.product(length=[257, 1025, 8193], mqar_share=[0.0, 1.0],
                         seed=[0, 1, 2])
  def test_layout(self, length, mqar_share, seed):
    b = recall.RecallBuilder(BYTES)
    doc = b.training_document(length, np.random.default_rng(seed),
                              _corpus(), mqar_share=mqar_share)
    self.assertLen(doc.tokens, length)
    self.assertEqual(doc.tokens.dtype, np.int32)
    self.assertEqual(doc.tokens[0], BYTES.bos_id)
    values = {}
    for s, e, key in doc.records:
      m = _RECORD.fullmatch(BYTES.decode(doc.tokens[s:e]))
      self.assertIsNotNone(m)
      self.assertEqual(m.group(1), key)
      self.assertFalse(recall.is_heldout_key(key))
      values[key] = m.group(2)
    self.assertLen(values, len(doc.records))  # distinct keys
    ends = [e for _, e, _ in doc.records]
    starts = [s for s, _, _ in doc.records]
    self.assertTrue(all(a <= b for a, b in zip(ends[:-1], starts[1:],
                                               strict=True)))
    # Queries repeat a record, value included, at the end of the window.
    self.assertEqual(doc.queries[-1][1], length)
    self.assertGreaterEqual(doc.queries[0][0], ends[-1])
    for s, e, key in doc.queries:
      self.assertEqual(BYTES.decode(doc.tokens[s:e]),
                       f" <{key}:{values[key]}>")
    n = len(doc.records)
    if mqar_share == 1.0 and length > 4000:
      self.assertBetween(n, recall.MQAR_RECORDS[0], recall.MQAR_RECORDS[1])
    if mqar_share == 0.0:
      self.assertBetween(n, 1, recall.NIAH_RECORDS[1])

  def test_distances_spread_over_the_window(self):
    b = recall.RecallBuilder(BYTES)
    dist = []
    for seed in range(60):
      doc = b.training_document(4097, np.random.default_rng(seed), _corpus())
      start = {k: s for s, _, k in doc.records}
      dist += [qs - start[k] for qs, _, k in doc.queries]
    dist = np.array(dist) / 4097
    self.assertLess(dist.min(), 0.15)
    self.assertGreater(dist.max(), 0.85)
    self.assertBetween(np.median(dist), 0.3, 0.7)

  def test_too_short(self):
    b = recall.RecallBuilder(BYTES)
    with self.assertRaisesRegex(ValueError, "too short"):
      b.training_document(b.min_document_length() - 1,
                          np.random.default_rng(0))


class TrainingWindowTest(parameterized.TestCase):

  def test_without_segments_it_is_one_document(self):
    b = recall.RecallBuilder(BYTES)
    for seed in range(3):
      one = b.training_document(1025, np.random.default_rng(seed), _corpus())
      win = b.training_window(1025, np.random.default_rng(seed), _corpus())
      np.testing.assert_array_equal(win.tokens, one.tokens)
      self.assertEqual((win.records, win.queries),
                       (one.records, one.queries))

  @parameterized.parameters(0, 1, 2, 3, 4, 5)
  def test_segments_layout(self, seed):
    b = recall.RecallBuilder(BYTES)
    doc = b.training_window(4097, np.random.default_rng(seed), _corpus(),
                            segment_tokens=256)
    self.assertLen(doc.tokens, 4097)
    self.assertEqual(doc.tokens[0], BYTES.bos_id)
    keys = [k for _, _, k in doc.records]
    self.assertLen(set(keys), len(keys))  # distinct across the window
    record = {k: (s, e) for s, e, k in doc.records}
    for s, e, key in doc.queries:
      rs, re_ = record[key]
      self.assertLess(re_, s + 1)
      # The record is still there and the query repeats it, value included.
      self.assertRegex(BYTES.decode(doc.tokens[rs:re_]), _RECORD)
      np.testing.assert_array_equal(doc.tokens[s:e], doc.tokens[rs:re_])
      # No BOS (a document boundary) between a record and its query.
      self.assertNotIn(BYTES.bos_id, doc.tokens[re_:s])

  def test_segments_ask_more_and_nearer(self):
    b = recall.RecallBuilder(BYTES)

    def stats(segment_tokens):
      count, dist = 0, []
      for seed in range(40):
        doc = b.training_window(8193, np.random.default_rng(seed),
                                segment_tokens=segment_tokens)
        start = {k: s for s, _, k in doc.records}
        dist += [qs - start[k] for qs, _, k in doc.queries]
        count += len(doc.queries)
      return count, np.array(dist)

    (n1, d1), (n2, d2) = stats(0), stats(512)
    self.assertGreater(n2, 2 * n1)
    self.assertGreater(np.sum(d2 < 320), 10 * max(np.sum(d1 < 320), 1))
    self.assertGreater(d2.max(), 6000)  # one-document windows stay

  def test_short_window_is_one_document(self):
    b = recall.RecallBuilder(BYTES)
    doc = b.training_window(257, np.random.default_rng(0), _corpus(),
                            segment_tokens=512)
    self.assertEqual(int(np.sum(doc.tokens == BYTES.bos_id)), 1)


def _lookup(tokens_BT, width=1 + 1 + recall.KEY_LETTERS + 1):
  """A perfect associative recaller (an induction head over `width`
  tokens): predicts the token that followed the last earlier occurrence
  of the last `width` tokens, else 0; NLL 0 where it found one."""
  pred, nll = np.zeros_like(tokens_BT), np.full(tokens_BT.shape, np.log(10))
  for row, toks in enumerate(np.asarray(tokens_BT)):
    seen = {}
    for p in range(width - 1, len(toks) - 1):
      gram = toks[p - width + 1:p + 1].tobytes()
      if gram in seen:
        pred[row, p], nll[row, p] = toks[seen[gram] + 1], 0.0
      seen[gram] = p
  return pred, nll


class SameQuestionTest(absltest.TestCase):
  """The training mix and the held-out sets ask the same question: a model
  that looks a record up by its key answers every query of both."""

  def test_lookup_answers_every_training_query(self):
    mix = data.SyntheticMixStream(_corpus(), 1024, seed=0, tokenizer=BYTES,
                                  passkey_fraction=0.2, recall_fraction=0.5,
                                  recall_segment_tokens=256)
    rows = mix.batch_at(0, 24)
    pred, _ = _lookup(rows)
    asked = 0
    for row, p in zip(rows, pred, strict=True):
      # One character per token (BOS/EOS as NUL), so offsets are positions.
      text = np.where(row < 256, row, 0).astype(np.uint8).tobytes().decode(
          "latin-1")
      first = {}
      for m in _RECORD.finditer(text):
        if m.group(1) not in first:
          first[m.group(1)] = m.group(2)
          continue
        asked += 1
        self.assertEqual(m.group(2), first[m.group(1)])
        vs = m.start(2)  # position vs - 1 predicts the value's first digit
        np.testing.assert_array_equal(p[vs - 1:vs + recall.VALUE_DIGITS - 1],
                                      row[vs:vs + recall.VALUE_DIGITS])
    self.assertGreater(asked, 24)

  def test_lookup_recalls_every_heldout_bucket(self):
    # Only the value's digits are scored, right after the query's ':'; a
    # model that reads the record's key but guesses the digits scores 0.
    kw = dict(context=256, trials=3, distractors=4, seed=1, batch_size=4,
              sparse=testing.TINY_SPARSE)
    haystack = _corpus(5000)
    good = evaluation.recall_by_distance(_lookup, BYTES, haystack, **kw)
    self.assertEqual(set(good["accuracy"].values()), {1.0})

    def no_value(tokens_BT):
      pred, nll = _lookup(tokens_BT)
      digit = (pred >= ord("0")) & (pred <= ord("9"))
      return np.where(digit, ord("0"), pred), nll

    bad = evaluation.recall_by_distance(no_value, BYTES, haystack, **kw)
    self.assertLess(max(bad["accuracy"].values()), 0.5)


class DistanceExamplesTest(absltest.TestCase):

  GEOMETRY = dict(block_size=16, sink_blocks=1, window_blocks=2)

  def test_buckets(self):
    ctx = 256
    ex = recall.distance_examples(BYTES, _corpus(3000), context=ctx,
                                  trials=5, distractors=3, seed=7,
                                  **self.GEOMETRY)
    names = [b for b, _ in ex]
    self.assertEqual(names, [b for b in [n for n, _ in recall.BUCKETS]
                             for _ in range(5)])
    for bucket, e in ex:
      frac = dict(recall.BUCKETS)[bucket]
      self.assertLen(e.tokens, 2 * ctx if frac == 2.0 else ctx)
      self.assertTrue(recall.is_heldout_key(e.key))
      text = BYTES.decode(e.tokens)
      recs = _RECORD.findall(text)
      self.assertLen(recs, 4)  # the target and 3 distractors
      self.assertLen({k for k, _ in recs}, 4)
      value = dict(recs)[e.key]
      self.assertEqual(BYTES.decode(e.answer), value)
      self.assertTrue(text.endswith(f" <{e.key}:{value}"))
      self.assertEqual(BYTES.decode(e.tokens[e.needle_start:e.needle_end]),
                       f" <{e.key}:{value}>")
      distance = e.answer_start - e.needle_start
      own = (e.answer_start - 1) // 16
      inside = e.needle_start >= (own - 2) * 16
      self.assertEqual(inside, bucket == "window")
      if frac is not None and frac < 1.0:
        self.assertAlmostEqual(distance, frac * ctx, delta=8)
      if frac is not None and frac >= 1.0:
        self.assertEqual(e.needle_start, 16)  # right after the sink
    # Reproducible; another seed gives other keys.
    again = recall.distance_examples(BYTES, _corpus(3000), context=ctx,
                                     trials=5, distractors=3, seed=7,
                                     **self.GEOMETRY)
    np.testing.assert_array_equal(ex[3][1].tokens, again[3][1].tokens)
    other = recall.distance_examples(BYTES, _corpus(3000), context=ctx,
                                     trials=5, distractors=3, seed=8,
                                     **self.GEOMETRY)
    self.assertNotEqual(ex[3][1].key, other[3][1].key)


class MixStreamTest(absltest.TestCase):

  def test_fractions_determinism_and_passkey_rows_unchanged(self):
    kw = dict(seed=3, tokenizer=BYTES)
    pk = data.SyntheticMixStream(_corpus(), 256, passkey_fraction=0.3, **kw)
    mix = data.SyntheticMixStream(_corpus(), 256, passkey_fraction=0.3,
                                  recall_fraction=0.4, **kw)
    a, b = pk.batch_at(5, 300), mix.batch_at(5, 300)
    is_rec = np.array([bool(_RECORD.search(BYTES.decode(r))) for r in b])
    changed = np.any(a != b, axis=1)
    np.testing.assert_array_equal(changed, is_rec & changed)
    self.assertBetween(changed.mean(), 0.3, 0.5)
    np.testing.assert_array_equal(mix.batch_at(9, 3), b[4:7])

  def test_config(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data.recall_fraction=0.8 is invalid"):
      config_lib.DataConfig(passkey_fraction=0.5, recall_fraction=0.8)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data.recall_mqar_share=2 is invalid"):
      config_lib.DataConfig(recall_mqar_share=2)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data.recall_segment_tokens=-1 is invalid"):
      config_lib.DataConfig(recall_segment_tokens=-1)
    with self.assertRaisesRegex(
        config_lib.ConfigError,
        r"data.recall_fraction=0.5 is invalid with train.seq_len=64"):
      data.SyntheticMixStream(_corpus(), 64, tokenizer=BYTES,
                              recall_fraction=0.5)


if __name__ == "__main__":
  absltest.main()
