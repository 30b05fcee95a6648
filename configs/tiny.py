r"""Tiny NOSA model on the built-in corpus: the CPU quickstart.

Command:  python -m experiments.pretrain --config=configs/tiny.py \
            --workdir=/tmp/nosa_tiny
Hardware: 2 CPU cores (the CI machine); any GPU is faster.
Time:     about 4 minutes on 2 cores (300 steps x 4,096 tokens).
Result:   train loss ~5.6 (ln 259) at step 0, about 2.0 at step 300;
          measured figures: README.md, experiments/results/training/NOTES.md.

Variants: `configs/tiny.py:variant=full` (dense), `variant=infllmv2`,
`variant=dma`. Sparse settings are small (16-token blocks, 8-block budget)
so that selection drops half of a 256-token sequence's blocks.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="nosa", runlocal=False)
  config = common.base_config()
  m = config.model
  m.vocab_size = 259  # byte tokenizer: 256 bytes + BOS/EOS/PAD
  m.num_layers, m.model_dim, m.mlp_dim = 4, 128, 384
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 32
  m.tie_embeddings = True
  m.sparse.update(common.SMALL_SPARSE)
  common.apply_variant(config, arg.variant)

  t = config.train
  t.seq_len, t.batch_size, t.num_steps = 256, 16, 300
  t.learning_rate, t.warmup_steps, t.min_lr_ratio = 3e-3, 30, 0.1
  t.log_every, t.eval_every, t.eval_batches = 25, 100, 4
  t.checkpoint_every, t.keep_checkpoints = 100, 2
  if arg.runlocal:
    common.runlocal(config)
  return config
