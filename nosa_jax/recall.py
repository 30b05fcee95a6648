"""Synthetic associative-recall documents: a training mix and held-out sets.

Two task shapes, both built from one record, `RECORD = " <{key}:{value}>"`
(a 4-letter key, a 4-digit value):

* multi-key needle-in-a-haystack (RULER's multi-key NIAH: several needles,
  distractors among them, in real text; the query names one key), and
* multi-query associative recall (Zoology's MQAR: many key-value pairs,
  several of them queried),

differing only in how many records a document holds and how many are asked
back. A query is the record's own text again: seeing " <kqzw:" a second
time, the model must produce the value that followed the first time. In
training the queried records sit together at the end of the window and the
records anywhere before them, so the distance from a record to its query
spreads over the whole context; the haystack is the corpus window (so the
model keeps modelling real text around the records) or the passkey's
filler sentences, with probability 1/2 each. Records overwrite the
haystack where they land. `training_window` may cut a window into several
such documents of random lengths (`DataConfig.recall_segment_tokens`), as
the passkey mix does: then distances run from a few tokens to the whole
window, and a window asks back several times as many values.

Held-out evaluation (`distance_examples`) builds one document per
(distance bucket, trial) from another RNG stream, with keys drawn only from
a held-out eighth of the key space (`is_heldout_key`) that training never
uses, in held-out corpus text: a target record at a set distance from the
final query, plus distractor records at random places. The buckets
(`BUCKETS`): inside the forced sink + window blocks, beyond them at 1/4, 1/2
and 1 x the training context, and at 2 x the training context (a document
twice as long as any seen in training: length generalisation).

Pieces are tokenized separately and concatenated, as in `nosa_jax.passkey`,
so any tokenizer works; the answer is the value's own tokens.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Collection, Protocol
import zlib

import numpy as np

from nosa_jax import passkey

RECORD = " <{key}:{value}>"
KEY_LETTERS = 4
VALUE_DIGITS = 4
# A key is held out (evaluation only) iff crc32(key) % _HELDOUT_MOD == 0.
_HELDOUT_MOD = 8
# Per training document: NIAH holds 1..4 records, 1..all of them queried;
# MQAR holds 8..64 records (fewer where the window is short), 4..16 queried.
NIAH_RECORDS = (1, 4)
MQAR_RECORDS = (8, 64)
MQAR_QUERIES = (4, 16)
# Records (and queries) take at most this share of a training window.
_MAX_RECORD_SHARE = 0.25
# With segments (`training_window`), the share of windows that stay one
# document: they hold most of the long record-to-query distances.
_ONE_DOCUMENT_SHARE = 0.5

# (name, distance in training contexts); "window" = inside the forced
# blocks, the last bucket's documents are twice the training context long.
BUCKETS = (("window", None), ("ctx_1/4", 0.25), ("ctx_1/2", 0.5),
           ("ctx_1", 1.0), ("ctx_2x", 2.0))
BEYOND_WINDOW = ("ctx_1/4", "ctx_1/2", "ctx_1")


class _Tokenizer(Protocol):
  bos_id: int

  def encode(self, text: str) -> np.ndarray:
    ...


def is_heldout_key(key: str) -> bool:
  """Whether `key` belongs to the evaluation-only eighth of the key space."""
  return zlib.crc32(key.encode("ascii")) % _HELDOUT_MOD == 0


def random_keys(rng: np.random.Generator, count: int, *, heldout: bool,
                avoid: Collection[str] = ()) -> list[str]:
  """`count` distinct keys, all held out (evaluation) or none (training),
  none of them in `avoid`."""
  keys: list[str] = []
  while len(keys) < count:
    letters = rng.integers(0, 26, size=KEY_LETTERS)
    key = "".join(string.ascii_lowercase[i] for i in letters)
    if (is_heldout_key(key) == heldout and key not in keys
        and key not in avoid):
      keys.append(key)
  return keys


def random_value(rng: np.random.Generator) -> str:
  return "".join(str(int(d)) for d in rng.integers(0, 10, VALUE_DIGITS))


@dataclasses.dataclass(frozen=True)
class RecallDocument:
  """One training document and where its records and queries are.

  Attributes:
    tokens: int32 [L].
    records: (start, end, key) of each record, in document order.
    queries: (start, end, key) of each query (a repeated record).
  """

  tokens: np.ndarray
  records: tuple[tuple[int, int, str], ...]
  queries: tuple[tuple[int, int, str], ...]


class RecallBuilder:
  """Tokenizes records and filler; builds training and held-out documents."""

  def __init__(self, tokenizer: _Tokenizer):
    self._tok = tokenizer
    self.bos_id = int(tokenizer.bos_id)
    self._filler_cycle = passkey.PasskeyBuilder(tokenizer).filler_cycle
    # Longest record any key / value can make (a tokenizer may split every
    # character): the unit of the placement arithmetic.
    self.record_len = len(self.record("zzzz", "9999")) + KEY_LETTERS + 2

  def _enc(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text), np.int32)

  def record_parts(self, key: str, value: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix " <key:", value, ">") tokens of one record."""
    prefix, _, _ = RECORD.partition("{value}")
    return (self._enc(prefix.format(key=key)), self._enc(value),
            self._enc(">"))

  def record(self, key: str, value: str) -> np.ndarray:
    return np.concatenate(self.record_parts(key, value))

  def filler(self, n: int) -> np.ndarray:
    reps = -(-n // len(self._filler_cycle))
    return np.tile(self._filler_cycle, reps)[:n]

  def min_document_length(self) -> int:
    """The shortest training window: one record and its query, 4x over."""
    return int(2 * self.record_len / _MAX_RECORD_SHARE) + 1

  def training_document(self, length: int, rng: np.random.Generator,
                        corpus_window: np.ndarray | None = None, *,
                        mqar_share: float = 0.5,
                        avoid: Collection[str] = ()) -> RecallDocument:
    """A random training document of exactly `length` tokens.

    Args:
      length: L (seq_len + 1 for a training row).
      rng: all randomness (task shape, keys, values, places, haystack).
      corpus_window: >= L haystack tokens (e.g. the row it replaces); None
        for the filler sentences only.
      mqar_share: probability of the MQAR shape (else multi-key NIAH).
      avoid: keys not to use (those of the window's other documents).

    Raises:
      ValueError: `length` below `min_document_length()`.
    """
    if length < self.min_document_length():
      raise ValueError(f"length={length} is too short for a recall "
                       f"document (>= {self.min_document_length()})")
    most = max(1, int(_MAX_RECORD_SHARE * length / self.record_len) // 2)
    if rng.random() < mqar_share:
      n = int(rng.integers(min(MQAR_RECORDS[0], most),
                           min(MQAR_RECORDS[1], most) + 1))
      q = int(rng.integers(min(MQAR_QUERIES[0], n),
                           min(MQAR_QUERIES[1], n) + 1))
    else:
      n = int(rng.integers(NIAH_RECORDS[0], min(NIAH_RECORDS[1], most) + 1))
      q = int(rng.integers(1, n + 1))
    use_corpus = corpus_window is not None and rng.random() < 0.5
    tokens = (np.array(corpus_window[:length], np.int32) if use_corpus
              else self.filler(length))
    tokens[0] = self.bos_id
    keys = random_keys(rng, n, heldout=False, avoid=avoid)
    recs = [self.record(k, random_value(rng)) for k in keys]
    asked = rng.permutation(n)[:q]
    tail = np.concatenate([recs[i] for i in asked])
    tail_start = length - len(tail)
    tokens[tail_start:] = tail
    # Non-overlapping places in [1, tail_start): sorted uniform offsets in
    # the free space, each shifted past the records before it.
    lens = np.array([len(r) for r in recs])
    order = rng.permutation(n)
    free = tail_start - 1 - int(lens.sum())
    offsets = np.sort(rng.integers(0, free + 1, size=n))
    starts = np.empty(n, np.int64)
    used = 0
    for slot, i in enumerate(order):
      starts[i] = 1 + offsets[slot] + used
      used += lens[i]
    for i in range(n):
      tokens[starts[i]:starts[i] + lens[i]] = recs[i]
    records = tuple(sorted((int(starts[i]), int(starts[i] + lens[i]), keys[i])
                           for i in range(n)))
    queries, pos = [], tail_start
    for i in asked:
      queries.append((pos, pos + int(lens[i]), keys[i]))
      pos += int(lens[i])
    return RecallDocument(tokens=tokens, records=records,
                          queries=tuple(queries))

  def training_window(self, length: int, rng: np.random.Generator,
                      corpus_window: np.ndarray | None = None, *,
                      mqar_share: float = 0.5,
                      segment_tokens: int = 0) -> RecallDocument:
    """A training window of `length` tokens: one or more documents.

    With `segment_tokens`, half of the windows are still one document and
    the other half hold a uniform count of 2 to length // segment_tokens
    `training_document`s of random lengths (each with its own BOS, records
    and queries; keys distinct across the window), as
    `passkey.PasskeyBuilder.training_document` does. Why: one document per
    8k window asks back about 6 values, at distances spread uniformly over
    the window (4% under 320 tokens), and a dense model trained on 98M
    tokens of that never formed the lookup (issue 24, NOTES.md). Short
    documents give many retrievals at short range, where the lookup forms
    first; the one-document half keeps the long distances.

    Args:
      length: L (seq_len + 1 for a training row).
      rng: all randomness.
      corpus_window: >= L haystack tokens, or None (see
        `training_document`).
      mqar_share: see `training_document`.
      segment_tokens: 0 = one document (exactly `training_document`).

    Returns:
      The window; records and queries are offsets into it.
    """
    if not segment_tokens:
      return self.training_document(length, rng, corpus_window,
                                    mqar_share=mqar_share)
    min_len = self.min_document_length()
    most = max(1, min(length // segment_tokens, length // min_len))
    count = (1 if most == 1 or rng.random() < _ONE_DOCUMENT_SHARE
             else int(rng.integers(2, most + 1)))
    if count == 1:
      return self.training_document(length, rng, corpus_window,
                                    mqar_share=mqar_share)
    parts, records, queries, used, start = [], [], [], set(), 0
    for n in passkey.segment_lengths(length, count, min_len, rng):
      n = int(n)
      doc = self.training_document(
          n, rng, None if corpus_window is None
          else corpus_window[start:start + n], mqar_share=mqar_share,
          avoid=used)
      parts.append(doc.tokens)
      records += [(s + start, e + start, k) for s, e, k in doc.records]
      queries += [(s + start, e + start, k) for s, e, k in doc.queries]
      used.update(k for _, _, k in doc.records)
      start += n
    return RecallDocument(tokens=np.concatenate(parts), records=tuple(records),
                          queries=tuple(queries))

  def eval_example(self, length: int, place: Callable[[int, int, int], int],
                   rng: np.random.Generator, haystack: np.ndarray, *,
                   distractors: int) -> passkey.PasskeyExample:
    """A held-out document ending in a query whose answer is its last tokens.

    Args:
      length: L, answer included.
      place: (query_start, target record length, answer_start) -> where
        the target record starts.
      rng: keys, values and the distractors' places.
      haystack: >= L held-out corpus tokens.
      distractors: further records (other held-out keys) at random places.

    Returns:
      A `passkey.PasskeyExample` (`evaluation.score_passkey` scores it):
      needle_start / needle_end = the target record, key = its key, depth
      = its distance to the answer as a fraction of L.

    Raises:
      ValueError: a short haystack, or a place that does not fit.
    """
    keys = random_keys(rng, distractors + 1, heldout=True)
    prefix, val, close = self.record_parts(keys[0], random_value(rng))
    target = np.concatenate([prefix, val, close])
    tokens = np.array(haystack[:length], np.int32)
    if len(tokens) < length:
      raise ValueError(f"haystack has {len(tokens)} tokens, {length} needed")
    tokens[0] = self.bos_id
    answer_start = length - len(val)
    query_start = answer_start - len(prefix)
    start = place(query_start, len(target), answer_start)
    end = start + len(target)
    if start < 1 or end > query_start:
      raise ValueError(f"a record at {start} does not fit a {length}-token "
                       "document")
    tokens[start:end] = target
    tokens[query_start:] = np.concatenate([prefix, val])
    busy = [(start, end), (query_start, length)]
    for key in keys[1:]:
      rec = self.record(key, random_value(rng))
      for _ in range(100):  # rejection: the free space is most of it
        s = int(rng.integers(1, query_start - len(rec) + 1))
        if all(s + len(rec) <= a or s >= b for a, b in busy):
          tokens[s:s + len(rec)] = rec
          busy.append((s, s + len(rec)))
          break
    return passkey.PasskeyExample(
        tokens=tokens, answer_start=answer_start, needle_start=start,
        needle_end=end, key=keys[0],
        depth=float((answer_start - start) / length))


def bucket_place(bucket: str, *, context: int, length: int, block_size: int,
                 sink_blocks: int, window_blocks: int,
                 rng: np.random.Generator
                 ) -> Callable[[int, int, int], int]:
  """Where a bucket puts its target record (a `place` of `eval_example`).

  "window": uniformly inside the blocks the first answer query always
  attends (its own and the `window_blocks` before it); "ctx_<f>": f x
  `context` tokens before the end of the document, but never inside the
  sink blocks.
  """
  if bucket == "window":
    def place(query_start: int, n: int, answer_start: int) -> int:
      # The blocks the first answer query (answer_start - 1) always attends.
      own = (answer_start - 1) // block_size
      first = max(own - window_blocks, 0) * block_size
      lo, hi = max(first, 1), query_start - n
      if hi < lo:
        raise ValueError(f"window_blocks={window_blocks} x block_size="
                         f"{block_size} leave no room for a record before "
                         "the query")
      return int(rng.integers(lo, hi + 1))
    return place
  frac = dict(BUCKETS)[bucket]
  start = max(length - int(round(frac * context)), sink_blocks * block_size, 1)
  return lambda query_start, n, answer_start: start


def distance_examples(tokenizer: _Tokenizer, haystack: np.ndarray, *,
                      context: int, trials: int, distractors: int, seed: int,
                      block_size: int, sink_blocks: int, window_blocks: int
                      ) -> list[tuple[str, passkey.PasskeyExample]]:
  """`trials` held-out documents per bucket of `BUCKETS`.

  Args:
    tokenizer: builds the documents.
    haystack: held-out corpus tokens (the eval split); each document takes
      a slice at a random offset (tiled if the split is short).
    context: the training context (seq_len): documents are `context`
      tokens long, 2 x `context` for "ctx_2x".
    trials, distractors, seed: documents per bucket, distractor records in
      each, and the RNG seed (its stream is one training never draws from).
    block_size, sink_blocks, window_blocks: the selection geometry that
      decides the buckets' edges (the same for every variant).

  Returns:
    (bucket, example) pairs, bucket-major, trial-minor.
  """
  builder = RecallBuilder(tokenizer)
  haystack = np.asarray(haystack)
  if len(haystack) < 2 * context:
    haystack = np.tile(haystack, -(-2 * context // max(len(haystack), 1)))
  out = []
  for b, (bucket, frac) in enumerate(BUCKETS):
    length = 2 * context if frac == 2.0 else context
    for t in range(trials):
      # 24 tags the evaluation stream; training rows draw from
      # (train seed, position, 2).
      rng = np.random.default_rng([seed, 24, b, t])
      off = int(rng.integers(0, len(haystack) - length + 1))
      place = bucket_place(bucket, context=context, length=length,
                           block_size=block_size, sink_blocks=sink_blocks,
                           window_blocks=window_blocks, rng=rng)
      out.append((bucket, builder.eval_example(
          length, place, rng, haystack[off:off + length],
          distractors=distractors)))
  return out
