"""Synthetic passkey (needle-in-a-haystack) documents, built offline.

One document, for the evaluation (`evaluation.passkey_accuracy`) and for the
optional training mix (`DataConfig.passkey_fraction`, `data.load_datasets`):

  [BOS] INTRO filler[:a] NEEDLE(key) filler[a:] QUESTION ANSWER(key)

with INTRO = "A pass key is hidden in the text below. Remember it.",
NEEDLE = " The pass key is 12345. Remember it. 12345 is the pass key.",
QUESTION = " What is the pass key? The pass key is", ANSWER = " 12345". The
filler is the classic passkey haystack (five sentences about grass, sky and
sun, cycled) or, for training documents, any given token run (e.g. a corpus
window). `a` is `depth` times the filler length (snapped to a sentence end
for the synthetic filler), so depth 0 puts the key right after the intro
and depth 1 right before the question.

Pieces are tokenized separately and concatenated, which works with the byte
tokenizer and with any `tokenizer.json` (only `encode` and `bos_id` are
used); the answer's token ids are its own tokenization of " 12345".
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

INTRO = "A pass key is hidden in the text below. Remember it."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
FILLER_SENTENCES = (" The grass is green.", " The sky is blue.",
                    " The sun is yellow.", " Here we go.",
                    " There and back again.")


# A training window of L tokens holds up to max(1, L // SEGMENT_TOKENS)
# passkey documents (`PasskeyBuilder.training_document`).
SEGMENT_TOKENS = 2048


class _Tokenizer(Protocol):
  bos_id: int

  def encode(self, text: str) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  """One passkey document: prompt tokens followed by the answer tokens.

  Attributes:
    tokens: int32 [L], L = the requested length.
    answer_start: tokens[answer_start:] is the answer; the prompt (what a
      model sees before answering) is tokens[:answer_start].
    needle_start: index of the needle's first token.
    needle_end: index one past the needle's last token.
    key: the pass key digits.
    depth: the requested depth in [0, 1].
  """

  tokens: np.ndarray
  answer_start: int
  needle_start: int
  needle_end: int
  key: str
  depth: float

  @property
  def length(self) -> int:
    return len(self.tokens)

  @property
  def answer(self) -> np.ndarray:
    return self.tokens[self.answer_start:]

  @property
  def prompt(self) -> np.ndarray:
    return self.tokens[:self.answer_start]


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
  """A `digits`-digit decimal key without a leading zero."""
  first = int(rng.integers(1, 10))
  rest = rng.integers(0, 10, size=digits - 1)
  return str(first) + "".join(str(int(d)) for d in rest)


class PasskeyBuilder:
  """Tokenizes the fixed pieces once; builds documents of exact lengths."""

  def __init__(self, tokenizer: _Tokenizer):
    self._tok = tokenizer
    enc = lambda s: np.asarray(tokenizer.encode(s), np.int32)
    self.bos_id = int(tokenizer.bos_id)
    self.intro = enc(INTRO)
    self.question = enc(QUESTION)
    sentences = [enc(s) for s in FILLER_SENTENCES]
    self.filler_cycle = np.concatenate(sentences)
    # Token offsets inside one cycle where a sentence ends (insert points).
    self._cycle_ends = np.cumsum([len(s) for s in sentences])

  def fixed_length(self, key: str) -> int:
    """Tokens of a document with this key and no filler."""
    return (1 + len(self.intro) + len(self._tok.encode(NEEDLE.format(key=key)))
            + len(self.question) + len(self._tok.encode(ANSWER.format(
                key=key))))

  def min_document_length(self, digits: int = 5) -> int:
    """A length that fits any key's fixed text (3 mentions of its digits,
    with slack for a tokenizer that splits every digit)."""
    return self.fixed_length("9" * digits) + 3 * digits

  def _synthetic_filler(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n filler tokens and the sentence ends inside them (0 and n included).

    The last n tokens of whole cycles: the filler ends with a full sentence
    (right before the question); a partial one, if any, follows the intro.
    """
    cycle = len(self.filler_cycle)
    reps = -(-n // cycle)
    offset = reps * cycle - n
    ends = (np.arange(reps)[:, None] * cycle + self._cycle_ends).ravel()
    ends = ends[ends > offset] - offset
    return (np.tile(self.filler_cycle, reps)[offset:],
            np.concatenate([[0], ends]))

  def example(self, length: int, depth: float, key: str,
              filler: np.ndarray | None = None) -> PasskeyExample:
    """A document of exactly `length` tokens with `key` at `depth`.

    Args:
      length: total tokens, answer included.
      depth: where the needle goes, as a fraction of the filler in [0, 1].
      key: the pass key (digits).
      filler: haystack tokens (at least length - fixed_length(key)); None
        for the synthetic sentences.

    Raises:
      ValueError: `length` below the fixed text or `depth` outside [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"depth={depth} must be in [0, 1]")
    needle = np.asarray(self._tok.encode(NEEDLE.format(key=key)), np.int32)
    answer = np.asarray(self._tok.encode(ANSWER.format(key=key)), np.int32)
    fixed = (1 + len(self.intro) + len(needle) + len(self.question)
             + len(answer))
    n_fill = length - fixed
    if n_fill < 0:
      raise ValueError(f"length={length} is too short: the passkey text "
                       f"alone is {fixed} tokens")
    if filler is None:
      fill, ends = self._synthetic_filler(n_fill)
      cut = int(ends[np.argmin(np.abs(ends - depth * n_fill))])
    else:
      fill = np.asarray(filler, np.int32)[:n_fill]
      if len(fill) < n_fill:
        raise ValueError(f"filler has {len(fill)} tokens, {n_fill} needed")
      cut = int(round(depth * n_fill))
    head = np.concatenate([[self.bos_id], self.intro, fill[:cut]])
    tokens = np.concatenate([head, needle, fill[cut:], self.question, answer])
    return PasskeyExample(
        tokens=tokens.astype(np.int32), answer_start=length - len(answer),
        needle_start=len(head), needle_end=len(head) + len(needle), key=key,
        depth=float(depth))

  def training_document(self, length: int, rng: np.random.Generator,
                        corpus_window: np.ndarray | None = None,
                        digits: int = 5) -> np.ndarray:
    """A random training window of `length` tokens of passkey documents.

    The window holds 1 to max(1, length // SEGMENT_TOKENS) documents (a
    uniform count, random lengths), each with a uniform depth and a random
    key: several documents give more retrieval events per window, at short
    and long distances (short ones help the copying circuit form, long ones
    teach long-range retrieval). Each document uses, by `rng`, the matching
    slice of `corpus_window` as its haystack (so the model keeps modelling
    real text around the needle) or the synthetic sentences of the
    evaluation, with probability 1/2 each.

    Raises:
      ValueError: `length` shorter than one document's fixed text.
    """
    min_len = self.min_document_length(digits)
    count = int(rng.integers(1, max(1, length // SEGMENT_TOKENS) + 1))
    count = max(1, min(count, length // min_len))
    docs, start = [], 0
    for n in segment_lengths(length, count, min_len, rng):
      use_corpus = corpus_window is not None and rng.random() < 0.5
      filler = corpus_window[start:start + n] if use_corpus else None
      docs.append(self.example(int(n), float(rng.random()),
                               random_key(rng, digits), filler).tokens)
      start += n
    return np.concatenate(docs)


def segment_lengths(length: int, count: int, min_len: int,
                    rng: np.random.Generator) -> np.ndarray:
  """`count` document lengths summing to `length`: `min_len` each plus a
  random (Dirichlet) share of the rest. Training windows of several
  documents (passkey and recall mixes) cut themselves with it."""
  rest = length - count * min_len
  lengths = min_len + np.floor(rng.dirichlet(np.ones(count)) * max(rest, 0)
                               ).astype(int)
  lengths[-1] = length - lengths[:-1].sum()
  return lengths


def make_examples(tokenizer: _Tokenizer, lengths: Sequence[int],
                  depths: Sequence[float], trials: int, seed: int = 0,
                  digits: int = 5) -> list[PasskeyExample]:
  """`trials` examples for every (length, depth), keys from `seed`.

  Returns:
    Examples ordered by length, then depth, then trial.
  """
  builder = PasskeyBuilder(tokenizer)
  rng = np.random.default_rng(seed)
  return [builder.example(length, depth, random_key(rng, digits))
          for length in lengths for depth in depths for _ in range(trials)]
