"""Tests for nosa_jax.data: tokenizers, splits, cache and resumable batches.

Expected values are recomputed here independently of the module (the
CRC-32 holdout rule, the per-epoch permutations, the stdlib file list), so
a change in any of those rules fails a test rather than passing silently.
"""

import json
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from unittest import mock
import zlib

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import data

# Under pytest nobody parses absl flags, and create_tempdir() reads
# --test_tmpdir; accept the defaults (absltest.main() still parses argv).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

BOS, EOS, PAD = 256, 257, 258


def _split_docs(tokens: np.ndarray) -> list[bytes]:
  """Byte-tokenized [BOS] doc [EOS] ... stream -> list of document bytes."""
  tokens = np.asarray(tokens)
  starts = np.flatnonzero(tokens == BOS)
  ends = np.flatnonzero(tokens == EOS)
  assert len(starts) == len(ends), (len(starts), len(ends))
  return [tokens[s + 1:e].astype(np.uint8).tobytes()
          for s, e in zip(starts, ends, strict=True)]


def _heldout(key: str, fraction: float) -> bool:
  # The documented rule, restated rather than imported from the module.
  return zlib.crc32(key.encode("utf-8")) % 10_000 < fraction * 10_000


def _write_corpus(root: str, n: int) -> dict[str, bytes]:
  """n small .txt documents (some non-ASCII, some in a subdir)."""
  docs = {}
  for i in range(n):
    rel = f"sub/doc_{i:03d}.txt" if i % 3 == 0 else f"doc_{i:03d}.txt"
    text = f"document {i} héllo ✓ " * (i % 5 + 1)
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(text.encode("utf-8"))
    docs[rel] = text.encode("utf-8")
  return docs


class ByteTokenizerTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("ascii", "hello, world\n"),
      ("non_ascii", "héllo wörld ✓ 日本語 🙂"),
      ("empty", ""),
  )
  def test_round_trip(self, text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    self.assertEqual(ids.dtype, np.int32)
    self.assertLen(ids, len(text.encode("utf-8")))
    self.assertEqual(tok.decode(ids), text)

  def test_encode_is_utf8_bytes(self):
    np.testing.assert_array_equal(
        data.ByteTokenizer().encode("Aé€"),
        [0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC])

  def test_special_ids(self):
    tok = data.ByteTokenizer()
    self.assertEqual((tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id),
                     (259, BOS, EOS, PAD))
    self.assertEqual(tok.decode([BOS, 104, 105, EOS, PAD, PAD]), "hi")

  def test_decode_replaces_invalid_utf8(self):
    self.assertEqual(data.ByteTokenizer().decode([0xFF, 0x41]), "\ufffdA")

  def test_encode_batch_accepts_bytes_and_text(self):
    a, b = data.ByteTokenizer().encode_batch([b"\xffx", "é"])
    np.testing.assert_array_equal(a, [0xFF, ord("x")])
    np.testing.assert_array_equal(b, [0xC3, 0xA9])

  def test_load_tokenizer(self):
    self.assertIsInstance(data.load_tokenizer("bytes"), data.ByteTokenizer)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data\.tokenizer='/no/such/tok\.json'"):
      data.load_tokenizer("/no/such/tok.json")

  def test_hf_tokenizer_needs_package(self):
    path = self.create_tempfile("tokenizer.json", content="{}").full_path
    # A None entry in sys.modules makes `import tokenizers` raise ImportError
    # whether or not the package is installed.
    with mock.patch.dict(sys.modules, {"tokenizers": None}):
      with self.assertRaisesRegex(
          config_lib.ConfigError,
          r"data\.tokenizer=.*needs the 'tokenizers' package: "
          r"pip install tokenizers"):
        data.load_tokenizer(path)


class HFTokenizerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest("optional package 'tokenizers' is not installed")
    self.tk = tokenizers

  def _make(self, specials):
    tk = self.tk
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello tokens"] * 20, trainer)
    path = os.path.join(self.create_tempdir().full_path, "tokenizer.json")
    tok.save(path)
    return tok, path

  def test_special_ids_and_round_trip(self):
    raw, path = self._make(["<s>", "</s>", "<pad>"])
    tok = data.load_tokenizer(path)
    self.assertIsInstance(tok, data.HFTokenizer)
    self.assertEqual((tok.bos_id, tok.eos_id, tok.pad_id),
                     (raw.token_to_id("<s>"), raw.token_to_id("</s>"),
                      raw.token_to_id("<pad>")))
    self.assertEqual(tok.vocab_size, raw.get_vocab_size())
    text = "hello wörld ✓"
    ids = tok.encode(text)
    self.assertLess(ids.max(), tok.vocab_size)
    self.assertLess(len(ids), len(text.encode("utf-8")))  # merges happened
    self.assertEqual(tok.decode(np.concatenate([[tok.bos_id], ids,
                                                [tok.eos_id]])), text)

  def test_without_specials_appends_bos_eos(self):
    raw, path = self._make([])
    tok = data.load_tokenizer(os.path.dirname(path))  # a directory works too
    base = raw.get_vocab_size()
    self.assertEqual((tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size),
                     (base, base + 1, base + 1, base + 2))
    self.assertEqual(tok.decode([base, *tok.encode("hello"), base + 1]),
                     "hello")

  def test_load_datasets_with_hf_tokenizer(self):
    _, path = self._make(["<s>", "</s>", "<pad>"])
    root = self.create_tempdir().full_path
    _write_corpus(root, 12)
    cfg = config_lib.DataConfig(
        source=root, tokenizer=path, holdout_fraction=0.2,
        cache_dir=self.create_tempdir().full_path)
    ds = data.load_datasets(cfg, seq_len=8, seed=0)
    self.assertEqual(ds.train.tokens.dtype, np.uint16)
    self.assertEqual(ds.train.tokens[0], ds.tokenizer.bos_id)
    self.assertIn("document 1 héllo", ds.tokenizer.decode(ds.train.tokens))


class TokenStreamTest(parameterized.TestCase):

  # Token value == token index, so every window identifies itself.
  TOKENS = np.arange(1000, dtype=np.uint16)
  SEQ_LEN = 10
  NUM_WINDOWS = (1000 - 1) // 10  # 99

  def _stream(self, seed=0):
    return data.TokenStream(self.TOKENS, self.SEQ_LEN, seed)

  def _perm(self, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(self.NUM_WINDOWS)

  def test_shape_dtype_and_num_windows(self):
    s = self._stream()
    self.assertEqual(s.num_windows, self.NUM_WINDOWS)
    b = s.batch_at(0, 4)
    self.assertEqual((b.shape, b.dtype), ((4, 11), np.int32))

  @parameterized.parameters(0, 7, 97, 98, 99, 350)
  def test_same_position_same_batch_across_objects(self, position):
    np.testing.assert_array_equal(self._stream().batch_at(position, 8),
                                  self._stream().batch_at(position, 8))

  @parameterized.parameters(2, 50, 96, 99, 199)
  def test_position_continuity(self, p):
    s = self._stream()
    np.testing.assert_array_equal(s.batch_at(p, 4), s.batch_at(p - 2, 8)[2:6])
    whole = s.batch_at(p, 12)
    parts = np.concatenate([s.batch_at(p, 5), s.batch_at(p + 5, 7)])
    np.testing.assert_array_equal(whole, parts)

  def test_windows_are_contiguous_and_overlap_by_one(self):
    b = self._stream().batch_at(0, self.NUM_WINDOWS)
    # Each window starts at a multiple of seq_len ...
    np.testing.assert_array_equal(b[:, 0] % self.SEQ_LEN, 0)
    # ... and its targets are its inputs shifted by one token of the stream
    # (token value == index here),
    inputs, targets = b[:, :-1], b[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    # and the last token of window w is the first of window w + 1.
    by_start = b[np.argsort(b[:, 0])]
    np.testing.assert_array_equal(by_start[:-1, -1], by_start[1:, 0])

  @parameterized.parameters(0, 1, 2)
  def test_every_window_once_per_epoch_in_seeded_order(self, epoch):
    s = self._stream(seed=3)
    b = s.batch_at(epoch * self.NUM_WINDOWS, self.NUM_WINDOWS)
    np.testing.assert_array_equal(np.sort(b[:, 0]),
                                  np.arange(self.NUM_WINDOWS) * self.SEQ_LEN)
    np.testing.assert_array_equal(b[:, 0] // self.SEQ_LEN,
                                  self._perm(3, epoch))

  def test_epoch_boundary_continues_in_next_permutation(self):
    s = self._stream(seed=5)
    b = s.batch_at(self.NUM_WINDOWS - 3, 6)
    expected = np.concatenate([self._perm(5, 0)[-3:], self._perm(5, 1)[:3]])
    np.testing.assert_array_equal(b[:, 0] // self.SEQ_LEN, expected)
    self.assertFalse(np.array_equal(self._perm(5, 0), self._perm(5, 1)))

  def test_batch_larger_than_an_epoch(self):
    b = self._stream().batch_at(0, 250)  # spans epochs 0, 1 and 2
    w = b[:, 0] // self.SEQ_LEN
    np.testing.assert_array_equal(w[:99], self._perm(0, 0))
    np.testing.assert_array_equal(w[99:198], self._perm(0, 1))
    np.testing.assert_array_equal(w[198:], self._perm(0, 2)[:52])

  def test_seeds_give_different_orders(self):
    a = self._stream(seed=0).batch_at(0, 16)
    b = self._stream(seed=1).batch_at(0, 16)
    self.assertFalse(np.array_equal(a, b))

  def test_too_short_names_seq_len(self):
    data.TokenStream(np.arange(11), 10)  # exactly one window is fine
    with self.assertRaisesRegex(ValueError, r"seq_len \+ 1 = 11"):
      data.TokenStream(np.arange(10), 10, name="eval split")

  def test_negative_position_rejected(self):
    with self.assertRaises(ValueError):
      self._stream().batch_at(-1, 2)

  def test_eval_batches_are_first_windows_in_order(self):
    batches = data.eval_batches(self.TOKENS, self.SEQ_LEN, 4, 3)
    self.assertLen(batches, 3)
    starts = np.concatenate([b[:, 0] for b in batches])
    np.testing.assert_array_equal(starts, np.arange(12) * self.SEQ_LEN)
    again = data.eval_batches(self._stream(seed=9), self.SEQ_LEN, 4, 3)
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))

  def test_eval_batches_cycle(self):
    # 35 tokens hold 3 windows of 11: 0-10, 10-20, 20-30.
    batches = data.eval_batches(np.arange(35), 10, 4, 2)
    starts = np.concatenate([b[:, 0] for b in batches])
    np.testing.assert_array_equal(starts, [0, 10, 20, 0, 10, 20, 0, 10])
    self.assertEqual(batches[0].dtype, np.int32)


class LoadDatasetsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.cache_dir = self.create_tempdir().full_path

  def _cfg(self, source, **kw):
    kw.setdefault("holdout_fraction", 0.2)
    return config_lib.DataConfig(source=source, cache_dir=self.cache_dir, **kw)

  def test_split_by_document(self):
    root = self.create_tempdir().full_path
    docs = _write_corpus(root, 30)
    # Files that must be ignored: wrong suffix, hidden directory.
    self.create_tempfile(os.path.join(root, "notes.csv"), content="x,y")
    self.create_tempfile(os.path.join(root, ".git", "a.txt"), content="no")
    ds = data.load_datasets(self._cfg(root), seq_len=8, seed=0)
    self.assertEqual(ds.vocab_size, 259)
    self.assertEqual(ds.train.tokens.dtype, np.uint16)
    keys = sorted(docs)
    want_eval = [k for k in keys if _heldout(k, 0.2)]
    self.assertNotEmpty(want_eval)  # precondition of this corpus
    want_train = [k for k in keys if k not in want_eval]
    got_train = _split_docs(ds.train.tokens)
    got_eval = _split_docs(ds.eval.tokens)
    self.assertEqual(got_train, [docs[k] for k in want_train])
    self.assertEqual(got_eval, [docs[k] for k in want_eval])
    self.assertEmpty(set(got_train) & set(got_eval))  # contents are unique
    self.assertEqual(ds.train.tokens[0], BOS)
    self.assertEqual(ds.eval.tokens[-1], EOS)

  def test_split_is_stable_when_corpus_moves(self):
    a = self.create_tempdir().full_path
    _write_corpus(a, 20)
    b = os.path.join(self.create_tempdir().full_path, "elsewhere")
    shutil.copytree(a, b)
    ds_a = data.load_datasets(self._cfg(a), seq_len=8, seed=0)
    ds_b = data.load_datasets(self._cfg(b), seq_len=8, seed=0)
    self.assertNotEqual(ds_a.train.tokens.filename,
                        ds_b.train.tokens.filename)
    np.testing.assert_array_equal(ds_a.eval.tokens, ds_b.eval.tokens)
    np.testing.assert_array_equal(ds_a.train.tokens, ds_b.train.tokens)

  def test_empty_eval_gets_last_document(self):
    root = self.create_tempdir().full_path
    docs = _write_corpus(root, 6)
    keys = sorted(docs)
    self.assertFalse(any(_heldout(k, 1e-4) for k in keys))  # precondition
    ds = data.load_datasets(self._cfg(root, holdout_fraction=1e-4), 4, 0)
    self.assertEqual(_split_docs(ds.eval.tokens), [docs[keys[-1]]])
    self.assertEqual(_split_docs(ds.train.tokens),
                     [docs[k] for k in keys[:-1]])

  def test_single_text_file_splits_tail(self):
    text = "ünïcode line\n" * 100
    path = self.create_tempfile("book.txt", content=text).full_path
    ds = data.load_datasets(self._cfg(path, holdout_fraction=0.1), 16, 0)
    want = np.concatenate([[BOS], np.frombuffer(text.encode(), np.uint8),
                           [EOS]])
    n_eval = int(np.ceil(0.1 * len(want)))
    np.testing.assert_array_equal(ds.train.tokens, want[:-n_eval])
    np.testing.assert_array_equal(ds.eval.tokens, want[-n_eval:])

  def test_jsonl(self):
    lines = [json.dumps({"body": f"record {i} ✓ " * 3, "id": i})
             for i in range(20)]
    path = self.create_tempfile(
        "c.jsonl", content="\n".join(lines[:10] + [""] + lines[10:]) + "\n"
    ).full_path
    ds = data.load_datasets(self._cfg(path, text_field="body"), 8, 0)
    got = sorted(_split_docs(ds.train.tokens) + _split_docs(ds.eval.tokens))
    want = sorted((f"record {i} ✓ " * 3).encode() for i in range(20))
    self.assertEqual(got, want)
    # Keys are "<file>:<line>"; the blank line 11 shifts later records.
    want_eval = [i for i in range(20)
                 if _heldout(f"c.jsonl:{i + 1 + (i >= 10)}", 0.2)]
    if want_eval:
      self.assertEqual(_split_docs(ds.eval.tokens),
                       [(f"record {i} ✓ " * 3).encode() for i in want_eval])

  def test_jsonl_missing_field_names_file_and_line(self):
    path = self.create_tempfile(
        "bad.jsonl",
        content='{"text": "ok"}\n{"text": "ok"}\n{"content": "no"}\n'
    ).full_path
    with self.assertRaisesRegex(
        config_lib.ConfigError,
        rf"{path}:3: no field 'text' \(data\.text_field\).*content"):
      data.load_datasets(self._cfg(path), 8, 0)
    # A failed build leaves nothing behind in the cache.
    self.assertEmpty(os.listdir(self.cache_dir))

  def test_missing_source_names_field(self):
    with self.assertRaisesRegex(
        config_lib.ConfigError,
        r"data\.source='/no/such/corpus' is invalid: must be 'stdlib' or .*"
        r"\.jsonl.*\.npy"):
      data.load_datasets(self._cfg("/no/such/corpus"), 8, 0)

  def test_npy_token_file(self):
    tokens = (np.arange(1000) * 7 % 259).astype(np.uint16)
    path = os.path.join(self.create_tempdir().full_path, "toks.npy")
    np.save(path, tokens)
    ds = data.load_datasets(self._cfg(path, holdout_fraction=0.01), 8, 0)
    np.testing.assert_array_equal(ds.train.tokens, tokens[:990])
    np.testing.assert_array_equal(ds.eval.tokens, tokens[990:])
    self.assertEqual(ds.train.num_windows, (990 - 1) // 8)
    np.testing.assert_array_equal(ds.train.batch_at(0, 2)[:, 0] % 7, 0)

  @parameterized.named_parameters(
      ("out_of_vocab", np.arange(300), r"span \[0, 299\].*vocab_size is 259"),
      ("two_d", np.zeros((4, 4), np.int32), r"1-D integer array"),
      ("float", np.zeros(10, np.float32), r"1-D integer array"),
  )
  def test_bad_npy(self, array, regex):
    path = os.path.join(self.create_tempdir().full_path, "t.npy")
    np.save(path, array)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"data\.source=.*" + regex):
      data.load_datasets(self._cfg(path), 4, 0)

  def test_cache_is_reused(self):
    root = self.create_tempdir().full_path
    _write_corpus(root, 10)
    ds1 = data.load_datasets(self._cfg(root), 8, 0)
    path = ds1.train.tokens.filename
    self.assertTrue(path.startswith(self.cache_dir))
    st = os.stat(path)
    with mock.patch.object(data, "_build_cache",
                           side_effect=AssertionError("re-tokenized")):
      ds2 = data.load_datasets(self._cfg(root), 8, 0)
    st2 = os.stat(ds2.train.tokens.filename)
    self.assertEqual((st2.st_ino, st2.st_mtime_ns), (st.st_ino, st.st_mtime_ns))
    np.testing.assert_array_equal(ds1.train.batch_at(3, 4),
                                  ds2.train.batch_at(3, 4))

  def test_changed_file_invalidates_cache(self):
    root = self.create_tempdir().full_path
    _write_corpus(root, 10)
    data.load_datasets(self._cfg(root), 8, 0)
    with open(os.path.join(root, "doc_001.txt"), "w") as f:
      f.write("brand new text")
    ds = data.load_datasets(self._cfg(root), 8, 0)
    all_docs = _split_docs(ds.train.tokens) + _split_docs(ds.eval.tokens)
    self.assertIn(b"brand new text", all_docs)

  @parameterized.named_parameters(("no_sidecar", True),
                                  ("truncated_with_sidecar", False))
  def test_leftover_temp_and_incomplete_cache_are_not_trusted(
      self, remove_sidecar):
    root = self.create_tempdir().full_path
    _write_corpus(root, 10)
    ds1 = data.load_datasets(self._cfg(root), 8, 0)
    want_train = np.array(ds1.train.tokens)
    base = ds1.train.tokens.filename[:-len(".train.bin")]
    name = os.path.basename(base)
    del ds1
    # Simulate a process killed mid-write: a half-written temp file, a
    # truncated token file and no sidecar.
    junk = os.path.join(self.cache_dir, f".{name}.train.x1y2z3.tmp")
    with open(junk, "wb") as f:
      f.write(b"\x01\x02\x03")
    if remove_sidecar:
      os.remove(base + ".json")
    with open(base + ".train.bin", "r+b") as f:
      f.truncate(10)
    ds2 = data.load_datasets(self._cfg(root), 8, 0)
    np.testing.assert_array_equal(ds2.train.tokens, want_train)
    self.assertTrue(os.path.exists(base + ".json"))

  def test_crash_during_build_leaves_no_cache_files(self):
    root = self.create_tempdir().full_path
    _write_corpus(root, 200)  # several encode chunks
    real = data.ByteTokenizer.encode_batch
    calls = []

    def flaky(tok, docs):
      calls.append(len(docs))
      if len(calls) == 2:
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-build
      return real(tok, docs)

    with mock.patch.object(data.ByteTokenizer, "encode_batch", flaky):
      with self.assertRaises(KeyboardInterrupt):
        data.load_datasets(self._cfg(root), 8, 0)
    self.assertEmpty(os.listdir(self.cache_dir))
    ds = data.load_datasets(self._cfg(root), 8, 0)
    self.assertLen(_split_docs(ds.train.tokens) + _split_docs(ds.eval.tokens),
                   200)


class StdlibCorpusTest(absltest.TestCase):
  """The built-in default corpus, built once into a temporary cache."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cache_dir = tempfile.mkdtemp(prefix="nosa_data_test_")
    cfg = config_lib.DataConfig(source="stdlib", cache_dir=cls.cache_dir)
    cls.ds = data.load_datasets(cfg, seq_len=256, seed=0)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    cls.files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(
            p.relative_to(root).parts))
    cls.root = root

  @classmethod
  def tearDownClass(cls):
    del cls.ds  # release the memmaps before deleting their files
    shutil.rmtree(cls.cache_dir)
    super().tearDownClass()

  def test_document_count(self):
    self.assertGreater(len(self.files), 1000)
    train, ev = self.ds.train.tokens, self.ds.eval.tokens
    n_bos = int(np.sum(train == BOS) + np.sum(ev == BOS))
    n_eos = int(np.sum(train == EOS) + np.sum(ev == EOS))
    self.assertEqual((n_bos, n_eos), (len(self.files), len(self.files)))
    n_eval = sum(_heldout(f, 0.01) for f in self.files)
    self.assertEqual(int(np.sum(ev == BOS)), n_eval)

  def test_tokens_in_vocab_and_framed(self):
    for split in (self.ds.train.tokens, self.ds.eval.tokens):
      self.assertLess(int(split.max()), 259)
      self.assertEqual((split[0], split[-1]), (BOS, EOS))
      self.assertFalse(np.any(split == PAD))
    self.assertGreater(self.ds.train.num_tokens, 10_000_000)

  def test_first_document_is_first_sorted_file(self):
    first = next(f for f in self.files if not _heldout(f, 0.01))
    want = (self.root / first).read_bytes()
    got = self.ds.train.tokens[1:1 + len(want) + 1]
    np.testing.assert_array_equal(got[:-1], np.frombuffer(want, np.uint8))
    self.assertEqual(got[-1], EOS)

  def test_batches(self):
    b = self.ds.train.batch_at(12345, 4)
    self.assertEqual((b.shape, b.dtype), ((4, 257), np.int32))
    ev = data.eval_batches(self.ds.eval, 256, 2, 2)
    np.testing.assert_array_equal(ev[0][0], self.ds.eval.tokens[:257])


if __name__ == "__main__":
  absltest.main()
