"""Evaluation of a trained model: perplexity, passkey retrieval, locality.

Four measurements, each a function of (params, ModelConfig, inputs):

* `heldout_perplexity`: mean next-token NLL over fixed held-out batches
  (`data.eval_batches`, the windows behind the trainer's `eval/loss`) and
  its exponential.
* `passkey_accuracy`: needle retrieval at several context lengths and
  depths, on `nosa_jax.passkey` documents built offline, scored by teacher
  forcing (see `score_passkey` for why this equals greedy decoding).
* `recall_by_distance`: held-out associative recall (`nosa_jax.recall`) by
  the distance from the record to its query, scored the same way.
* `decode_gamma`: the mean step-to-step selection overlap gamma per layer
  (NOSA_SPEC.md §3; `selection.selection_gamma`) while greedily decoding
  held-out prompts with `inference.engine.generate`. `full` selects
  nothing: None.

`evaluate` runs all four from an `EvalConfig`; `load_model` reads a
training workdir or an HF directory; `log_results` writes TensorBoard
scalars; `read_scalars` reads a run's training curves back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import analysis
from nosa_jax import config as config_lib
from nosa_jax import data as data_lib
from nosa_jax import hf_io
from nosa_jax import model as model_lib
from nosa_jax import passkey
from nosa_jax import recall
from nosa_jax import selection
from nosa_jax.inference import engine
from nosa_jax.inference import sampling

# predict(tokens_BT) -> (argmax_BT, nll_BT): at every position t the
# greedy next token and -log p(tokens[t + 1] | tokens[:t + 1]) (the last
# column's NLL is of a wrapped-around token and never read).
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate` measures. Field names are the evaluate CLI's flags.

  Attributes:
    seq_len: T of the perplexity windows (0: the run's train.seq_len).
    batch_size: sequences per forward pass (0: the run's train.batch_size).
    eval_batches: held-out batches (0: the run's train.eval_batches). With
      the three defaults the NLL is the trainer's eval/loss.
    passkey_lengths: context lengths in tokens, answer included (empty:
      seq_len // 2 and seq_len). Longer than the training seq_len is
      allowed (RoPE extrapolation) with a warning.
    passkey_depths: needle depths in [0, 1] (fraction of the haystack).
    passkey_trials: documents per (length, depth); 0 skips the passkey.
    passkey_digits: digits of each key.
    gamma_prompts: held-out prompts decoded for gamma; 0 skips it.
    gamma_new_tokens: greedy tokens decoded per prompt.
    gamma_prompt_len: prompt tokens (0: seq_len - gamma_new_tokens).
    seed: passkey keys.
    recall_trials: held-out recall documents per distance bucket
      (`recall.BUCKETS`, `recall_by_distance`); 0 skips recall.
    recall_distractors: further records in each recall document.
    recall_seed: the recall documents' RNG stream (their keys come from the
      held-out part of the key space whatever the seed).
  """

  seq_len: int = 0
  batch_size: int = 0
  eval_batches: int = 0
  passkey_lengths: tuple[int, ...] = ()
  passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  passkey_trials: int = 4
  passkey_digits: int = 5
  gamma_prompts: int = 2
  gamma_new_tokens: int = 32
  gamma_prompt_len: int = 0
  seed: int = 0
  recall_trials: int = 0
  recall_distractors: int = 4
  recall_seed: int = 1

  def __post_init__(self):
    for name in ("passkey_lengths", "passkey_depths"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("seq_len", "batch_size", "eval_batches", "passkey_trials",
                 "gamma_prompts", "gamma_prompt_len", "seed", "recall_trials",
                 "recall_distractors", "recall_seed"):
      _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name,
             "must be a non-negative integer", getattr(self, name))
    for name in ("passkey_digits", "gamma_new_tokens"):
      _check(_is_int(getattr(self, name)) and getattr(self, name) > 0, name,
             "must be a positive integer", getattr(self, name))
    _check(all(_is_int(x) and x > 0 for x in self.passkey_lengths),
           "passkey_lengths", "must be positive integers",
           self.passkey_lengths)
    _check(bool(self.passkey_depths) and all(
        isinstance(x, (int, float)) and 0.0 <= x <= 1.0
        for x in self.passkey_depths), "passkey_depths",
           "must be one or more numbers in [0, 1]", self.passkey_depths)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
  if not cond:
    raise config_lib.ConfigError(f"{name}={value!r} is invalid: {allowed}")


