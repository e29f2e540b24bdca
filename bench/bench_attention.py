"""Attention kernels on the CPU: elite-jax's implementations against PyTorch's scaled_dot_product_attention.

  python bench/bench_attention.py                 # SD's 512 px self-attention shapes, batch 1, 2, 4 (CFG doubles it)
  python bench/bench_attention.py --reps 3 --block-bytes 1048576 4194304 16777216
  python bench/bench_attention.py --batch 2 --grad --shapes 4096,8,40 1024,8,80 1024,8,8 256,8,16

Each row times softmax(q k^T / sqrt(d)) v on the same float32 inputs, in one process: "xla" is
jax.nn.dot_product_attention's composite, "cpu" what the "cpu" implementation runs (the fused C++ kernel of
elite_jax/native where it builds), "cpu_blocked" the XLA form it falls back to (models/attention.py; "cpu_NMB" with
one block size for heads and queries alike), "torch" PyTorch's fused CPU kernel. ``--grad`` also times a training
use, the value and gradient of sum(out * w) with respect to q, k and v ("*_grad"). ms per call is the median
after warm-up; "per image" divides by the batch, so a kernel whose per-image cost grows with the batch shows it.
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
from elite_jax import native
from elite_jax.models import attention

# (tokens, heads, head dim) of SD v1's self-attention at 64 x 64 and 32 x 32 latents (512 px).
SHAPES = ["4096,8,40", "1024,8,80"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--block-bytes", type=int, nargs="+", default=[],
                  help="also time the kernel with blocks of this size (for heads and queries alike)")
  ap.add_argument("--xla", action="store_true", help="also time jax.nn.dot_product_attention (slow at 4096 tokens)")
  ap.add_argument("--shapes", nargs="+", default=SHAPES, help="tokens,heads,head dim (self-attention)")
  ap.add_argument("--grad", action="store_true", help="also time value and gradient (training)")
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())
  print(json.dumps({"native_attention": native.available(), "xla_flags": os.environ.get("XLA_FLAGS", "")}))
  for n, h, d in (tuple(int(x) for x in s.split(",")) for s in args.shapes):
    for b in args.batch:
      rng = np.random.default_rng(0)
      q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
      row = {"shape": [b, n, h, d]}
      jq, jk, jv = (jax.device_put(x) for x in (q, k, v))
      cpu = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu")  # noqa: E731
      kernels = {"cpu": jax.jit(cpu), "cpu_blocked": jax.jit(attention._cpu_blocked)}
      kernels.update({f"cpu_{bb >> 20}MB": (lambda bb: jax.jit(lambda q, k, v: attention._cpu_blocked(q, k, v, bb,
                                                                                                         bb)))(bb)
                      for bb in args.block_bytes})
      if args.xla:
        kernels["xla"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
      if args.grad:
        w = jax.device_put(rng.standard_normal((b, n, h, d)).astype(np.float32))
        for name, f in (("cpu_grad", cpu), ("cpu_blocked_grad", attention._cpu_blocked)):
          kernels[name] = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: (f(q, k, v) * w).sum(), argnums=(0, 1, 2)))
      for name, fn in kernels.items():
        row[name] = 1e3 * median_time(lambda: fn(jq, jk, jv), args.reps, jax_sync)
      tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
      with torch.no_grad():
        row["torch"] = 1e3 * median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                                         args.reps, torch_sync)
      if args.grad:
        tw = torch.from_numpy(np.asarray(w)).transpose(1, 2).contiguous()
        gq, gk, gv = (x.clone().requires_grad_(True) for x in (tq, tk, tv))

        def torch_grad():
          loss = (torch.nn.functional.scaled_dot_product_attention(gq, gk, gv) * tw).sum()
          return torch.autograd.grad(loss, (gq, gk, gv))
        row["torch_grad"] = 1e3 * median_time(torch_grad, args.reps, torch_sync)
      for name in list(row):
        if name != "shape":
          row[f"{name}_per_image"] = row[name] / b
          if not name.startswith("torch"):
            row[f"{name}_vs_torch"] = row["torch_grad" if name.endswith("_grad") else "torch"] / row[name]
      print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
  main()
