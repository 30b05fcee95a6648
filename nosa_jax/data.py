"""Tokenizers, cached token corpora and deterministic training batches.

The pipeline is deliberately small and host-only (numpy, no jax):

1. A corpus (`DataConfig.source`) is a sequence of documents: the running
   interpreter's standard-library sources (`stdlib`, the built-in default,
   ~1,700-2,200 files / ~32 MB), a text file, a `.jsonl` file, a directory of
   such files, or a pre-tokenized `.npy` token file.
2. Each document becomes `[BOS] + tokens + [EOS]`; documents go to the train
   or eval split by a CRC of their key (relative path, or `path:line` for
   jsonl), so the split is stable across runs and machines.
3. The two concatenated streams are written once, atomically, as flat token
   files under `DataConfig.cache_dir` and opened with `np.memmap`.
4. `TokenStream.batch_at(position, batch_size)` is a pure function of
   (tokens, seq_len, seed, position). The trainer checkpoints `position` (the
   number of windows consumed), so a resumed run sees the same batches.

Windows are `seq_len + 1` tokens starting at multiples of `seq_len`: inputs
are `window[:-1]`, targets `window[1:]`, and consecutive windows share one
token so that every token is a target exactly once per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
from typing import Any, Iterable, Iterator, Protocol, Sequence
import zlib

from absl import logging
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import passkey
from nosa_jax import recall

# Bump when the cache layout or tokenization rules change, so old cache files
# are never trusted by new code.
_CACHE_FORMAT = 1
_SPLITS = ("train", "eval")
# File kinds read from a directory source; everything else is skipped.
_DIR_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
# Documents per tokenizer call: large enough for the HF tokenizer's parallel
# `encode_batch` to pay off, small enough to keep memory bounded.
_ENCODE_CHUNK = 64
# `is_heldout` compares a CRC-32 modulo this many buckets with the fraction.
_HOLDOUT_BUCKETS = 10_000


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


class Tokenizer(Protocol):
  """What the data pipeline, trainer and sampler need from a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  @property
  def fingerprint(self) -> str:
    """A string that changes whenever the token ids would change."""

  def encode(self, text: str) -> np.ndarray:
    ...

  def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus BOS=256, EOS=257, PAD=258."""

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  @property
  def fingerprint(self) -> str:
    return "bytes-v1"

  def encode(self, text: str) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as an int32 array."""
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Returns raw bytes as tokens; no decode/encode round trip."""
    # np.frombuffer is a zero-copy view; astype makes the only copy. This is
    # what keeps the 32 MB stdlib corpus at well under a second.
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
    """Encodes documents given as text or as raw (UTF-8) bytes."""
    return [self.encode_bytes(d) if isinstance(d, bytes) else self.encode(d)
            for d in docs]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes byte ids, dropping BOS/EOS/PAD; bad UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


# Special-token spellings of common tokenizer families, most specific first.
# GPT-2 style vocabularies have only <|endoftext|>, which then serves as both
# BOS and EOS.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>",
              "[BOS]", "<|im_start|>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]",
              "<|im_end|>", "<|eot_id|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer:
  """A local HuggingFace `tokenizer.json`, through the `tokenizers` package.

  BOS/EOS/PAD are looked up among the tokenizer's own tokens by their usual
  spellings. A missing BOS reuses EOS and vice versa (GPT-2 style); if there
  is neither, two ids are appended after the vocabulary, as `ByteTokenizer`
  does. A missing PAD reuses EOS: padding never reaches the loss.
  """

  def __init__(self, path: str):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise config_lib.ConfigError(
          f"data.tokenizer={path} needs the 'tokenizers' package: "
          "pip install tokenizers") from None
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The Rust exception types are not exported.
      raise config_lib.ConfigError(
          f"data.tokenizer={path!r} is invalid: not a readable "
          f"tokenizer.json ({e})") from None
    with open(path, "rb") as f:
      self._sha = hashlib.sha256(f.read()).hexdigest()
    base = self._tok.get_vocab_size(with_added_tokens=True)
    bos, eos = self._find(_BOS_NAMES), self._find(_EOS_NAMES)
    if bos is None and eos is None:
      bos, eos = base, base + 1
      base += 2
    self.bos_id = eos if bos is None else bos
    self.eos_id = bos if eos is None else eos
    pad = self._find(_PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = base
    self._base_vocab = self._tok.get_vocab_size(with_added_tokens=True)
    self._special = np.array(sorted({self.bos_id, self.eos_id, self.pad_id}))

  def _find(self, names: Sequence[str]) -> int | None:
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  @property
  def fingerprint(self) -> str:
    return (f"hf-{self._sha}-{self.bos_id}-{self.eos_id}-{self.pad_id}-"
            f"{self.vocab_size}")

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` without added special tokens, as int32."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                      dtype=np.int32)

  def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
    """Encodes many documents in one (multi-threaded) tokenizer call."""
    texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes)
             else d for d in docs]
    encs = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids, dropping BOS/EOS/PAD and ids outside the vocabulary."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = ((ids >= 0) & (ids < self._base_vocab)
            & ~np.isin(ids, self._special))
    return self._tok.decode(ids[keep].tolist(), skip_special_tokens=True)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
  """Returns the tokenizer named by `DataConfig.tokenizer`.

  Args:
    spec: `bytes`, a path to a `tokenizer.json`, or a directory holding one.

  Returns:
    A `ByteTokenizer` or an `HFTokenizer`.

  Raises:
    ConfigError: the path does not exist or `tokenizers` is not installed.
  """
  if spec == "bytes":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise config_lib.ConfigError(
        f"data.tokenizer={spec!r} is invalid: must be 'bytes' or a path to a "
        "tokenizer.json (or a directory holding one); no such file")
  return HFTokenizer(path)


# ----------------------------------------------------------------------------
# Token streams and batches
# ----------------------------------------------------------------------------


class TokenStream:
  """Deterministic, resumable batches of windows over one 1-D token array.

  Window w is `tokens[w * seq_len : w * seq_len + seq_len + 1]`. Epoch e
  visits all `num_windows` windows in the order
  `np.random.default_rng([seed, e]).permutation(num_windows)`, and the
  stream is the concatenation of epochs 0, 1, 2, ... A position is an index
  into that endless stream, i.e. the number of windows consumed so far.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, *,
               name: str = "token stream"):
    """Wraps `tokens` (e.g. a read-only np.memmap; never copied).

    Args:
      tokens: 1-D integer token array.
      seq_len: T; windows hold T + 1 tokens.
      seed: non-negative data-order seed.
      name: used in error messages ("train split", ...).

    Raises:
      ValueError: bad arguments, or fewer than `seq_len + 1` tokens.
    """
    if tokens.ndim != 1:
      raise ValueError(f"{name}: tokens must be 1-D, got shape {tokens.shape}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or (
        seq_len < 1):
      raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise ValueError(f"seed={seed!r} must be a non-negative integer")
    self.tokens = tokens
    self.seq_len = seq_len
    self.seed = seed
    self.name = name
    self.num_windows = (len(tokens) - 1) // seq_len
    if self.num_windows < 1:
      raise ValueError(
          f"{name} has {len(tokens)} tokens, fewer than one window of "
          f"seq_len + 1 = {seq_len + 1}; lower seq_len or use a larger "
          "corpus")
    # The last two epochs' permutations: a batch crosses at most one epoch
    # boundary unless batch_size > num_windows.
    self._perms: dict[int, np.ndarray] = {}

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def permutation(self, epoch: int) -> np.ndarray:
    """The window order of `epoch`: a permutation of range(num_windows)."""
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_windows)
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = perm
    return perm

  def window_indices(self, position: int, count: int) -> np.ndarray:
    """Window ids at stream positions position .. position + count - 1."""
    if position < 0 or count < 0:
      raise ValueError(
          f"position={position} and count={count} must be non-negative")
    pos = position + np.arange(count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, self.num_windows)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.permutation(int(e))[offsets[sel]]
    return out

  def batch_at(self, position: int, batch_size: int) -> np.ndarray:
    """The batch that starts at stream `position`.

    Args:
      position: windows consumed so far (saved in checkpoints).
      batch_size: B.

    Returns:
      int32 [B, T + 1]; row i is the window at position + i. Inputs are
      `[:, :-1]`, targets `[:, 1:]`.
    """
    windows = self.window_indices(position, batch_size)
    return _gather_windows(self.tokens, windows, self.seq_len)


