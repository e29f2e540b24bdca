"""Attention kernels on the CPU: elite-jax's implementations against PyTorch's scaled_dot_product_attention.

  python bench/bench_attention.py                 # SD's 512 px self-attention shapes, batch 1, 2, 4 (CFG doubles it)
  python bench/bench_attention.py --reps 3 --block-bytes 1048576 4194304 16777216

Each row times softmax(q k^T / sqrt(d)) v on the same float32 inputs, in one process: "xla" is
jax.nn.dot_product_attention's composite, "cpu" the blocked kernel (models/attention.py; "cpu_NMB" with one block
size for heads and queries alike), "torch"
PyTorch's fused CPU kernel. ms per call is the median after warm-up; "per image" divides by the batch, so a kernel
whose per-image cost grows with the batch shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch

from bench.timing import jax_sync, median_time, torch_sync
from elite_jax.models import attention

# (tokens, heads, head dim) of SD v1's self-attention at 64 x 64 and 32 x 32 latents (512 px).
SHAPES = [(4096, 8, 40), (1024, 8, 80)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--block-bytes", type=int, nargs="+", default=[],
                  help="also time the kernel with blocks of this size (for heads and queries alike)")
  ap.add_argument("--xla", action="store_true", help="also time jax.nn.dot_product_attention (slow at 4096 tokens)")
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())
  for n, h, d in SHAPES:
    for b in args.batch:
      rng = np.random.default_rng(0)
      q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
      row = {"shape": [b, n, h, d]}
      jq, jk, jv = (jax.device_put(x) for x in (q, k, v))
      kernels = {"cpu": jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu"))}
      kernels.update({f"cpu_{bb >> 20}MB": (lambda bb: jax.jit(lambda q, k, v: attention._cpu_blocked(q, k, v, bb,
                                                                                                         bb)))(bb)
                      for bb in args.block_bytes})
      if args.xla:
        kernels["xla"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
      for name, fn in kernels.items():
        row[name] = 1e3 * median_time(lambda: fn(jq, jk, jv), args.reps, jax_sync)
      tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
      with torch.no_grad():
        row["torch"] = 1e3 * median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                                         args.reps, torch_sync)
      for name in list(row):
        if name != "shape":
          row[f"{name}_per_image"] = row[name] / b
          if name != "torch":
            row[f"{name}_vs_torch"] = row["torch"] / row[name]
      print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
  main()
