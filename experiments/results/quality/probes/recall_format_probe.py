# ruff: noqa  (a throwaway probe kept for reproduction, not project code)
# Issue 24, session 11 (CPU): which recall record format does a tiny dense
# model learn? Not a module of the project: run from the repository root as
#   timeout 240 .venv/bin/python experiments/results/quality/probes/recall_format_probe.py \
#     L=64 nrec=3 nq=2 kl=1 sep=none copy=32 rcopy=16 N=2000 secs=200 every=100
# (key=value arguments; see `args.get` below). Prints the NLL of each value
# digit of the windows' queries (probe windows), and with rcopy=S the NLL of
# a random-offset repeated span of S random letters (content induction).
# copy_until=K (session 12): a curriculum, every row a copy row for the
# first K steps, then the mix the other arguments give.
"""CPU probe: records pre + key + sep + value + post, spread in a haystack;
queries at the end of the window."""
import functools, sys, time
import numpy as np, jax, jax.numpy as jnp
from configs import tiny
from nosa_jax import config as config_lib, data, train, evaluation

args = dict(a.split("=") for a in sys.argv[1:])
L = int(args.get("L", 128)); B = int(args.get("B", 32)); N = int(args.get("N", 400))
nrec = int(args.get("nrec", 6)); nq = int(args.get("nq", 4)); secs = float(args.get("secs", 220))
KA = args.get("ka", "abcdefghijklmnopqrstuvwxyz"); KL = int(args.get("kl", 4))
VA = args.get("va", "0123456789"); VL = int(args.get("vl", 4))
PRE = args.get("pre", " <"); SEP = args.get("sep", ":").replace("none", ""); POST = args.get("post", ">")
hay = args.get("hay", "filler")
c = tiny.get_config("variant=full")
c.train.seq_len, c.train.batch_size, c.train.num_steps = L, B, N
c.train.learning_rate = float(args.get("lr", 3e-3)); c.train.warmup_steps = 30
c.model.num_layers = int(args.get("layers", 2))
cfg = config_lib.ExperimentConfig.from_dict(c.to_dict())
tok = data.ByteTokenizer()
if hay == "corpus":
  ds = data.load_datasets(cfg.data, L, 0); H = ds.train.tokens if hasattr(ds.train, "tokens") else None
  H = np.asarray(ds.eval.tokens) if H is None else np.asarray(H)
else:
  from nosa_jax import passkey
  cyc = passkey.PasskeyBuilder(tok).filler_cycle; H = np.tile(cyc, 4000 // len(cyc) + 2)
E = lambda s: np.asarray(tok.encode(s), np.int32)

def doc(rng):
  keys = set()
  while len(keys) < nrec: keys.add("".join(KA[i] for i in rng.integers(0, len(KA), KL)))
  keys = list(keys)
  recs, voff = [], []
  for k in keys:
    a = E(PRE + k + SEP); v = E("".join(VA[i] for i in rng.integers(0, len(VA), VL)))
    recs.append(np.concatenate([a, v, E(POST)])); voff.append(len(a))
  asked = rng.permutation(nrec)[:nq]
  tail = np.concatenate([recs[i] for i in asked])
  off = int(rng.integers(0, len(H) - L - 2))
  t = np.array(H[off:off + L + 1], np.int32); t[0] = tok.bos_id
  ts = L + 1 - len(tail); t[ts:] = tail
  lens = [len(r) for r in recs]; free = ts - 1 - sum(lens)
  offs = np.sort(rng.integers(0, free + 1, nrec)); used = 0
  for s, i in enumerate(rng.permutation(nrec)):
    st = 1 + offs[s] + used; t[st:st + lens[i]] = recs[i]; used += lens[i]
  vals, p = [], ts
  for i in asked: vals.append(p + voff[i]); p += lens[i]
  return t, vals

graphdef, state, tx = train.init_state(cfg)
step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, cfg=cfg.model, tx=tx), donate_argnums=0)
probe = [doc(np.random.default_rng([7, i])) for i in range(64)]
ptoks = np.stack([t[:L] for t, _ in probe])
pred = jax.jit(lambda p, x: evaluation.greedy_predict_fn(p, cfg.model)(x)) if False else None
print("format:", repr(PRE + "K" * KL + SEP + "V" * VL + POST), "example:", bytes((probe[0][0][-30:] % 256).astype(np.uint8)).decode("latin1"), f"chance nll {np.log(len(VA)):.3f}", flush=True)
t0 = time.time()
for i in range(1, N + 1):
  batch = np.stack([doc(np.random.default_rng([1, i, j]))[0] for j in range(B)])
  ncopy = int(args.get("copy", 0))
  if i <= int(args.get("copy_until", 0)):  # curriculum: copy rows only first
    ncopy = B
  if ncopy:
    x = np.random.default_rng([2, i]).integers(97, 123, size=(ncopy, L // 2 + 1))
    if args.get("rcopy"):
      S = int(args["rcopy"]); r2 = np.random.default_rng([3, i])
      for j in range(ncopy):
        p1 = int(r2.integers(1, L + 1 - 2 * S)); p2 = int(r2.integers(p1 + S, L + 2 - S))
        batch[j, p1:p1 + S] = x[j, :S]; batch[j, p2:p2 + S] = x[j, :S]
    else:
      batch[:ncopy] = np.concatenate([np.full((ncopy, 1), 256), x[:, :L // 2], x], axis=1)[:, :L + 1]
  state, m = step(state, jnp.asarray(batch))
  if i % int(args.get("every", 50)) == 0 or i == N or time.time() - t0 > secs:
    am, nll = evaluation.greedy_predict_fn(state["params"], cfg.model)(ptoks)
    per = np.array([[nll[r, v - 1 + d] for d in range(VL)] for r in range(64) for v in probe[r][1] if v + VL <= L])
    acc = np.mean([np.mean(am[r, v - 1:v - 1 + VL] == probe[r][0][v:v + VL]) for r in range(64) for v in probe[r][1] if v + VL <= L])
    cn = ""
    if args.get("rcopy"):
      S = int(args["rcopy"]); ct = np.array(ptoks); rr = np.random.default_rng(5); cp = []
      for j in range(len(ct)):
        y = rr.integers(97, 123, S); p1 = int(rr.integers(1, L + 1 - 2 * S)); p2 = int(rr.integers(p1 + S, L + 1 - S))
        ct[j, p1:p1 + S] = y; ct[j, p2:p2 + S] = y; cp.append(p2)
      _, cnll = evaluation.greedy_predict_fn(state["params"], cfg.model)(ct)
      cn = f" | rcopy nll (2nd span, after its 1st token) {np.mean([cnll[j, p + 1:p + S - 1].mean() for j, p in enumerate(cp)]):.2f} (chance 3.26)"
    print(f"step {i} {time.time()-t0:.0f}s loss {float(m['loss']):.3f} query value acc {acc:.3f} nll/digit {' '.join(f'{x:.2f}' for x in per.mean(0))}{cn}", flush=True)
    if time.time() - t0 > secs: break