class SyntheticMixStream(TokenStream):
  """A train stream in which fractions of windows are synthetic documents.

  Row i of `batch_at(position, ...)` is, by one uniform draw u of an RNG
  seeded with (seed, stream position, 1): with u < `passkey_fraction`,
  `passkey.PasskeyBuilder.training_document` (one or more passkey
  documents with random keys and depths; about half of them keep the
  corpus window as the haystack); else with u < `passkey_fraction +
  recall_fraction`, `recall.RecallBuilder.training_window` (one document,
  or several with `recall_segment_tokens`) drawn from an RNG seeded with
  (seed, position, 2); else the corpus window. Batches
  stay a pure function of the position, so resumed runs see the same data,
  and the passkey rows are what they were before the recall mix existed.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, *,
               name: str = "token stream", tokenizer: Tokenizer,
               passkey_fraction: float = 0.0, recall_fraction: float = 0.0,
               recall_mqar_share: float = 0.5,
               recall_segment_tokens: int = 0):
    super().__init__(tokens, seq_len, seed, name=name)
    self.passkey_fraction = passkey_fraction
    self.recall_fraction = recall_fraction
    self.recall_mqar_share = recall_mqar_share
    self.recall_segment_tokens = recall_segment_tokens
    self._passkey = passkey.PasskeyBuilder(tokenizer)
    self._recall = recall.RecallBuilder(tokenizer)
    for field, fraction, need in (
        ("passkey_fraction", passkey_fraction,
         self._passkey.min_document_length()),
        ("recall_fraction", recall_fraction,
         self._recall.min_document_length())):
      if fraction > 0 and need > seq_len + 1:
        raise config_lib.ConfigError(
            f"data.{field}={fraction} is invalid with train.seq_len="
            f"{seq_len}: its documents need seq_len + 1 >= {need}")

  def batch_at(self, position: int, batch_size: int) -> np.ndarray:
    batch = super().batch_at(position, batch_size)
    for i in range(batch_size):
      rng = np.random.default_rng([self.seed, position + i, 1])
      u = rng.random()
      if u < self.passkey_fraction:
        batch[i] = self._passkey.training_document(self.seq_len + 1, rng,
                                                   batch[i])
      elif u < self.passkey_fraction + self.recall_fraction:
        batch[i] = self._recall.training_window(
            self.seq_len + 1, np.random.default_rng(
                [self.seed, position + i, 2]), batch[i],
            mqar_share=self.recall_mqar_share,
            segment_tokens=self.recall_segment_tokens).tokens
    return batch


def _gather_windows(tokens: np.ndarray, windows: np.ndarray,
                    seq_len: int) -> np.ndarray:
  idx = windows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  # Fancy indexing reads only the touched pages of a memmap; np.array drops
  # the memmap subclass so callers get a plain in-memory array.
  return np.array(tokens[idx], dtype=np.int32)


def eval_batches(stream_or_tokens: TokenStream | np.ndarray, seq_len: int,
                 batch_size: int, num_batches: int) -> list[np.ndarray]:
  """The first windows of the eval split, in order, as fixed eval batches.

  Always the same windows, so eval losses are comparable across steps and
  runs. If the split holds fewer than `batch_size * num_batches` windows,
  the windows repeat cyclically.

  Args:
    stream_or_tokens: a `TokenStream` (its tokens are used) or a 1-D array.
    seq_len: T.
    batch_size: B.
    num_batches: number of batches.

  Returns:
    `num_batches` int32 arrays of shape [B, T + 1].
  """
  if isinstance(stream_or_tokens, TokenStream):
    tokens = stream_or_tokens.tokens
    name = stream_or_tokens.name
  else:
    tokens, name = stream_or_tokens, "eval tokens"
  # Reuse TokenStream's validation (1-D, seq_len, at least one window).
  num_windows = TokenStream(tokens, seq_len, name=name).num_windows
  windows = np.arange(batch_size * num_batches) % num_windows
  return [_gather_windows(tokens, w, seq_len)
          for w in windows.reshape(num_batches, batch_size)]


# ----------------------------------------------------------------------------
# Corpora: which documents, in which order
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """A list of document files under one root, plus its cache identity."""

  label: str  # Short name for logs and cache file names.
  root: str  # Directory the relative paths (= split keys) are relative to.
  files: tuple[str, ...]  # Sorted posix paths relative to `root`.
  identity: tuple[Any, ...]  # Changes whenever the content may change.


def _stdlib_corpus() -> _Corpus:
  """Every *.py under the interpreter's stdlib, minus installed packages."""
  root = sysconfig.get_paths()["stdlib"]
  files, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    # Third-party code differs between machines with the same Python; keep
    # the corpus a function of the interpreter version only.
    dirnames[:] = [d for d in dirnames
                   if d not in ("site-packages", "dist-packages")]
    for f in filenames:
      if f.endswith(".py"):
        full = os.path.join(dirpath, f)
        files.append(os.path.relpath(full, root).replace(os.sep, "/"))
        total += os.path.getsize(full)
  files.sort()
  version = (f"{platform.python_implementation()}-"
             f"{'.'.join(map(str, sys.version_info[:3]))}")
  return _Corpus("stdlib", root, tuple(files),
                 ("stdlib", version, len(files), total))


