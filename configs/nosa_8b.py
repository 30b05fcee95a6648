r"""NOSA-8B: long-context continual pretraining at 16k tokens.

Command:  python -m experiments.pretrain --config=configs/nosa_8b.py \
            --workdir=/tmp/nosa_8b
          (baselines: configs/nosa_8b.py:variant=full|infllmv2|dma;
           CPU smoke run: configs/nosa_8b.py:runlocal)
Hardware: a multi-GPU H100/H200 host (fsdp) for real runs.
Time:     not measured yet (no GPU run so far; see experiments/results/).
Result:   not measured yet.

Shape (8.19B parameters with the eviction heads), NOSA_SPEC.md §1.3, the
public MiniCPM4-8B shape: 32 layers, hidden 4096, 32 query / 2 KV heads of
128, FFN 16384, vocab 73448, untied LM head. RoPE is plain (theta 10000);
MiniCPM4's LongRoPE scaling is not implemented (a simplification).
"""

from configs import common


def get_config(arg=None):
  return common.nosa_config(arg, num_layers=32, model_dim=4096,
                            mlp_dim=16384, tie_embeddings=False,
                            batch_size=8)
