"""Pretraining loop: `train_and_evaluate(cfg, workdir)`.

One readable function split by banner comments (big_vision style): data,
model and optimizer, restore, jitted steps, the loop with logging /
evaluation / checkpointing. A resumed run reproduces the uninterrupted one:
the data position (windows consumed), step and RNG key are checkpointed, the
data order is a pure function of (seed, position), and the steps are
deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as pylogging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from nosa_jax import checkpoint as checkpoint_lib
from nosa_jax import config as config_lib
from nosa_jax import data as data_lib
from nosa_jax import implementations as implementations_lib
from nosa_jax import metrics as metrics_lib
from nosa_jax import model as model_lib
from nosa_jax import sharding as sharding_lib

State = dict[str, Any]


class TrainingDiverged(RuntimeError):
  """A loss or the state became NaN/inf; the last good checkpoint is kept.

  `first_bad` is the first step whose state is not good: state s is good
  when it is finite and the loss and gradient computed from it (at step
  s + 1, or an evaluation at step s) are finite. Checkpoints from
  `first_bad` on are set aside, so a rerun resumes from the last good one.
  """

  def __init__(self, message: str, first_bad: int):
    super().__init__(message)
    self.first_bad = first_bad


class _DropLibraryInfo(pylogging.Filter):
  """Hides orbax's per-save INFO chatter; warnings and errors still show."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno >= pylogging.WARNING
            or "/orbax/" not in record.pathname)


def quiet_library_logs() -> None:
  """Keeps the terminal to the trainer's own progress lines."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def make_optimizer(tc: config_lib.TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping."""
  schedule = learning_rate_schedule(tc)
  # No weight decay on vectors (norm scales, the eviction gain A).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps,
                      weight_decay=tc.weight_decay, mask=decay_mask)
  if tc.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
  return adamw


def learning_rate_schedule(tc: config_lib.TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate,
      warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.num_steps, tc.warmup_steps + 1),
      end_value=tc.learning_rate * tc.min_lr_ratio)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in fp32."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)
  return jnp.mean(nll_BT)


def loss_fn(params, graphdef, cfg: config_lib.ModelConfig,
            batch_BT1: jax.Array, penalty_key: jax.Array | None = None
            ) -> tuple[jax.Array, dict]:
  """CE loss plus `locality_weight` x locality penalty (decision 5).

  `penalty_key` draws the sampled penalty (`locality_sample_fraction` < 1;
  the train step passes one from its state's RNG); None: the exact one.
  """
  tokens_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
  logits_BTV, aux = model_lib.apply(graphdef, params, tokens_BT,
                                    penalty_key=penalty_key)
  ce = cross_entropy(logits_BTV, targets_BT)
  penalty = aux["locality_penalty"]
  loss = ce + cfg.sparse.locality_weight * penalty
  return loss, {"loss": ce, "locality_penalty": penalty}