def parse_list(name: str, text: str, kind: type) -> tuple:
  """'256,512' -> (256, 512); a one-line ConfigError naming `name`."""
  try:
    return tuple(kind(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise config_lib.ConfigError(
        f"{name}={text!r} is invalid: must be comma-separated "
        f"{kind.__name__} values") from None


# ----------------------------------------------------------------------------
# Loading a model.
# ----------------------------------------------------------------------------


def load_model(*, workdir: str | None = None, hf_dir: str | None = None,
               cfg: config_lib.ExperimentConfig | None = None,
               step: int | None = None,
               hf_sparse: config_lib.SparseConfig | None = None,
               report: list[str] | None = None
               ) -> tuple[config_lib.ExperimentConfig, Any, int]:
  """(ExperimentConfig, params, step) from a training run or an HF directory.

  Args:
    workdir: a `train_and_evaluate` workdir; its latest (or `step`)
      checkpoint is read without touching the directory
      (`hf_io.load_workdir`), so a running training is not disturbed.
    hf_dir: instead, an HF directory (`hf_io.import_hf`); its model config
      is used, and its `tokenizer.json` when there is one and `cfg` is None.
    cfg: overrides the run's config (data, seq_len; for a workdir also the
      model, which must have the checkpoint's parameter shapes, so e.g. a
      different `topk_blocks` can be evaluated). Default: the run's
      `config.json`, or defaults for an HF directory.
    step: checkpoint step of `workdir` (default: latest).
    hf_sparse: with hf_dir, the selection constants to use instead of the
      ones the checkpoint's architecture implies (`hf_io.convert_hf_config`).
    report: with hf_dir, receives the import report lines.

  Raises:
    FileNotFoundError: no workdir config / checkpoint / HF files.
    ConfigError: `cfg.model` does not fit the checkpoint.
  """
  if hf_dir:
    overrides = {} if hf_sparse is None else {"sparse": hf_sparse}
    mcfg, params = hf_io.import_hf(hf_dir, report=report, **overrides)
    base = cfg or config_lib.ExperimentConfig()
    data_cfg = base.data
    tok = os.path.join(hf_dir, "tokenizer.json")
    if cfg is None and os.path.isfile(tok):
      data_cfg = dataclasses.replace(data_cfg, tokenizer=tok)
    return dataclasses.replace(base, model=mcfg, data=data_cfg), params, 0
  if not workdir:
    raise FileNotFoundError("give a training workdir or an HF directory")
  run_cfg, params, step = hf_io.load_workdir(workdir, step)
  if cfg is None:
    return run_cfg, params, step
  want = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)),
                      model_lib.abstract_params(cfg.model)[1])
  got = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise config_lib.ConfigError(
        f"config model (variant {cfg.model.sparse.variant}, "
        f"{cfg.model.num_layers} layers, M={cfg.model.model_dim}) is invalid: "
        f"its parameters differ from the checkpoint's in {workdir}")
  return cfg, params, step


# ----------------------------------------------------------------------------
# Held-out perplexity.
# ----------------------------------------------------------------------------


# One teacher-forced forward serves both perplexity and passkey scoring, so
# where their shapes coincide it compiles once. It is a module-level jit
# keyed by the (hashable) config: repeated evaluations in one process (a
# study, the tests) compile each shape once.
@functools.partial(jax.jit, static_argnames="cfg")
def _teacher_forced(params, tokens_BT: jax.Array, targets_BT: jax.Array, *,
                    cfg: config_lib.ModelConfig
                    ) -> tuple[jax.Array, jax.Array]:
  """(argmax_BT, nll_BT): the greedy next token and the targets' NLL."""
  graphdef = model_lib.abstract_params(cfg)[0]
  logits_BTV, _ = model_lib.apply(graphdef, params, tokens_BT)
  # fp32 log-softmax, as train.cross_entropy.
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)
  return jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32), nll_BT[..., 0]