def _path_corpus(source: str) -> _Corpus:
  """A text/jsonl file or a directory of them (not .npy)."""
  path = os.path.abspath(os.path.expanduser(source))
  if os.path.isdir(path):
    root, files = path, []
    for dirpath, dirnames, filenames in os.walk(path):
      # Hidden directories (.git, .cache, ...) are tooling, not text.
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      for f in filenames:
        if f.endswith(_DIR_SUFFIXES) and not f.startswith("."):
          rel = os.path.relpath(os.path.join(dirpath, f), path)
          files.append(rel.replace(os.sep, "/"))
    files.sort()
    if not files:
      raise config_lib.ConfigError(
          f"data.source={source!r} is invalid: the directory holds no "
          f"{', '.join(_DIR_SUFFIXES)} files")
  else:
    root, files = os.path.dirname(path), [os.path.basename(path)]
  stats = []
  for rel in files:
    st = os.stat(os.path.join(root, rel))
    stats.append((rel, st.st_size, st.st_mtime_ns))
  label = os.path.basename(path.rstrip("/")) or "corpus"
  return _Corpus(label, root, tuple(files), ("path", path, tuple(stats)))


def _iter_documents(corpus: _Corpus,
                    text_field: str) -> Iterator[tuple[str, str | bytes]]:
  """Yields (split key, document) in corpus order."""
  for rel in corpus.files:
    full = os.path.join(corpus.root, rel)
    if not rel.endswith(".jsonl"):
      with open(full, "rb") as f:
        yield rel, f.read()
      continue
    with open(full, "r", encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{full}:{lineno}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise config_lib.ConfigError(
              f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
          fields = sorted(record) if isinstance(record, dict) else []
          raise config_lib.ConfigError(
              f"{where}: no field {text_field!r} (data.text_field); "
              f"fields present: {fields}")
        text = record[text_field]
        if not isinstance(text, str):
          raise config_lib.ConfigError(
              f"{where}: field {text_field!r} (data.text_field) is "
              f"{type(text).__name__}, not a string")
        yield f"{rel}:{lineno}", text


def is_heldout(key: str, holdout_fraction: float) -> bool:
  """Whether the document with split key `key` goes to the eval split.

  CRC-32 rather than Python's hash(): it is stable across processes
  (no PYTHONHASHSEED) and machines.
  """
  bucket = zlib.crc32(key.encode("utf-8")) % _HOLDOUT_BUCKETS
  return bucket < holdout_fraction * _HOLDOUT_BUCKETS


# ----------------------------------------------------------------------------
# Tokenize once, cache as flat token files
# ----------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> np.dtype:
  # Ids are < vocab_size, so uint16 holds vocabularies up to 65536 entries.
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tail_split(n: int, holdout_fraction: float) -> int:
  """Index where the eval tail starts: at least one token on each side."""
  eval_len = max(1, math.ceil(holdout_fraction * n))
  return n - min(eval_len, n - 1)


class _SplitWriter:
  """Appends framed documents to a temp file, holding the last one back.

  Holding back the last document lets `_build_cache` move it to the other
  split when that split would otherwise be empty: eval must never be empty
  (its loss is reported), and neither may train.
  """

  def __init__(self, f):
    self.f = f
    self.num_docs = 0
    self.num_tokens = 0
    self.held: np.ndarray | None = None

  def add(self, doc: np.ndarray) -> None:
    self.flush()
    self.held = doc
    self.num_docs += 1

  def write(self, arr: np.ndarray) -> None:
    arr.tofile(self.f)
    self.num_tokens += arr.size

  def flush(self) -> None:
    if self.held is not None:
      self.write(self.held)
      self.held = None


def _build_cache(corpus: _Corpus, tokenizer: Tokenizer, holdout_fraction: float,
                 text_field: str, base: str, dtype: np.dtype) -> dict[str, Any]:
  """Tokenizes `corpus` into `base`.{train,eval}.bin and `base`.json."""
  cache_dir, name = os.path.split(base)
  tmp: dict[str, str] = {}
  writers: dict[str, _SplitWriter] = {}
  try:
    # Temp files live in the cache dir so os.replace is an atomic rename;
    # a process killed before the rename leaves only a `.tmp` file that no
    # reader ever opens.
    for split in _SPLITS:
      fd, tmp[split] = tempfile.mkstemp(
          dir=cache_dir, prefix=f".{name}.{split}.", suffix=".tmp")
      writers[split] = _SplitWriter(os.fdopen(fd, "wb"))
    for chunk in _chunks(_iter_documents(corpus, text_field), _ENCODE_CHUNK):
      encoded = tokenizer.encode_batch([doc for _, doc in chunk])
      for (key, _), ids in zip(chunk, encoded, strict=True):
        frame = np.empty(ids.size + 2, dtype)
        frame[0], frame[-1] = tokenizer.bos_id, tokenizer.eos_id
        frame[1:-1] = ids
        split = "eval" if is_heldout(key, holdout_fraction) else "train"
        writers[split].add(frame)
    train, ev = writers["train"], writers["eval"]
    num_docs = train.num_docs + ev.num_docs
    if num_docs == 0:
      raise config_lib.ConfigError(
          f"data.source={corpus.label!r} is invalid: it holds no documents")
    split_by = "document"
    if num_docs == 1:
      # One document cannot be split by document: hold out its tail instead.
      doc = train.held if train.held is not None else ev.held
      cut = _tail_split(doc.size, holdout_fraction)
      train.held, ev.held = doc[:cut], doc[cut:]
      train.num_docs, ev.num_docs = 1, 0
      split_by = "tail"
    elif ev.num_docs == 0:
      ev.held, train.held = train.held, None
      train.num_docs, ev.num_docs = train.num_docs - 1, 1
    elif train.num_docs == 0:
      train.held, ev.held = ev.held, None
      ev.num_docs, train.num_docs = ev.num_docs - 1, 1
    for w in writers.values():
      w.flush()
      # fsync before the rename, so that even a power loss cannot leave a
      # renamed (hence trusted) file whose data never reached the disk.
      w.f.flush()
      os.fsync(w.f.fileno())
      w.f.close()
    meta = {
        "format": _CACHE_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "split_by": split_by,
        "num_tokens": {s: writers[s].num_tokens for s in _SPLITS},
        "num_docs": {s: writers[s].num_docs for s in _SPLITS},
    }
    for split in _SPLITS:
      os.replace(tmp.pop(split), f"{base}.{split}.bin")
    # The sidecar goes last: it is what marks the token files as complete.
    fd, tmp["meta"] = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.",
                                       suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp.pop("meta"), f"{base}.json")
    return meta
  finally:
    for w in writers.values():
      w.f.close()
    for path in tmp.values():
      try:
        os.remove(path)
      except OSError:
        pass


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == n:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _open_cache(base: str, dtype: np.dtype
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
  """The cached streams, or None unless sidecar and token files agree."""
  try:
    with open(f"{base}.json") as f:
      meta = json.load(f)
    if meta.get("format") != _CACHE_FORMAT or meta.get("dtype") != dtype.name:
      return None
    arrays = {}
    for split in _SPLITS:
      path, n = f"{base}.{split}.bin", int(meta["num_tokens"][split])
      if n < 1 or os.path.getsize(path) != n * dtype.itemsize:
        return None
      arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    return meta, arrays
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _cache_base(cache_dir: str, corpus: _Corpus, tokenizer: Tokenizer,
                holdout_fraction: float, text_field: str) -> str:
  key: dict[str, Any] = {
      "format": _CACHE_FORMAT,
      "source": corpus.identity,
      "tokenizer": tokenizer.fingerprint,
      "holdout_fraction": repr(float(holdout_fraction)),
  }
  if any(f.endswith(".jsonl") for f in corpus.files):
    key["text_field"] = text_field
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
  label = "".join(c if c.isalnum() or c in "-_." else "_"
                  for c in corpus.label)[:40]
  return os.path.join(cache_dir, f"{label}-{digest}")


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Train and eval streams of one corpus and the tokenizer that made them.

  Attributes:
    train: seeded, shuffled training windows.
    eval: the held-out split (use `eval_batches(eval, ...)`).
    tokenizer: `ByteTokenizer` or `HFTokenizer`.
    vocab_size: V; every token id is < V.
  """

  train: TokenStream
  eval: TokenStream
  tokenizer: ByteTokenizer | HFTokenizer
  vocab_size: int


def _source_error(source: str, why: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(
      f"data.source={source!r} is invalid: must be 'stdlib' or a path to a "
      "text file, a .jsonl file, a directory of .txt/.md/.py/.jsonl files, "
      f"or a .npy token file; {why}")


def _load_npy(source: str, vocab_size: int,
              holdout_fraction: float) -> dict[str, np.ndarray]:
  """A pre-tokenized 1-D token file, split by a held-out tail."""
  path = os.path.expanduser(source)
  try:
    tokens = np.load(path, mmap_mode="r")
  except ValueError as e:  # e.g. a pickled object array
    raise _source_error(source, f"cannot memory-map it ({e})") from None
  if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or tokens.size < 2:
    raise _source_error(
        source, f"need a 1-D integer array of >= 2 tokens, got "
        f"{tokens.dtype}{list(tokens.shape)}")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise _source_error(
        source, f"token ids span [{lo}, {hi}] but the tokenizer's vocab_size "
        f"is {vocab_size}")
  # No document boundaries to split on: the tail is the eval split. Slices of
  # a memmap are views, so nothing is copied.
  cut = _tail_split(tokens.size, holdout_fraction)
  return {"train": tokens[:cut], "eval": tokens[cut:]}


def load_datasets(cfg: config_lib.DataConfig, seq_len: int,
                  seed: int) -> Datasets:
  """Tokenizes (or reuses the cache of) `cfg.source` and wraps both splits.

  Args:
    cfg: where the text comes from and how it is tokenized.
    seq_len: T of the training windows.
    seed: data-order seed of the train stream.

  Returns:
    The train/eval `TokenStream`s, tokenizer and vocabulary size.

  Raises:
    ConfigError: a bad source, tokenizer or jsonl record.
    ValueError: a split shorter than one window of `seq_len + 1` tokens.
  """
  tokenizer = load_tokenizer(cfg.tokenizer)
  source = cfg.source
  path = os.path.expanduser(source)
  if source != "stdlib" and not os.path.exists(path):
    raise _source_error(source, "no such file or directory")

  if source != "stdlib" and path.endswith(".npy") and os.path.isfile(path):
    arrays = _load_npy(source, tokenizer.vocab_size, cfg.holdout_fraction)
    logging.info("data: %s (pre-tokenized), %d train / %d eval tokens",
                 path, arrays["train"].size, arrays["eval"].size)
  else:
    corpus = _stdlib_corpus() if source == "stdlib" else _path_corpus(source)
    cache_dir = os.path.expanduser(cfg.cache_dir or "~/.cache/nosa_jax")
    os.makedirs(cache_dir, exist_ok=True)
    base = _cache_base(cache_dir, corpus, tokenizer, cfg.holdout_fraction,
                       cfg.text_field)
    dtype = _token_dtype(tokenizer.vocab_size)
    cached = _open_cache(base, dtype)
    if cached is None:
      start = time.perf_counter()
      _build_cache(corpus, tokenizer, cfg.holdout_fraction, cfg.text_field,
                   base, dtype)
      logging.info("data: tokenized %d files of %s in %.1f s",
                   len(corpus.files), corpus.label,
                   time.perf_counter() - start)
      cached = _open_cache(base, dtype)
      if cached is None:
        raise OSError(f"data cache {base}.* unreadable right after writing")
    meta, arrays = cached
    logging.info(
        "data: %s, %d train / %d eval documents, %d train / %d eval tokens "
        "(%s split), cache %s.{train,eval}.bin", corpus.label,
        meta["num_docs"]["train"], meta["num_docs"]["eval"],
        meta["num_tokens"]["train"], meta["num_tokens"]["eval"],
        meta["split_by"], base)

  if cfg.passkey_fraction > 0 or cfg.recall_fraction > 0:
    train = SyntheticMixStream(
        arrays["train"], seq_len, seed, name="train split",
        tokenizer=tokenizer, passkey_fraction=cfg.passkey_fraction,
        recall_fraction=cfg.recall_fraction,
        recall_mqar_share=cfg.recall_mqar_share,
        recall_segment_tokens=cfg.recall_segment_tokens)
  else:
    train = TokenStream(arrays["train"], seq_len, seed, name="train split")
  return Datasets(
      train=train,
      eval=TokenStream(arrays["eval"], seq_len, seed, name="eval split"),
      tokenizer=tokenizer,
      vocab_size=tokenizer.vocab_size)