def train_step(state: State, batch_BT1: jax.Array, *, graphdef,
               cfg: config_lib.ModelConfig,
               tx: optax.GradientTransformation) -> tuple[State, dict]:
  """One AdamW step; pure, jitted with the state donated."""
  # The state's RNG (checkpointed) draws the sampled penalty: a resumed
  # run draws what the uninterrupted one would.
  rng, penalty_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], graphdef, cfg, batch_BT1,
                                penalty_key)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  # A checkpoint of the new state is good only if it is finite.
  metrics["state_finite"] = jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, opt_state))]))
  new_state = {"params": params, "opt_state": opt_state,
               "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
  return new_state, metrics


def init_state(cfg: config_lib.ExperimentConfig, mesh=None
               ) -> tuple[Any, State, optax.GradientTransformation]:
  """(graphdef, fresh train state, optimizer) for `cfg`.

  With a mesh, parameters are created directly in their shards (a jitted
  init with `out_shardings`), so an 8B model never sits on one device.
  """
  tx = make_optimizer(cfg.train)
  # Jitted with or without a mesh, so every path rounds the init the same.
  shardings_for = ((lambda tree: None) if mesh is None else
                   lambda tree: sharding_lib.tree_shardings(tree, mesh))
  graphdef, params = model_lib.init(cfg.model, cfg.train.seed, shardings_for)

  def rest(params):
    return {"opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1))}

  out = shardings_for(jax.eval_shape(rest, params))
  return graphdef, {"params": params, **jax.jit(rest, out_shardings=out)(
      params)}, tx


def config_warnings(cfg: config_lib.ExperimentConfig) -> list[str]:
  """Settings that are legal but do not do what their names say."""
  sp, seq_len = cfg.model.sparse, cfg.train.seq_len
  out = []
  num_blocks = -(-seq_len // sp.block_size)
  if sp.is_sparse and sp.topk_blocks >= num_blocks:
    out.append(
        f"model.sparse.variant={sp.variant} selects topk_blocks="
        f"{sp.topk_blocks} of the {num_blocks} block(s) of train.seq_len="
        f"{seq_len} (block_size {sp.block_size}): every block is selected, "
        "so attention is exactly dense; raise seq_len or lower topk_blocks")
  slow = implementations_lib.interpret_warning(sp)
  return out + ([slow] if slow else [])


def _log_config(cfg: config_lib.ExperimentConfig) -> None:
  """The resolved config, compactly (its differences from the defaults),
  then the warnings about it."""
  defaults = config_lib.flat_fields(config_lib.ExperimentConfig())
  logging.info("Config (fields that differ from the defaults): %s", ", ".join(
      f"{k}={v!r}" for k, v in config_lib.flat_fields(cfg).items()
      if defaults.get(k) != v) or "none")
  for warning in config_warnings(cfg):
    logging.warning("%s", warning)


def _log_locality(writer, step: int, layer_stats: list[dict]) -> str:
  """TensorBoard scalars/histograms for per-layer selection statistics."""
  means: dict[str, list[float]] = {}
  for i, stats in enumerate(layer_stats):
    for key, value in stats.items():
      value = np.asarray(value)
      if value.ndim == 0:
        writer.scalars(step, {f"locality/{key}/layer_{i:02d}": float(value)})
        means.setdefault(key, []).append(float(value))
      else:
        writer.histogram(step, f"{key}/layer_{i:02d}", value)
  writer.scalars(step, {f"locality/{k}": np.mean(v) for k, v in means.items()})
  return " ".join(f"{k} {np.mean(v):.3f}" for k, v in means.items())


def train_and_evaluate(cfg: config_lib.ExperimentConfig,
                       workdir: str) -> dict[str, float]:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint.

  On divergence (`TrainingDiverged`) the checkpoints that are not good are
  set aside; with `train.on_divergence=rollback` the run resumes from the
  last good one with a scaled learning rate, up to `max_rollbacks` times.

  Returns the last logged metrics (train loss, eval loss when evaluated).
  """
  for rollback in range(cfg.train.max_rollbacks + 1):
    try:
      return _train(cfg, workdir)
    except TrainingDiverged as e:
      if (cfg.train.on_divergence != "rollback"
          or rollback == cfg.train.max_rollbacks):
        raise
      lr = cfg.train.learning_rate
      cfg = dataclasses.replace(cfg, train=dataclasses.replace(
          cfg.train, learning_rate=lr * cfg.train.rollback_lr_scale))
      logging.warning("%s\nRollback %d/%d: learning rate %.3g -> %.3g", e,
                      rollback + 1, cfg.train.max_rollbacks, lr,
                      cfg.train.learning_rate)
  raise AssertionError("unreachable")


def _train(cfg: config_lib.ExperimentConfig, workdir: str
           ) -> dict[str, float]:
  """One attempt of `train_and_evaluate`."""
  tc = cfg.train
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} is a file, not a directory")
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=tc.keep_checkpoints)
  write_config = _check_resume(cfg, workdir, ckpt.latest_step())
  _log_config(cfg)

  # ----------------------------------------------------------------------
  # Data.
  # ----------------------------------------------------------------------
  datasets = data_lib.load_datasets(cfg.data, tc.seq_len, tc.seed)
  if cfg.model.vocab_size < datasets.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={cfg.model.vocab_size} is invalid: must be >= the "
        f"tokenizer's vocabulary ({datasets.vocab_size})")

  # ----------------------------------------------------------------------
  # Model, optimizer, restore.
  # ----------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(tc.mesh_shape)
  is_main = jax.process_index() == 0
  graphdef, state, tx = init_state(cfg, mesh)
  num_params = model_lib.count_params(state["params"])
  position = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore_intact(state)
    position = int(meta["data_position"])
    logging.info("Resumed from step %d (data position %d) in %s",
                 int(state["step"]), position, ckpt.directory)
  start = int(state["step"])
  if start >= tc.num_steps:
    logging.info("Nothing to do: the checkpoint is at step %d and "
                 "train.num_steps=%d; raise train.num_steps to train on.",
                 start, tc.num_steps)
    ckpt.close()
    return {}
  write_config()
  logging.info("Model: %s parameters, variant %s, %d layers; %d x %s, mesh "
               "(data, fsdp, tensor) = %s", f"{num_params:,}",
               cfg.model.sparse.variant, cfg.model.num_layers,
               jax.device_count(), jax.devices()[0].device_kind,
               tuple(mesh.shape.values()))

  # ----------------------------------------------------------------------
  # Jitted steps.
  # ----------------------------------------------------------------------
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef,
                                      cfg=cfg.model, tx=tx),
                    out_shardings=(state_shardings, None), donate_argnums=0)
  eval_fn = jax.jit(lambda params, batch: loss_fn(
      params, graphdef, cfg.model, batch)[1]["loss"])
  stats_fn = jax.jit(lambda params, tokens: model_lib.apply(
      graphdef, params, tokens, collect_stats=True)[1]["layers"])
  # Traced under the mesh, so the Pallas kernels run per batch shard.
  step_fn, eval_fn, stats_fn = (sharding_lib.under_mesh(f, mesh)
                                for f in (step_fn, eval_fn, stats_fn))
  schedule = learning_rate_schedule(tc)
  writer = (metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"))
            if is_main else metrics_lib.NullWriter())
  # The resolved config as a code block of TensorBoard's text tab.
  writer.text(start, "config", "\n".join(
      "    " + line for line in json.dumps(
          dataclasses.asdict(cfg), indent=2, sort_keys=True).splitlines()))
  tokens_per_step = tc.batch_size * tc.seq_len
  flops = metrics_lib.flops_per_token(cfg.model, tc.seq_len, num_params)
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind,
                                tc.peak_tflops) * jax.device_count()

  def save(step: int) -> None:
    ckpt.save(step, state, {"step": step, "data_position": position,
                            "variant": cfg.model.sparse.variant})

  def evaluate() -> float:
    batches = data_lib.eval_batches(datasets.eval, tc.seq_len, tc.batch_size,
                                    tc.eval_batches)
    return float(np.mean([
        eval_fn(state["params"], sharding_lib.global_batch(b, mesh))
        for b in batches]))

  # ----------------------------------------------------------------------
  # Loop.
  # ----------------------------------------------------------------------
  last: dict[str, float] = {}
  if start == 0 and tc.eval_every:
    # The step-0 loss is the baseline every later line is compared with.
    last["eval_loss"] = evaluate()
    writer.scalars(0, {"eval/loss": last["eval_loss"]})
    logging.info("step 0 | eval loss %.4f (before training)",
                 last["eval_loss"])
  window: list[dict] = []
  t_window, t_start, step = time.time(), time.time(), start
  uncounted = 0  # steps in `window` whose time is not in tokens/s
  try:
    for step in range(start + 1, tc.num_steps + 1):
      batch = datasets.train.batch_at(position, tc.batch_size)
      state, m = step_fn(state, sharding_lib.global_batch(batch, mesh))
      position += tc.batch_size
      window.append(m)
      if step == start + 1:
        # The first step compiles: keep it out of tokens/s, MFU and ETA.
        jax.block_until_ready(m)
        first_s = time.time() - t_window
        writer.scalars(step, {"train/first_step_seconds": first_s})
        logging.info("step %d: first step (compile included) took %s; "
                     "tokens/s counts the steps after it", step,
                     metrics_lib.format_duration(first_s))
        t_window, uncounted = time.time(), 1

      if step % tc.log_every == 0 or step == tc.num_steps or step == start + 1:
        host = _check_finite(window, step)
        losses = np.array([w["loss"] for w in host])
        dt = time.time() - t_window
        counted = len(window) - uncounted
        last = {"loss": float(losses.mean()),
                "grad_norm": float(np.mean([w["grad_norm"] for w in host])),
                "locality_penalty": float(np.mean(
                    [w["locality_penalty"] for w in host])),
                "lr": float(schedule(step))}
        if counted:  # else the window held only the compiling step
          tok_s = counted * tokens_per_step / dt
          last["tokens_per_s"] = tok_s
          if peak:
            last["mfu"] = tok_s * flops / peak
        mem = metrics_lib.peak_memory_gib()
        if mem is not None:  # backends without memory_stats (CPU) skip it
          last["peak_memory_gib"] = mem
        writer.scalars(step, {f"train/{k}": v for k, v in last.items()})
        line = ""
        if cfg.model.sparse.is_sparse and tc.log_locality:
          tokens = jax.device_put(batch[:1, :-1], sharding_lib.replicated(mesh))
          stats = jax.device_get(stats_fn(state["params"], tokens))
          line = " | " + _log_locality(writer, step, stats)
        speed = "compiling"
        if counted:
          eta = metrics_lib.format_duration(
              (tc.num_steps - step) * dt / counted)
          mfu = f" | MFU {100 * last['mfu']:.1f}%" if peak else ""
          speed = f"{last['tokens_per_s']:,.0f} tok/s{mfu} | ETA {eta}"
          if "peak_memory_gib" in last:
            speed += f" | peak {last['peak_memory_gib']:.1f} GiB"
        logging.info(
            "step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %s%s", step,
            tc.num_steps, last["loss"], last["lr"], last["grad_norm"], speed,
            line)
        window, t_window, uncounted = [], time.time(), 0

      if tc.eval_every and (step % tc.eval_every == 0
                            or step == tc.num_steps):
        t_eval = time.time()
        last["eval_loss"] = evaluate()
        if not np.isfinite(last["eval_loss"]):
          raise TrainingDiverged(f"non-finite eval loss at step {step}", step)
        writer.scalars(step, {"eval/loss": last["eval_loss"]})
        logging.info("step %d | eval loss %.4f", step, last["eval_loss"])
        t_window += time.time() - t_eval  # keep eval out of tokens/s
      if tc.checkpoint_every and step % tc.checkpoint_every == 0:
        _check_finite(window, step)
        save(step)
      writer.flush()
    if ckpt.latest_step() != int(state["step"]):
      _check_finite(window, int(state["step"]))
      save(int(state["step"]))
  except TrainingDiverged as e:
    raise _set_aside_diverged(e, ckpt) from None
  except KeyboardInterrupt:
    logging.warning("Interrupted at step %d; saving a checkpoint.", step)
    try:
      _check_finite(window, int(state["step"]))
    except TrainingDiverged as e:  # nothing good to save
      raise _set_aside_diverged(e, ckpt) from None
    save(int(state["step"]))
    ckpt.wait()
    raise
  finally:
    writer.close()
  ckpt.wait()
  ckpt.close()
  logging.info("Done: %d steps in %s; final %s", tc.num_steps - start,
               metrics_lib.format_duration(time.time() - t_start),
               {k: round(v, 4) for k, v in last.items()})
  return last


def _check_resume(cfg: config_lib.ExperimentConfig, workdir: str,
                  step: int | None) -> Callable[[], None]:
  """Refuses to resume checkpoints under a config that changes a field they
  fix; logs the allowed changes. Returns the write of config.json (the
  config in use and, under "history", each start's step and changes), for
  the caller to run once the run will train (not when there is nothing to
  do)."""
  path = os.path.join(workdir, "config.json")
  stored = None
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)
  elif step is not None:
    raise config_lib.ResumeRefused(
        f"cannot resume {workdir}: it has checkpoints but no config.json to "
        "check the config against; restore it, or start fresh with another "
        "--workdir")
  changes = {} if stored is None else config_lib.config_diff(stored, cfg)
  fixed = config_lib.resume_conflicts(changes) if step is not None else []
  if fixed:
    raise config_lib.ResumeRefused(
        f"cannot resume {workdir} at step {step}: "
        f"{config_lib.format_changes({k: changes[k] for k in fixed})} "
        "differ from its config.json and are fixed by its checkpoints "
        "(shapes, parameter or optimizer tree, data order); pass the stored "
        "values, or start fresh with another --workdir (or move "
        f"{workdir}/checkpoints away)")
  if changes:
    logging.info("Config changed since the last start (step %d): %s",
                 step or 0, config_lib.format_changes(changes))
  history = (stored or {}).get("history", [])
  history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "step": step or 0, "changes": changes})

  def write():
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(
          path, {**dataclasses.asdict(cfg), "history": history})
  return write


def _check_finite(window: list[dict], step: int) -> list[dict]:
  """The window's metrics on the host (its last step is `step`); raises
  TrainingDiverged at its first state that is not good."""
  host = jax.device_get(window)
  first = step - len(host) + 1
  for i, m in enumerate(host):
    for key in ("loss", "grad_norm"):
      if not np.isfinite(m[key]):
        # Step s's loss and gradient come from the state of step s - 1.
        raise TrainingDiverged(
            f"non-finite {key.replace('_', ' ')} at step {first + i}",
            first + i - 1)
    if not m["state_finite"]:
      raise TrainingDiverged(
          f"non-finite parameters after step {first + i}", first + i)
  return host


def _set_aside_diverged(e: TrainingDiverged,
                        ckpt: checkpoint_lib.Checkpointer) -> TrainingDiverged:
  """Sets aside the checkpoints from `e.first_bad` on; names the last good."""
  ckpt.wait()  # an in-flight save finishes before it is judged
  bad = [s for s in ckpt.all_steps() if s >= e.first_bad]
  for s in bad:
    ckpt.set_aside(s, "diverged")
  good = ckpt.latest_step()
  msg = f"{e}; stopping."
  if bad:
    msg += (f" Set aside checkpoint(s) {', '.join(map(str, bad))} (not good) "
            f"in {os.path.dirname(ckpt.directory)}/set_aside.")
  if good is None:
    msg += " No good checkpoint is left: a rerun starts from step 0."
  else:
    msg += (f" Last good checkpoint: step {good} in {ckpt.directory}; a "
            "rerun (e.g. with a lower train.learning_rate) resumes from it, "
            "or set train.on_divergence=rollback.")
  return TrainingDiverged(msg, e.first_bad)