def heldout_perplexity(params: Any, cfg: config_lib.ModelConfig,
                       batches: Sequence[np.ndarray]) -> dict[str, float]:
  """Mean next-token NLL (nats) over `batches` and its exponential.

  Args:
    params: model parameters.
    cfg: their model config.
    batches: int [B, T + 1] windows (`data.eval_batches`); all of one shape.

  Returns:
    {"nll", "ppl", "batches", "tokens"}. Batches are equal-sized, so the
    mean of batch means (what the trainer logs) is the mean over tokens.
  """
  losses = []
  for b in batches:
    b_BT1 = jnp.asarray(b, jnp.int32)
    _, nll_BT = _teacher_forced(params, b_BT1[:, :-1], b_BT1[:, 1:], cfg=cfg)
    losses.append(float(jnp.mean(nll_BT)))
  nll = float(np.mean(losses))
  return {"nll": nll, "ppl": float(math.exp(min(nll, 700.0))),
          "batches": len(batches),
          "tokens": int(sum(b[:, 1:].size for b in batches))}


# ----------------------------------------------------------------------------
# Passkey retrieval.
# ----------------------------------------------------------------------------


def greedy_predict_fn(params: Any, cfg: config_lib.ModelConfig) -> PredictFn:
  """The model's teacher-forced argmax and NLL (`PredictFn`, one forward)."""
  def predict(tokens_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    out = _teacher_forced(params, tokens_BT, jnp.roll(tokens_BT, -1, axis=1),
                          cfg=cfg)
    return jax.device_get(out)

  return predict


def digit_token_mask(tokenizer: data_lib.Tokenizer,
                     vocab_size: int) -> np.ndarray:
  """bool [V]: tokens whose text starts with a decimal digit."""
  if isinstance(tokenizer, data_lib.ByteTokenizer):
    mask = np.zeros(vocab_size, bool)
    mask[ord("0"):ord("9") + 1] = True
    return mask
  return np.array([tokenizer.decode([i])[:1].isdigit()
                   for i in range(vocab_size)])


def score_passkey(predict: PredictFn,
                  examples: Sequence[passkey.PasskeyExample], *,
                  batch_size: int, pad_id: int, pad_multiple: int = 1,
                  digit_mask: np.ndarray | None = None) -> list[dict]:
  """Teacher-forced exact-match scoring of passkey examples.

  Why one forward pass decides greedy decoding exactly: greedy decoding
  from the prompt emits the answer's first token a_1 iff the argmax at the
  prompt's last position is a_1. If it is, the next step's context is
  prompt + a_1, which is exactly the teacher-forced context of the next
  position, and so on: by induction, greedy decoding emits a_1..a_n iff the
  teacher-forced argmax equals a_i at each of the n answer positions. A
  causal model's logits at position i depend only on tokens <= i, so one
  forward pass over prompt + answer gives all n argmaxes (padding after the
  answer is never seen). With `digit_mask`, the greedy token after the
  answer must also not start with a digit, so "123456" does not match the
  key "12345". Caveats: exactness is up to float rounding of decode vs
  forward logits (equal by construction, checked in
  inference/engine_test); and the match is on the answer's own token
  sequence, so with a subword tokenizer
  another segmentation of the same digits counts as a miss (never with the
  byte tokenizer).

  Args:
    predict: `PredictFn` (e.g. `greedy_predict_fn`).
    examples: documents; any lengths (grouped by length into batches).
    batch_size: rows per `predict` call; short batches are padded with
      pad rows so every call of one length has the same shape.
    pad_id: fills rows to the batch's length.
    pad_multiple: pad lengths up to a multiple of this (e.g. block_size),
      so fewer shapes compile.
    digit_mask: bool [V] of digit-initial tokens (`digit_token_mask`).

  Returns:
    One dict per example, in order: {"correct": bool, "token_accuracy":
    fraction of answer tokens right, "answer_nll": mean NLL of the answer
    tokens in nats}. The NLL is the continuous measure that still ranks
    models none of which retrieves exactly (ln 10 = 2.30 per digit is
    chance).
  """
  out: list[dict] = [{}] * len(examples)
  order = sorted(range(len(examples)), key=lambda i: examples[i].length)
  chunks, cur = [], []
  for i in order:
    if cur and (len(cur) == batch_size
                or examples[cur[0]].length != examples[i].length):
      chunks.append(cur)
      cur = []
    cur.append(i)
  if cur:
    chunks.append(cur)
  for chunk in chunks:
    length = examples[chunk[0]].length
    t = -(-length // pad_multiple) * pad_multiple
    tokens_BT = np.full((batch_size, t), pad_id, np.int32)
    for row, i in enumerate(chunk):
      tokens_BT[row, :length] = examples[i].tokens
    pred_BT, nll_BT = (np.asarray(x) for x in predict(tokens_BT))
    for row, i in enumerate(chunk):
      ex = examples[i]
      s, n = ex.answer_start, len(ex.answer)
      # Position p predicts token p + 1.
      hits = pred_BT[row, s - 1:s - 1 + n] == ex.answer
      stops = digit_mask is None or not digit_mask[pred_BT[row, s - 1 + n]]
      out[i] = {"correct": bool(hits.all() and stops),
                "token_accuracy": float(hits.mean()),
                "answer_nll": float(nll_BT[row, s - 1:s - 1 + n].mean())}
  return out


def passkey_accuracy(predict: PredictFn, tokenizer: data_lib.Tokenizer, *,
                     lengths: Sequence[int], depths: Sequence[float],
                     trials: int, batch_size: int, seed: int = 0,
                     digits: int = 5, pad_multiple: int = 1,
                     sparse: config_lib.SparseConfig | None = None,
                     vocab_size: int | None = None) -> dict:
  """Passkey accuracy for every (length, depth), `trials` keys each.

  Args:
    predict: `PredictFn`.
    tokenizer: builds the documents (byte or HF).
    lengths, depths, trials, seed, digits: the grid and its keys.
    batch_size, pad_multiple: see `score_passkey`.
    sparse: if given, also report which needles lie outside the blocks the
      first answer query always selects (sink + window + own block), i.e.
      where retrieval needs a real selection. Pure geometry: given for
      `full` too, it marks the same cells as for the sparse variants.
    vocab_size: V for the digit check (default: the tokenizer's).

  Returns:
    A JSON-ready dict; grids are [length][depth]: accuracy, token_accuracy,
    answer_nll, distance (mean tokens from the needle to the answer),
    outside_forced (fraction of needles outside the forced blocks, with
    `sparse`), plus
    accuracy_by_length, accuracy_by_depth, the overall accuracy and the
    overall answer NLL.

  Raises:
    ConfigError: a length shorter than the passkey text itself.
  """
  builder = passkey.PasskeyBuilder(tokenizer)
  need = builder.fixed_length("9" * digits)
  _check(min(lengths) >= need, "passkey_lengths",
         f"each must be >= {need} (the passkey text alone)", tuple(lengths))
  examples = passkey.make_examples(tokenizer, lengths, depths, trials, seed,
                                   digits)
  vocab_size = vocab_size or tokenizer.vocab_size
  scores = score_passkey(predict, examples, batch_size=batch_size,
                         pad_id=tokenizer.pad_id, pad_multiple=pad_multiple,
                         digit_mask=digit_token_mask(tokenizer, vocab_size))
  shape = (len(lengths), len(depths), trials)
  correct = np.array([s["correct"] for s in scores], float).reshape(shape)
  tok_acc = np.array([s["token_accuracy"] for s in scores]).reshape(shape)
  nll = np.array([s["answer_nll"] for s in scores]).reshape(shape)
  dist = np.array([e.answer_start - e.needle_start for e in examples],
                  float).reshape(shape)
  result = {
      "lengths": list(lengths), "depths": list(depths), "trials": trials,
      "digits": digits,
      "accuracy": correct.mean(-1).tolist(),
      "token_accuracy": tok_acc.mean(-1).tolist(),
      "answer_nll": nll.mean(-1).tolist(),
      "distance": dist.mean(-1).tolist(),
      "accuracy_by_length": correct.mean((1, 2)).tolist(),
      "accuracy_by_depth": correct.mean((0, 2)).tolist(),
      "overall": float(correct.mean()),
      "overall_answer_nll": float(nll.mean()),
  }
  if sparse is not None:
    result["outside_forced"] = outside_forced(examples, sparse).reshape(
        shape).mean(-1).tolist()
  return result


def outside_forced(examples: Sequence[passkey.PasskeyExample],
                   sparse: config_lib.SparseConfig) -> np.ndarray:
  """float [len(examples)]: 1 where the needle lies outside the blocks the
  first answer query always selects (sink + window + own block)."""
  c = sparse.block_size
  outside = []
  for e in examples:
    own = (e.answer_start - 1) // c  # block of the first answer query
    first_window = max(own - sparse.window_blocks, 0)
    outside.append(e.needle_start >= sparse.sink_blocks * c
                   and e.needle_end <= first_window * c)
  return np.array(outside, float)


# ----------------------------------------------------------------------------
# Associative recall by distance.
# ----------------------------------------------------------------------------


def recall_by_distance(predict: PredictFn, tokenizer: data_lib.Tokenizer,
                       haystack: np.ndarray, *, context: int, trials: int,
                       distractors: int, seed: int, batch_size: int,
                       sparse: config_lib.SparseConfig,
                       vocab_size: int | None = None) -> dict:
  """Held-out associative recall per distance bucket (`recall.BUCKETS`).

  Each document (`recall.distance_examples`) ends in a query whose answer
  is a value seen once before, at the bucket's distance, among
  `distractors` other records; it is scored as the passkey is
  (`score_passkey`: exact match of the greedy answer, answer NLL).

  Args:
    predict: `PredictFn`.
    tokenizer: builds the documents.
    haystack: held-out corpus tokens (the eval split).
    context: the training context (seq_len); "ctx_2x" documents are twice
      as long.
    trials, distractors, seed: documents per bucket, distractor records,
      RNG stream.
    batch_size: rows per `predict` call.
    sparse: the selection geometry that places the buckets (any variant's,
      `full`'s too: pure geometry) and pads the lengths.
    vocab_size: V for the digit check (default: the tokenizer's).

  Returns:
    A JSON-ready dict: per bucket (dicts keyed by bucket name) accuracy,
    token_accuracy, answer_nll, distance (mean tokens from the record to
    the answer), length, outside_forced (fraction of targets outside the
    forced blocks: 0 for "window", 1 for the others); beyond_window and
    beyond_window_answer_nll (means over `recall.BEYOND_WINDOW`, the
    buckets within the training context that need the selection).
  """
  pairs = recall.distance_examples(
      tokenizer, haystack, context=context, trials=trials,
      distractors=distractors, seed=seed, block_size=sparse.block_size,
      sink_blocks=sparse.sink_blocks, window_blocks=sparse.window_blocks)
  examples = [e for _, e in pairs]
  vocab_size = vocab_size or tokenizer.vocab_size
  scores = score_passkey(predict, examples, batch_size=batch_size,
                         pad_id=tokenizer.pad_id,
                         pad_multiple=sparse.block_size,
                         digit_mask=digit_token_mask(tokenizer, vocab_size))
  outside = outside_forced(examples, sparse)
  names = [name for name, _ in recall.BUCKETS]
  result: dict[str, Any] = {
      "context": context, "trials": trials, "distractors": distractors,
      "seed": seed, "buckets": names}
  rows = {n: [i for i, (b, _) in enumerate(pairs) if b == n] for n in names}
  for key, fn in (
      ("accuracy", lambda i: float(scores[i]["correct"])),
      ("token_accuracy", lambda i: scores[i]["token_accuracy"]),
      ("answer_nll", lambda i: scores[i]["answer_nll"]),
      ("distance", lambda i: float(examples[i].answer_start
                                   - examples[i].needle_start)),
      ("length", lambda i: float(examples[i].length)),
      ("outside_forced", lambda i: float(outside[i]))):
    result[key] = {n: float(np.mean([fn(i) for i in rows[n]]))
                   for n in names}
  result["beyond_window"] = float(np.mean(
      [result["accuracy"][n] for n in recall.BEYOND_WINDOW]))
  result["beyond_window_answer_nll"] = float(np.mean(
      [result["answer_nll"][n] for n in recall.BEYOND_WINDOW]))
  return result


# ----------------------------------------------------------------------------
# Locality during decode.
# ----------------------------------------------------------------------------


def heldout_prompts(stream: data_lib.TokenStream | np.ndarray, num: int,
                    length: int) -> list[list[int]]:
  """The first `num` held-out windows of `length` tokens, as prompts."""
  (batch,) = data_lib.eval_batches(stream, length, num, 1)
  return batch[:, :length].tolist()


def decode_gamma(params: Any, cfg: config_lib.ModelConfig,
                 prompts: Sequence[Sequence[int]],
                 max_new_tokens: int) -> dict | None:
  """Mean selection overlap gamma per layer during greedy decode.

  gamma(t) = |sel(t) & sel(t-1)| / |sel(t)| with a newly opened block
  counted as a hit (`selection.selection_gamma`): the fraction of the blocks a
  step attends that an offloading engine holding sel(t-1) need not fetch.
  It is 1 by construction while the context fits the budget, so prompts
  should be longer than topk_blocks * block_size.

  Returns:
    {"per_layer", "mean", "prompts", "prompt_len", "new_tokens",
    "decode_tokens_per_s"}, or None for `full` (no selection).
  """
  if not cfg.sparse.is_sparse:
    return None
  budget = cfg.sparse.topk_blocks * cfg.sparse.block_size
  prompt_len = max(len(p) for p in prompts)
  if prompt_len + max_new_tokens <= budget:
    logging.warning("gamma: contexts of %d tokens fit the %d-token budget; "
                    "gamma is 1 by construction", prompt_len + max_new_tokens,
                    budget)
  generated, stats = engine.generate(params, cfg, prompts, max_new_tokens,
                                     return_stats=True)
  per_layer = [float(g) for g in stats["gamma_per_layer"]]
  return {"per_layer": per_layer, "mean": float(np.mean(per_layer)),
          "prompts": len(prompts), "prompt_len": prompt_len,
          "new_tokens": max_new_tokens,
          "decode_tokens_per_s": float(stats["decode_tokens_per_s"]),
          "next_layer_prediction": next_layer_prediction(
              params, cfg, prompts, generated)}


def next_layer_prediction(params: Any, cfg: config_lib.ModelConfig,
                          prompts: Sequence[Sequence[int]],
                          generated: Sequence[Sequence[int]]) -> dict:
  """Could a prefetch one layer ahead have fetched the misses? Per layer.

  Replays the greedy continuation (teacher-forced) with
  `engine.decode_step(..., predict=True)`: layer l's selection
  guessed from layer l-1's input, as an offload engine would have to guess
  it to fetch beside layer l-1's matmuls. `coverage` = the fraction of
  the step's misses (blocks not selected at the previous step) that the
  guess selects; `extra_per_step` = blocks per (sequence, KV head, step)
  the guess selects that neither step needs. Layer 0 has no guess (0).
  The steps decoded are those where every sequence has a continuation.
  """
  steps = min(len(g) for g in generated) - 1
  n_l = cfg.num_layers
  misses, covered, extra = (np.zeros(n_l, np.int64) for _ in range(3))
  if steps >= 2:
    tokens_BT, lengths_B, s, _, _ = sampling.prepare_prompts(
        prompts, steps + 1, cfg.sparse.block_size)
    state, _ = engine.prefill(params, cfg, tokens_BT, lengths_B, s)
    prev = None
    for t in range(steps):
      tok_B = jnp.asarray([g[t] for g in generated], jnp.int32)
      state, _, info = engine.decode_step(params, cfg, state, tok_B,
                                          predict=True)
      idx, pred = info["selected"], info["predicted"]
      if prev is not None:
        m, c, e = (np.asarray(x).reshape(n_l, -1).sum(-1)
                   for x in selection.prefetch_coverage(prev, idx, pred))
        misses, covered, extra = misses + m, covered + c, extra + e
      prev = idx
  lanes = max(steps - 1, 1) * len(prompts) * cfg.num_kv_heads
  coverage = [float(c / m) if m else None for c, m in zip(covered, misses,
                                                            strict=True)]
  return {"coverage_per_layer": coverage,
          "coverage": (float(covered[1:].sum() / misses[1:].sum())
                       if misses[1:].sum() else None),
          "misses_per_layer": misses.tolist(),
          "extra_per_step_per_layer": (extra / lanes).tolist(),
          "steps": max(steps - 1, 0)}


# ----------------------------------------------------------------------------
# Everything, and where it goes.
# ----------------------------------------------------------------------------


def evaluate(params: Any, cfg: config_lib.ExperimentConfig,
             ecfg: EvalConfig,
             datasets: data_lib.Datasets | None = None) -> dict:
  """Perplexity, passkey accuracy and decode gamma of one model.

  Args:
    params: model parameters for cfg.model.
    cfg: the run's config (model; data for the held-out split and the
      tokenizer; train.seq_len / batch_size / eval_batches as defaults).
    ecfg: what to measure.
    datasets: already loaded data (default: `data.load_datasets(cfg.data)`).

  Returns:
    A JSON-ready dict: model, perplexity, passkey (None if skipped),
    recall (None if skipped), gamma (None if skipped or `full`).
  """
  tc, mc = cfg.train, cfg.model
  seq_len = ecfg.seq_len or tc.seq_len
  batch_size = ecfg.batch_size or tc.batch_size
  if datasets is None:
    datasets = data_lib.load_datasets(cfg.data, seq_len, tc.seed)
  if mc.vocab_size < datasets.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={mc.vocab_size} is invalid: must be >= the "
        f"tokenizer's vocabulary ({datasets.vocab_size})")
  results: dict[str, Any] = {
      "model": {"variant": mc.sparse.variant,
                "implementation": mc.sparse.implementation,
                "num_params": model_lib.count_params(params),
                "train_seq_len": tc.seq_len}}

  batches = data_lib.eval_batches(datasets.eval, seq_len, batch_size,
                                  ecfg.eval_batches or tc.eval_batches)
  results["perplexity"] = dict(heldout_perplexity(params, mc, batches),
                               seq_len=seq_len)
  logging.info("held-out NLL %.4f (ppl %.2f) over %d tokens",
               results["perplexity"]["nll"], results["perplexity"]["ppl"],
               results["perplexity"]["tokens"])

  results["passkey"] = None
  lengths = ecfg.passkey_lengths
  if ecfg.passkey_trials and not lengths:
    # Defaults: half and all of seq_len, those that hold the passkey text
    # (a short-context model, e.g. the CPU quickstart's, may hold neither).
    need = passkey.PasskeyBuilder(datasets.tokenizer).fixed_length(
        "9" * ecfg.passkey_digits)
    lengths = tuple(n for n in (seq_len // 2, seq_len) if n >= need)
    if not lengths:
      logging.warning("passkey skipped: seq_len %d is shorter than the "
                      "passkey text (%d tokens); pass --passkey_lengths",
                      seq_len, need)
  if ecfg.passkey_trials and lengths:
    longer = [n for n in lengths if n > tc.seq_len]
    if longer:
      logging.warning("passkey lengths %s exceed the training seq_len %d: "
                      "RoPE extrapolates", longer, tc.seq_len)
    results["passkey"] = passkey_accuracy(
        greedy_predict_fn(params, mc), datasets.tokenizer, lengths=lengths,
        depths=ecfg.passkey_depths, trials=ecfg.passkey_trials,
        batch_size=batch_size, seed=ecfg.seed, digits=ecfg.passkey_digits,
        pad_multiple=mc.sparse.block_size,
        sparse=mc.sparse,
        vocab_size=mc.vocab_size)
    logging.info("passkey accuracy %.3f; by length %s",
                 results["passkey"]["overall"],
                 results["passkey"]["accuracy_by_length"])

  results["recall"] = None
  if ecfg.recall_trials:
    results["recall"] = recall_by_distance(
        greedy_predict_fn(params, mc), datasets.tokenizer,
        datasets.eval.tokens, context=tc.seq_len, trials=ecfg.recall_trials,
        distractors=ecfg.recall_distractors, seed=ecfg.recall_seed,
        batch_size=batch_size, sparse=mc.sparse, vocab_size=mc.vocab_size)
    logging.info("recall by distance %s (beyond the window %.3f)",
                 {k: round(v, 3)
                  for k, v in results["recall"]["accuracy"].items()},
                 results["recall"]["beyond_window"])

  results["gamma"] = None
  if ecfg.gamma_prompts and mc.sparse.is_sparse:
    prompt_len = ecfg.gamma_prompt_len or max(
        seq_len - ecfg.gamma_new_tokens, 1)
    prompts = heldout_prompts(datasets.eval, ecfg.gamma_prompts, prompt_len)
    results["gamma"] = decode_gamma(params, mc, prompts,
                                    ecfg.gamma_new_tokens)
    logging.info("decode gamma per layer %s (mean %.3f)",
                 np.round(results["gamma"]["per_layer"], 3).tolist(),
                 results["gamma"]["mean"])
    pred = results["gamma"]["next_layer_prediction"]
    logging.info("next-layer selection guess covers %s of the misses "
                 "(layers 1+; per layer %s)", pred["coverage"],
                 [None if c is None else round(c, 3)
                  for c in pred["coverage_per_layer"]])
  return results


def log_results(writer, step: int, results: dict) -> None:
  """Scalars under eval/, passkey/, recall/ and gamma/ (a MetricWriter)."""
  ppl = results["perplexity"]
  scalars = {"eval/nll": ppl["nll"], "eval/ppl": ppl["ppl"]}
  pk = results.get("passkey")
  if pk:
    scalars["passkey/accuracy"] = pk["overall"]
    for i, length in enumerate(pk["lengths"]):
      scalars[f"passkey/len_{length}"] = pk["accuracy_by_length"][i]
      for j, depth in enumerate(pk["depths"]):
        scalars[f"passkey/len_{length}/depth_{depth:.2f}"] = (
            pk["accuracy"][i][j])
  rec = results.get("recall")
  if rec:
    scalars["recall/beyond_window"] = rec["beyond_window"]
    for name, acc in rec["accuracy"].items():
      scalars[f"recall/{name}"] = acc
  gamma = results.get("gamma")
  if gamma:
    scalars["gamma/mean"] = gamma["mean"]
    for i, g in enumerate(gamma["per_layer"]):
      scalars[f"gamma/layer_{i:02d}"] = g
  writer.scalars(step, scalars)
  writer.flush()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalar curves of the event files directly in `logdir` (not subdirs).

  `analysis.read_scalars` reads them; this gives its result as lists of
  pairs, and an empty dict where `logdir` does not exist.

  Returns:
    tag -> [(step, value), ...] sorted by step; a step logged twice (a
    resumed run) keeps its last value.
  """
  if not os.path.isdir(logdir):
    return {}
  return {tag: list(zip(s.steps.tolist(), s.values.tolist(), strict=True))
          for tag, s in analysis.read_scalars(logdir).items()}
